"""Train a causal LM on multi-response preference data with any registered loss.

    python -m prefopt.train                                   # embedded default (CPU, offline)
    python -m prefopt.train loss=simpo model=tiny trainer=debug
    python -m prefopt.train loss=dpo model=llama3_8b_instruct dataset=ultrafeedback_binarized \
        trainer=gpu logger=wandb
    python -m prefopt.train hydra.run.dir=outputs/refa_dynamic/<run>   # resume that run

One step: take ``global_batch_groups`` views from the endless, seeded epoch stream; for each
micro-batch run one forward over all its responses (and the frozen reference when the loss needs
it), compute per-group losses, backward their sum; then divide the gradients by the number of
valid groups of the whole step, clip, and step. A step whose loss or gradient is not finite is
dropped before the optimizer sees it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import subprocess
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import prefopt.losses  # noqa: F401  (registers loss schemas before composition)
from prefopt import parallel
from prefopt.checkpoint import (
    TrainState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from prefopt.data.collate import collate, views_at
from prefopt.data.loading import build_splits, group_at, make_views
from prefopt.data.tokenize import TokenizeOptions, Tokenizer
from prefopt.evaluation import evaluate, forward_loss
from prefopt.logger import build_logger
from prefopt.losses import build_loss
from prefopt.metrics import MetricSums
from prefopt.models import load_model, load_tokenizer
from prefopt.optim import build_optimizer, lr_at

log = logging.getLogger("prefopt")
MAX_CONSECUTIVE_SKIPS = 10


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
    if t.global_batch_groups % t.micro_batch_groups:
        raise ValueError(
            f"trainer.global_batch_groups={t.global_batch_groups} must be a multiple of "
            f"trainer.micro_batch_groups={t.micro_batch_groups}"
        )


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_eval(title: str, before: dict[str, float], after: dict[str, float] | None) -> None:
    keys = ["loss", "rewards/accuracy", "rewards/margin", "avg_logps/chosen", "avg_logps/rejected",
            "lengths/chosen", "lengths/rejected", "valid_groups"]
    lines = [f"{title:<22}{'before':>12}" + (f"{'after':>12}" if after else "")]
    for k in keys:
        row = f"{k:<22}{before.get(k, math.nan):>12.4f}"
        lines.append(row + (f"{after.get(k, math.nan):>12.4f}" if after else ""))
    print("\n".join(lines), flush=True)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, float]:
    """Train as ``cfg`` says; return the final held-out metrics ({} when stopped early)."""
    validate(cfg)
    t = cfg.trainer
    world = parallel.init_distributed(t.device)
    torch.manual_seed(cfg.seed)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run_dir = cfg.run_dir
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and world.device.type == "cuda")
    autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())

    # ---- tokenizer, data, loss ----
    spec, loss_fn = build_loss(cfg.loss)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    d = cfg.dataset
    tokenizer = Tokenizer(tok, TokenizeOptions(d.max_length, d.max_prompt_length,
                                               d.prompt_truncation, d.response_truncation,
                                               d.system_prompt))
    train_data, eval_data, counts = build_splits(
        d, tokenizer, str(Path(cfg.cache_dir)) if d.cache else None, cfg.seed)
    log.info("data: %d train / %d eval groups; %s", len(train_data), len(eval_data), dict(counts))
    if spec.k not in (None, 2):
        raise ValueError(f"loss {spec.name!r} wants K={spec.k}; only pairwise or any-K is supported")
    pairs = d.pairs if spec.k == 2 else None
    train_views, eval_views = make_views(train_data, pairs), make_views(eval_data, pairs)
    G = t.global_batch_groups
    max_steps = t.max_steps or math.ceil(t.epochs * len(train_views) / G)

    # ---- models and optimizer ----
    policy = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed).to(world.device)
    ref = None
    if spec.needs_reference:  # a frozen copy of the starting weights
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer, params)
    state = TrainState()
    resume_from = resolve_resume(t.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer)
        log.info("resumed from %s at step %d (%d views consumed)", resume_from, state.step,
                 state.consumed)
    policy.train()
    logger = build_logger(cfg.logger, run_dir, cfg)
    eval_kwargs = dict(batch_groups=t.eval_batch_groups, pad_id=tok.pad_token_id,
                       chunk_size=t.logps_chunk_size, autocast=autocast)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(policy, ref, eval_data, eval_views, spec, loss_fn, **eval_kwargs)
        logger.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        return metrics

    eval_before = run_eval() if state.step == 0 else None
    best_eval = eval_before
    preempt = Preemption()
    bar = tqdm(total=max_steps, initial=state.step, disable=not (t.progress and parallel.is_main()),
               dynamic_ncols=True)
    consecutive_skips = 0

    # ---- training loop ----
    while state.step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(state.step, cfg.optimizer.lr, t, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_views = views_at(len(train_views), cfg.seed, state.consumed, G)
        sums, finite = MetricSums(), True
        for start in range(0, G, t.micro_batch_groups):
            micro = [train_views[i] for i in step_views[start : start + t.micro_batch_groups]]
            batch = collate([(group_at(train_data, r), idx) for r, idx in micro],
                            tok.pad_token_id).to(world.device)
            with autocast:
                out = forward_loss(policy, ref, batch, spec, loss_fn, t.logps_chunk_size)
            loss_sum = out.losses[out.valid].sum()
            if not torch.isfinite(loss_sum):
                finite = False
                break
            if out.valid.any():
                loss_sum.backward()
            sums.add(out, batch.num_tokens)
        metrics = sums.finish()
        n_valid = metrics["valid_groups"]
        grad_norm = math.nan
        if finite and n_valid > 0:
            for p in params:  # one normalisation for accumulation and ranks: mean over valid groups
                if p.grad is not None:
                    p.grad.div_(n_valid)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        if finite and n_valid > 0 and math.isfinite(grad_norm):
            optimizer.step()
            consecutive_skips = 0
        else:
            state.skipped_steps += 1
            consecutive_skips += 1
            log.warning("step %d skipped: loss finite=%s, valid groups=%d, grad norm=%s",
                        state.step, finite, n_valid, grad_norm)
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise FloatingPointError(f"{consecutive_skips} consecutive steps were skipped "
                                         "(non-finite loss or gradient); stopping")
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.consumed += G
        state.tokens += int(metrics["tokens"])
        dt = time.perf_counter() - t0
        state.wall_time += dt

        # ---- log, eval, checkpoint ----
        if state.step % t.log_every == 0 or state.step == max_steps:
            logger.log({**{f"train/{k}": v for k, v in metrics.items()}, "train/lr": lr,
                        "train/grad_norm": grad_norm, "train/skipped_steps": state.skipped_steps,
                        "perf/tokens_per_s": metrics["tokens"] / dt}, step=state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.4f}",
                        tok_s=f"{metrics['tokens'] / dt:.0f}")
        if t.eval_every and state.step % t.eval_every == 0 and state.step < max_steps:
            m = run_eval()
            if best_eval is None or m["loss"] < best_eval["loss"]:
                best_eval = m
        stop = preempt.requested or (t.stop_at_step and state.step >= t.stop_at_step)
        if (t.save_every and state.step % t.save_every == 0) or stop or state.step == max_steps:
            save_checkpoint(run_dir, policy, optimizer, state, t.keep_last)
        if stop and state.step < max_steps:
            log.warning("stopping at step %d; rerun with the same run dir to resume", state.step)
            bar.close()
            logger.close()
            return {}
    bar.close()

    # ---- final eval, export, summary ----
    eval_after = run_eval()
    if best_eval is None or eval_after["loss"] <= best_eval["loss"]:
        best_eval = eval_after
    if eval_before is not None:
        print_eval("held-out metrics", eval_before, eval_after)
    else:
        print_eval("held-out metrics (after)", eval_after, None)
    if t.export_final and parallel.is_main():
        policy.save_pretrained(Path(run_dir, "final"))
        tok.save_pretrained(Path(run_dir, "final"))
    summary = {
        "overrides": overrides or [], "loss": spec.name, "steps": state.step,
        "skipped_steps": state.skipped_steps, "tokens": state.tokens,
        "train_wall_time_s": state.wall_time, "commit": git_commit(), "data_counts": dict(counts),
        "eval_before": eval_before, "eval_final": eval_after, "eval_best": best_eval,
    }
    Path(run_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return eval_after


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        metrics = run(cfg, list(HydraConfig.get().overrides.task))
    finally:
        parallel.destroy()
    return metrics.get("loss", math.nan)


if __name__ == "__main__":
    main()
