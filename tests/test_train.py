# .venv/bin/pytest tests/test_train.py -q
"""End to end on the tiny model: entrypoint, every loss, resume, accumulation, NaN guard."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, arithmetic_rows, checkpoint_weights, write_jsonl
from hydra import compose, initialize_config_dir

from prefopt.losses import LOSSES, build_loss
from prefopt.model.logprobs import StatsModel
from prefopt.train.loop import run
from prefopt.train.step import LossContext, StepContext, train_step


def _cfg(run_dir: Path, data: tuple[Path, Path], *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"run_dir={run_dir}",
                f"cache_dir={run_dir.parent / 'cache'}",
                "model=tiny",
                "trainer=debug",
                f"dataset.path={data[0]}",
                f"dataset.eval_path={data[1]}",
                *overrides,
            ],
        )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_entrypoint_trains_three_steps_and_exports(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "prefopt.train",
        "loss=simpo",
        "model=tiny",
        "trainer=debug",
        "trainer.max_steps=3",
        "trainer.export_final=true",
        f"hydra.run.dir={run_dir}",
        f"dataset.path={tiny_data[0]}",
        f"dataset.eval_path={tiny_data[1]}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out metrics" in proc.stdout and "rewards/accuracy" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["loss"] == "simpo"
    assert math.isfinite(summary["eval_final"]["loss"])
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    train_lines = [m for m in _metrics(run_dir) if "train/loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert model.config.vocab_size == len(tok)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_three_steps(tmp_path, tiny_data, loss):
    run_dir = tmp_path / "run"
    final = run(_cfg(run_dir, tiny_data, f"loss={loss}"))
    assert math.isfinite(final["loss"]) and final["valid_groups"] == 8
    losses = [m["train/loss"] for m in _metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, tiny_data):
    common = ("loss=refa_dynamic", "trainer.max_steps=4", "optimizer.lr=1e-3")
    straight = tmp_path / "straight"
    run(_cfg(straight, tiny_data, *common))
    resumed = tmp_path / "resumed"
    assert run(_cfg(resumed, tiny_data, *common, "trainer.stop_at_step=2")) == {}
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step_000002"]
    run(_cfg(resumed, tiny_data, *common))  # resume=auto picks up step 2
    a, b = checkpoint_weights(straight, 4), checkpoint_weights(resumed, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same keys, bit-identical values
    start = checkpoint_weights(resumed, 2)
    assert any(not torch.equal(start[k], b[k]) for k in b)  # the resumed half did train
    la = [m["train/loss"] for m in _metrics(straight) if "train/loss" in m]
    lb = [m["train/loss"] for m in _metrics(resumed) if "train/loss" in m]
    assert la == lb  # same data in the same order, nothing lost or repeated


def _step_grads(tmp_path, tiny_data, micro: int) -> list[torch.Tensor]:
    from prefopt.data.batching import Batching, batches
    from prefopt.model.load import load_model, load_tokenizer
    from prefopt.train.loop import prepare_data

    cfg = _cfg(
        tmp_path / f"g{micro}",
        tiny_data,
        "loss=refa_dynamic",
        "trainer.global_batch_groups=4",
        f"trainer.micro_batch_groups={micro}",
        "trainer.max_grad_norm=1e9",
    )
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    spec, loss_fn = build_loss(cfg.loss)
    data = prepare_data(cfg, tok, spec)
    model = load_model(cfg.model, cfg.cache_dir, tok, seed=0).double()
    mbs = batches(
        data.train, data.train_views, [0, 1, 2, 3], micro, Batching(pad_id=tok.pad_token_id)
    )
    import contextlib

    ctx = StepContext(
        LossContext(spec, loss_fn, 1024), contextlib.nullcontext(), cfg.trainer.max_grad_norm
    )
    train_step(StatsModel(model), None, list(mbs), ctx)
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_is_normalised_like_one_big_batch(tmp_path, tiny_data):
    one = _step_grads(tmp_path, tiny_data, micro=4)
    accumulated = _step_grads(tmp_path, tiny_data, micro=1)
    for a, b in zip(one, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_groups_without_preference_are_skipped_and_counted(tmp_path):
    rows = arithmetic_rows(16, seed=0)
    for r in rows[::2]:
        r["scores"] = [5.0] * 4  # all equal: REFA's positive set is empty
    data = (write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", rows[:4]))
    run_dir = tmp_path / "run"
    run(_cfg(run_dir, data, "loss=refa_dynamic"))
    steps = [m for m in _metrics(run_dir) if "train/loss" in m]
    assert sum(m["train/skipped_groups"] for m in steps) > 0
    assert all(math.isfinite(m["train/loss"]) for m in steps)


def test_non_finite_loss_never_reaches_the_optimizer(tmp_path, tiny_data):
    from prefopt.types import LossOutput

    def nan_loss(policy, ref, scores):
        losses = policy.logps.sum(-1) * float("nan")
        return LossOutput(losses, torch.ones_like(losses, dtype=torch.bool), {})

    cfg = _cfg(tmp_path / "r", tiny_data, "loss=simpo")
    from prefopt.data.batching import Batching, batches
    from prefopt.model.load import load_model, load_tokenizer
    from prefopt.train.loop import prepare_data

    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    spec, _ = build_loss(cfg.loss)
    data = prepare_data(cfg, tok, spec)
    model = load_model(cfg.model, cfg.cache_dir, tok, seed=0)
    mbs = batches(data.train, data.train_views, [0, 1], 2, Batching(pad_id=tok.pad_token_id))
    import contextlib

    ctx = StepContext(
        LossContext(spec, nan_loss, 1024), contextlib.nullcontext(), cfg.trainer.max_grad_norm
    )
    result = train_step(StatsModel(model), None, list(mbs), ctx)
    assert not result.applied  # the loop skips optimizer.step()
    assert math.isnan(result.metrics["loss"])


def test_all_steps_non_finite_stops_with_clear_error(tmp_path, tiny_data, monkeypatch):
    import prefopt.train.loop as train_mod
    from prefopt.types import LossOutput

    def nan_loss(policy, ref, scores):  # every step non-finite (tied data is refused at load)
        losses = policy.logps.sum(-1) * float("nan")
        return LossOutput(losses, torch.ones_like(losses, dtype=torch.bool), {})

    monkeypatch.setattr(train_mod, "MAX_CONSECUTIVE_SKIPS", 2)
    monkeypatch.setattr(train_mod, "build_loss", lambda cfg: (build_loss(cfg)[0], nan_loss))
    with pytest.raises(FloatingPointError, match="consecutive steps skipped"):
        run(_cfg(tmp_path / "run", tiny_data, "loss=simpo"))


def _multirun(tmp_path: Path, data: tuple[Path, Path], *overrides: str) -> list[dict]:
    """Run a Hydra multirun through the real entrypoint; the jobs' summaries in job order."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "prefopt.train",
        "-m",
        "model=tiny",
        "trainer=debug",
        f"dataset.path={data[0]}",
        f"dataset.eval_path={data[1]}",
        f"hydra.sweep.dir={sweep}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [json.loads((j / "summary.json").read_text()) for j in jobs]


