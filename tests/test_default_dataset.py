"""The shipped default dataset (prefopt/assets/default_{train,eval}.jsonl): SmolLM2-135M-Instruct's
own samples on the offline constraint benchmark, scored by its verifiers
(experiments/make_default_dataset.py, which runs prefopt.eval.datagen)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prefopt.eval import constraints

ASSETS = Path(__file__).resolve().parents[1] / "prefopt" / "assets"
SPLITS = {"train": "train", "eval": "heldout"}


def _rows(name: str) -> list[dict]:
    path = ASSETS / f"default_{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_shipped_rows_are_well_formed(name: str) -> None:
    rows = _rows(name)
    assert len(rows) >= (150 if name == "train" else 40)
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"id", "prompt", "responses", "scores", "family", "params"}
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        assert 2 <= len(row["responses"]) == len(row["scores"]) <= 4
        assert all(isinstance(r, str) and r.strip() for r in row["responses"])
        assert all(isinstance(s, float) and math.isfinite(s) for s in row["scores"])
        assert len(set(row["scores"])) > 1  # datagen dropped groups that carry no preference


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_every_score_is_the_verifiers(name: str) -> None:
    for row in _rows(name):
        for response, score in zip(row["responses"], row["scores"], strict=True):
            assert constraints.verify(row, response).score == score, (row["id"], response)


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_rows_are_the_benchmarks_tasks_of_their_split(name: str) -> None:
    rows = _rows(name)
    tasks = {
        t.id: t
        for t in constraints.make_tasks(
            SPLITS[name], 1 + max(int(r["id"].rsplit("-", 1)[1]) for r in rows)
        )
    }
    for row in rows:
        task = tasks[row["id"]]
        assert row["prompt"][0]["content"] == task.prompt
        assert (row["family"], row["params"]) == (task.family, task.params)
        assert constraints.split_of(task.prompt) == SPLITS[name]


def test_train_and_eval_prompts_are_disjoint() -> None:
    train = {r["prompt"][0]["content"] for r in _rows("train")}
    held = {r["prompt"][0]["content"] for r in _rows("eval")}
    assert train and held and not train & held
