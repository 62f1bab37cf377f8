"""Everything the training loop builds before its first step: config checks, data, sharded
models and the reference, precision, and the small utilities around a run (preemption, export,
summary). ``prefopt/train/loop.py`` keeps the loop itself."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import datasets
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from prefopt import parallel
from prefopt.banner import verdict
from prefopt.data.loading import DataSplits, build_splits, make_views
from prefopt.data.packing import LAYOUTS
from prefopt.data.tokenize import TokenizeOptions, Tokenizer
from prefopt.freeze import freeze_below_top_blocks
from prefopt.losses import LossSpec
from prefopt.models import load_model, resolve_attn_implementation
from prefopt.parallel import StatsModel
from prefopt.reference import precompute_reference, reference_key
from prefopt.stats import compile_blocks

log = logging.getLogger("prefopt")


class Preemption:
    """SIGTERM/SIGUSR1 (SLURM's warning before the time limit) -> checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.requested = True


def validate(cfg: DictConfig) -> None:
    """Fail before any work on missing values or inconsistent batch sizes."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config values missing: {missing}")
    t = cfg.trainer
    if t.reference not in ("model", "precompute"):
        raise ValueError(f"trainer.reference must be 'model' or 'precompute', got {t.reference!r}")
    attn = resolve_attn_implementation(cfg.model.attn_implementation)
    if t.layout == "shared" and "flash" in attn:  # varlen flash cannot mask response pairs
        raise ValueError(f"trainer.layout=shared needs a masked attention, not {attn!r}: set "
                         "model.attn_implementation=flex_attention (GPU) or sdpa")  # fmt: skip


def validate_batching(t: DictConfig, world_size: int) -> None:
    """Every rank must run the same number of micro-batches per step (sharded collectives)."""
    if t.layout not in LAYOUTS:
        raise ValueError(f"trainer.layout must be one of {LAYOUTS}, got {t.layout!r}")
    if t.micro_batch_tokens:  # the token-budget plan gives every rank as many micro-batches
        if t.global_batch_groups % world_size:
            raise ValueError(f"trainer.global_batch_groups={t.global_batch_groups} must be a "
                             f"multiple of the {world_size} ranks")  # fmt: skip
        return
    if t.global_batch_groups % (t.micro_batch_groups * world_size):
        raise ValueError(f"trainer.global_batch_groups={t.global_batch_groups} must be a multiple "
                         f"of trainer.micro_batch_groups x ranks = {t.micro_batch_groups} x "
                         f"{world_size}")  # fmt: skip


def build_models(
    cfg: DictConfig,
    spec: LossSpec,
    tok: PreTrainedTokenizerBase,
    data: DataSplits,
    world: parallel.World,
    autocast: AbstractContextManager,
) -> tuple[StatsModel, StatsModel | None, DataSplits]:
    """The sharded policy and, from the same starting weights, the reference: a frozen sharded
    copy (``trainer.reference=model``), or cached log-probs attached to both splits
    (``precompute``: no second model in memory)."""
    t = cfg.trainer
    hf = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed)
    freeze_below_top_blocks(hf, t.train_top_blocks)  # CPU demo: train the top blocks only
    bf16 = autocast_is_bf16(world.device, t.precision)
    kl_on = spec.on_policy_kl and cfg.loss.kl_weight > 0  # needs reference logits on new samples
    # KTO's baseline and SPO's KL need reference forwards on rows that no cache holds.
    ref_model = (spec.needs_reference and t.reference == "model") or kl_on or spec.needs_mismatched
    ref_hf = copy.deepcopy(hf) if ref_model else None
    if t.compile:  # per block, before sharding
        for m in filter(None, (hf, ref_hf)):
            compile_blocks(m)
    policy = parallel.shard(hf.to(world.device), world, bf16)
    ref = parallel.shard(ref_hf.to(world.device), world, bf16, trainable=False) if ref_hf else None
    if spec.needs_reference and not ref_model:
        cache = cfg.cache_dir if cfg.dataset.cache else None
        kw = dict(batch_groups=t.eval_batch_groups, pad_id=tok.pad_token_id,
                  chunk_size=t.logps_chunk_size, autocast=autocast, rank=world.rank,
                  world_size=world.world_size)  # fmt: skip

        def one(split: datasets.Dataset) -> datasets.Dataset:
            key = reference_key(cfg.model, cfg.seed, t.precision, split)
            return precompute_reference(policy, split, key, cache, **kw)

        data = data._replace(train=one(data.train), eval=one(data.eval))
    return policy, ref, data


def autocast_is_bf16(device: torch.device, precision: str) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def export(policy: StatsModel, tok: PreTrainedTokenizerBase, path: Path) -> None:
    """Hugging Face format (``from_pretrained``-able) gathered from the shards onto rank 0."""
    full = parallel.full_state_dict(policy)  # a collective: every rank takes part
    if parallel.is_main():
        policy.model.save_pretrained(path, state_dict=full)
        tok.save_pretrained(path)


def make_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast (fp32 master weights) on CUDA by default; fp32 on CPU unless asked."""
    if autocast_is_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def best_of(*evals: dict[str, float] | None) -> dict[str, float] | None:
    """The eval with the lowest held-out loss (the latest on ties)."""
    done = [m for m in evals if m]
    return min(reversed(done), key=lambda m: m["loss"]) if done else None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_eval(title: str, before: dict[str, float], after: dict[str, float] | None) -> None:
    keys = [
        "loss",
        "rewards/accuracy",
        "rewards/margin",
        "avg_logps/chosen",
        "avg_logps/rejected",
        "lengths/chosen",
        "lengths/rejected",
        "valid_groups",
    ]
    lines = [f"{title:<22}{'before':>12}" + (f"{'after':>12}" if after else "")]
    for k in keys:
        row = f"{k:<22}{before.get(k, math.nan):>12.4f}"
        lines.append(row + (f"{after.get(k, math.nan):>12.4f}" if after else ""))
    if after:
        lines.append(verdict(before, after))
    print("\n".join(lines), flush=True)


def prepare_data(cfg: DictConfig, tok: PreTrainedTokenizerBase, spec: LossSpec) -> DataSplits:
    """Tokenized train/eval groups and their views (score-ordered pairs for pairwise losses)."""
    d = cfg.dataset
    opts = TokenizeOptions(d.max_length, d.max_prompt_length, d.prompt_truncation,
                           d.response_truncation, d.system_prompt)  # fmt: skip
    cache = str(Path(cfg.cache_dir)) if d.cache else None
    train, eval_data, counts = build_splits(d, Tokenizer(tok, opts), cache, cfg.seed)
    log.info("data: %d train / %d eval groups; %s", len(train), len(eval_data), dict(counts))
    if spec.k not in (None, 2):
        raise ValueError(f"loss {spec.name!r} wants K={spec.k}; only K=2 or any K is supported")
    pairs = d.pairs if spec.k == 2 else None
    return DataSplits(train, make_views(train, pairs), eval_data, make_views(eval_data, pairs),
                      counts)  # fmt: skip
