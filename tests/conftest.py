"""Shared fixtures: a tiny tokenizer and model built in code, small datasets written to tmp dirs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import LlamaConfig, LlamaForSequenceClassification

import prefopt.losses  # noqa: F401  (registers loss schemas in the ConfigStore)
from prefopt.model.load import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    # Split on "\n" only: str.splitlines() also breaks at U+2028, which json.dumps(
    # ensure_ascii=False) leaves unescaped inside model outputs.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def compose_config(name: str, *overrides: str, out_dir: Path | None = None) -> DictConfig:
    """conf/<name>.yaml with Hydra overrides, as its CLI composes it; ``out_dir`` also sets
    ``out_dir`` and a ``cache_dir`` beside it (shared by the runs of one test)."""
    if out_dir is not None:
        overrides = (f"out_dir={out_dir}", f"cache_dir={out_dir.parent / 'cache'}", *overrides)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def run_cli(module: str, *overrides: str, run_dir: Path, timeout: float = 300):
    """``python -m <module> <overrides> hydra.run.dir=<run_dir>`` from the repository root with a
    model cache beside ``run_dir``; fails the test (with stderr's tail) unless it exits 0."""
    env = {**os.environ, "PREFOPT_CACHE": str(run_dir.parent / "cache")}
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def save_tiny_rm(path: Path, *, num_labels: int = 1, with_pad: bool = True) -> str:
    """A tiny random LlamaForSequenceClassification reward model (seed 0) and its tokenizer."""
    tok = tiny_tokenizer()
    if not with_pad:
        tok.pad_token = None
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():  # the same weights without reseeding the tests that follow
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights of a run's (sharded, DCP) checkpoint at ``step`` as one state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / f"weights_{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:06d}", out)
    return torch.load(out, weights_only=False)["model"]


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
