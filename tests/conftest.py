"""Shared fixtures: a tiny tokenizer and model built in code, small datasets written to tmp dirs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import prefopt.losses  # noqa: F401  (registers loss schemas in the ConfigStore)
from prefopt.model.load import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arithmetic_rows(n: int, seed: int, k: int = 4) -> list[dict]:
    """Canonical-schema groups with K graded responses (distinct scores)."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = r.randint(1, 99), r.randint(1, 99)
        responses = [f"{a + b}", f"The answer is {a + b}.", f"{a + b + 1}", "I am not sure."][:k]
        scores = [10.0, 7.0, 3.0, 1.0][:k]
        order = list(range(k))
        r.shuffle(order)
        rows.append(
            {
                "id": f"r{i}",
                "prompt": f"What is {a} + {b}?",
                "responses": [responses[j] for j in order],
                "scores": [scores[j] for j in order],
            }
        )
    return rows


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def tiny_data(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24, seed=0))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", arithmetic_rows(8, seed=1))
    return train, eval_


def naive_stats(model, grps) -> tuple[torch.Tensor, ...]:
    """Each (prompt, response) alone, full-vocabulary fp64 log-softmax, plain Python sums."""
    B, K = len(grps), max(len(i) for _, i in grps)
    logps, last = torch.zeros(B, K, dtype=torch.float64), torch.zeros(B, K, dtype=torch.float64)
    lengths = torch.ones(B, K, dtype=torch.float64)
    for b, (g, idx) in enumerate(grps):
        for k, r in enumerate(idx):
            seq = torch.tensor([g.prompt_ids + g.response_ids[r]])
            logits = model(input_ids=seq).logits[0].log_softmax(-1)  # (T, V)
            P = len(g.prompt_ids)
            per_token = [logits[t - 1, seq[0, t]] for t in range(P, seq.shape[1])]
            logps[b, k], last[b, k], lengths[b, k] = sum(per_token), per_token[-1], len(per_token)
    return logps, lengths, last