def test_a_multirun_over_losses_trains_each_through_the_entrypoint(tmp_path, tiny_data):
    # every loss trains in-process above; this is the Hydra multirun path (one job per choice),
    # with a reference-free loss and one with a per-step extra input (KTO's z0)
    summaries = _multirun(tmp_path, tiny_data, "loss=simpo,kto")
    assert [s["loss"] for s in summaries] == ["simpo", "kto"]
    for s in summaries:
        assert s["status"] == "ok" and s["steps"] == 3, s
        assert math.isfinite(s["eval_final"]["loss"]), s


def test_a_failed_sweep_job_is_recorded_and_the_others_run(tmp_path, tiny_data):
    summaries = _multirun(tmp_path, tiny_data, "loss=simpo", "trainer.global_batch_groups=3,4")
    assert summaries[0]["status"] == "failed" and "multiple of" in summaries[0]["error"]
    assert summaries[1]["status"] == "ok" and summaries[1]["steps"] == 3


def test_layouts_and_token_budgets_train_the_same(tmp_path, tiny_data):
    """padded, packed and prompt-shared forwards, by groups or by token budget: same training."""
    common = ("loss=refa_dynamic", "trainer.max_steps=2", "optimizer.lr=1e-3")
    runs = {
        "padded": (),
        "packed": ("trainer.layout=packed",),
        "shared_budget": ("trainer.layout=shared", "trainer.micro_batch_tokens=200"),
    }
    finals = {
        name: run(_cfg(tmp_path / name, tiny_data, *common, *extra)) for name, extra in runs.items()
    }
    ref = checkpoint_weights(tmp_path / "padded", 2)
    for name in ("packed", "shared_budget"):
        assert finals[name]["loss"] == pytest.approx(finals["padded"]["loss"], rel=1e-5)
        assert finals[name]["tokens"] == finals["padded"]["tokens"]
        other = checkpoint_weights(tmp_path / name, 2)
        torch.testing.assert_close(other, ref, rtol=1e-4, atol=1e-5)  # fp32 + Adam
