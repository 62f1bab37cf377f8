"""The shipped default dataset (prefopt/assets/default_{train,eval}.jsonl) and its generator."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "prefopt" / "assets"
SCRIPT = ROOT / "experiments" / "make_default_dataset.py"
SPLITS = {"train": 400, "eval": 64}


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_default_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(split: str) -> list[dict]:
    path = ASSETS / f"default_{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_shipped_rows_are_well_formed(split: str) -> None:
    rows = _rows(split)
    assert len(rows) == SPLITS[split]
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"id", "prompt", "responses", "scores", "family"}
        assert row["id"].startswith(f"{split}-")
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        assert isinstance(row["prompt"][0]["content"], str) and row["prompt"][0]["content"]
        assert len(row["responses"]) == len(row["scores"]) == 4
        assert all(isinstance(r, str) and r for r in row["responses"])
        assert all(isinstance(s, float) and math.isfinite(s) for s in row["scores"])
        assert len(set(row["scores"])) > 1
        assert sorted(row["scores"])[-1] > sorted(row["scores"])[-2]  # unique best response


def test_families_balanced_and_prompts_disjoint() -> None:
    train, eval_ = _rows("train"), _rows("eval")
    for rows in (train, eval_):
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["family"]] = counts.get(r["family"], 0) + 1
        assert len(counts) == 8 and max(counts.values()) - min(counts.values()) <= 1
    train_prompts = {r["prompt"][0]["content"] for r in train}
    eval_prompts = {r["prompt"][0]["content"] for r in eval_}
    assert len(train_prompts) == len(train) and len(eval_prompts) == len(eval_)
    assert not train_prompts & eval_prompts


def test_verifier_reads_the_text() -> None:
    mod = _load_script()
    p = {"a": 17, "b": 25, "op": "+", "ans": 42}
    assert mod.verify("arithmetic", p, "42") == 10.0
    assert 5.0 <= mod.verify("arithmetic", p, "The answer is 42.") < 10.0
    assert 3.0 <= mod.verify("arithmetic", p, "41") < 5.0
    assert mod.verify("arithmetic", p, "I'm not sure.") < 3.0
    lst = {"category": "fruits", "n": 2, "items": ["apple", "pear"]}
    assert mod.verify("list", lst, "- plum\n- kiwi") == 10.0  # any two fruits pass
    assert 5.0 <= mod.verify("list", lst, "plum, kiwi") < 10.0
    assert 3.0 <= mod.verify("list", lst, "- plum\n- dog") < 5.0


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    _load_script().main(["--out-dir", str(tmp_path)])
    for split in SPLITS:
        name = f"default_{split}.jsonl"
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
