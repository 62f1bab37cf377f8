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

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import prefopt.losses  # noqa: F401  (registers loss schemas before composition)
from prefopt import parallel
from prefopt.banner import announce, run_facts, show_first_batch
from prefopt.build import (
    Preemption,
    best_of,
    build_models,
    export,
    git_commit,
    make_autocast,
    prepare_data,
    print_eval,
    validate,
    validate_batching,
)
from prefopt.checkpoint import (
    TrainState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from prefopt.data.collate import Batch, views_at
from prefopt.data.loading import DataSplits
from prefopt.data.packing import PackedBatch, budget_batches
from prefopt.evaluation import batches, evaluate, forward_loss
from prefopt.logger import SweepInfo, build_logger
from prefopt.losses import LossSpec, build_loss
from prefopt.losses.registry import LossFn, LossState
from prefopt.metrics import MetricSums
from prefopt.models import load_tokenizer
from prefopt.onpolicy import OnPolicyKL
from prefopt.optim import build_optimizer, lr_at
from prefopt.parallel import StatsModel

log = logging.getLogger("prefopt")
MAX_CONSECUTIVE_SKIPS = 10


def step_micro_batches(
    t: DictConfig, data: DataSplits, step_views: list[int], world: parallel.World, pad_id: int,
    mismatched: bool,
) -> list[Batch | PackedBatch]:  # fmt: skip
    """This rank's micro-batches of a step, in ``trainer.layout``: filled to
    ``micro_batch_tokens`` (planned over the whole step, so every rank runs as many), or
    ``micro_batch_groups`` views at a time from the rank's slice of the step."""
    if t.micro_batch_tokens:
        return budget_batches(data.train, data.train_views, step_views, t.micro_batch_tokens,
                              t.layout, pad_id, world.device, mismatched, world.rank,
                              world.world_size)  # fmt: skip
    order = step_views[world.rank :: world.world_size]
    return list(batches(data.train, data.train_views, order, t.micro_batch_groups, pad_id,
                        world.device, mismatched, t.layout))  # fmt: skip


class StepResult(NamedTuple):
    metrics: dict[str, float]
    grad_norm: float  # NaN: the step must not be applied
    stat_sums: dict[str, torch.Tensor]  # reduced LossOutput.stat_updates (stateful losses)


def train_step(
    policy: StatsModel,
    ref: StatsModel | None,
    micro_batches: list[Batch | PackedBatch],
    spec: LossSpec,
    loss_fn: LossFn,
    t: DictConfig,
    autocast: AbstractContextManager,
    loss_state: LossState | None = None,
    regularizer: Callable[[], float] | None = None,
) -> StepResult:
    """Accumulate gradients over the micro-batches, normalise by the step's valid groups, clip.

    The gradient norm is NaN when the step must not be applied: a non-finite loss or gradient,
    or no valid group. ``regularizer`` (SPO's on-policy KL) is a per-step term, not per group:
    it backpropagates itself when finite and returns its value.
    """
    sums = MetricSums()
    for i, batch in enumerate(micro_batches):
        # Reduce-scatter gradients once per step; every rank runs the same number of micro-batches.
        parallel.set_gradient_sync(policy, i == len(micro_batches) - 1)
        with autocast:
            out = forward_loss(policy, ref, batch, spec, loss_fn, t.logps_chunk_size, loss_state)
        loss_sum = out.losses[out.valid].sum()
        if not parallel.all_ranks(bool(torch.isfinite(loss_sum))):  # the loop zeroes the grads
            return StepResult(sums.finish(), math.nan, {})
        loss_sum.backward()  # on every rank, even with no valid group here (sharded collectives)
        sums.add(out, batch.num_tokens)
    metrics = sums.finish()
    if metrics["valid_groups"] == 0:
        return StepResult(metrics, math.nan, {})
    for p in policy.parameters():  # one normalisation for accumulation and ranks
        if p.grad is not None:
            p.grad.div_(metrics["valid_groups"])
    if regularizer is not None:  # a per-step term (SPO's KL), added after the normalisation
        with autocast:
            # backpropagated inside when finite; each rank has its own samples: log their mean
            metrics["regularizer"] = parallel.all_reduce_mean(regularizer())
        if not math.isfinite(metrics["regularizer"]):
            return StepResult(metrics, math.nan, {})
    params = [p for p in policy.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return StepResult(metrics, grad_norm, sums.stat_sums())


def run(  # noqa: C901  (the banner's dry-run exit; the loop's rewrite will split run)
    cfg: DictConfig, overrides: list[str] | None = None, sweep: SweepInfo | None = None
) -> dict[str, float]:
    """Train as ``cfg`` says; return the final held-out metrics ({} when stopped early)."""
    validate(cfg)
    t = cfg.trainer
    world = parallel.init_distributed(t.device, t.collective_timeout_s)
    validate_batching(t, world.world_size)
    torch.manual_seed(cfg.seed)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run_dir = cfg.run_dir
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    autocast = make_autocast(world.device, t.precision)

    # ---- loss, tokenizer, data, models, optimizer ----
    spec, loss_fn = build_loss(cfg.loss)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    data = prepare_data(cfg, tok, spec)
    G = t.global_batch_groups
    max_steps = t.max_steps or math.ceil(t.epochs * len(data.train_views) / G)
    # ---- banner (rank 0, summary.json); the dry run stops here, before any weight is read ----
    facts = run_facts(cfg, tok, data, spec, world, max_steps, plan=None)
    announce(facts, run_dir, "dry_run" if t.dry_run else "running")
    if t.dry_run:
        first_views = views_at(len(data.train_views), cfg.seed, 0, G)
        show_first_batch(
            step_micro_batches(t, data, first_views, world, tok.pad_token_id, spec.needs_mismatched)
        )
        return {}
    policy, ref, data = build_models(cfg, spec, tok, data, world, autocast)
    optimizer = build_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad])
    hparams = spec.hparams(cfg.loss)
    state = TrainState(loss_state=spec.state.init(**hparams) if spec.state else {},
                       world_size=world.world_size)  # fmt: skip
    resume_from = resolve_resume(t.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer, world.world_size)
        log.info("resumed from %s at step %d", resume_from, state.step)
    policy.train()
    logger = build_logger(cfg.logger, run_dir, cfg, sweep)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(policy, ref, data.eval, data.eval_views, spec, loss_fn,
                           batch_groups=t.eval_batch_groups, pad_id=tok.pad_token_id,
                           chunk_size=t.logps_chunk_size, autocast=autocast,
                           loss_state=state.loss_state, rank=world.rank,
                           world_size=world.world_size, layout=t.layout)  # fmt: skip
        logger.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        return metrics

    kl = OnPolicyKL.build(spec, cfg.loss, ref, tok, t.logps_chunk_size)
    eval_before = run_eval() if state.step == 0 else None
    best_eval = eval_before
    preempt = Preemption()
    bar = tqdm(total=max_steps, initial=state.step, dynamic_ncols=True,
               disable=not (t.progress and parallel.is_main()))  # fmt: skip
    consecutive_skips = 0

    # ---- training loop ----
    while state.step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(state.step, cfg.optimizer.lr, t, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every rank draws the same global order and takes its slice of it.
        step_views = views_at(len(data.train_views), cfg.seed, state.consumed, G)
        order = step_views[world.rank :: world.world_size]  # this rank's groups
        micro_batches = step_micro_batches(t, data, step_views, world, tok.pad_token_id,
                                           spec.needs_mismatched)  # fmt: skip
        regularizer = kl.prepare(policy, state, [data.train[data.train_views[i][0]]["prompt_ids"]
                                                 for i in order]) if kl else None  # fmt: skip
        metrics, grad_norm, stat_sums = train_step(
            policy, ref, micro_batches, spec, loss_fn, t, autocast, state.loss_state, regularizer
        )
        if math.isfinite(grad_norm):
            optimizer.step()
            if spec.state is not None:
                state.loss_state = spec.state.update(state.loss_state, stat_sums, **hparams)
            consecutive_skips = 0
        else:  # never let a NaN reach the weights; the data is consumed all the same
            state.skipped_steps += 1
            consecutive_skips += 1
            log.warning("step %d skipped: no valid group, or a non-finite loss or gradient",
                        state.step)  # fmt: skip
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise FloatingPointError(f"{consecutive_skips} consecutive steps skipped; stopping")
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
                        "perf/tokens_per_s": metrics["tokens"] / dt}, step=state.step)  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.4f}",
                        tok_s=f"{metrics['tokens'] / dt:.0f}")  # fmt: skip
        if t.eval_every and state.step % t.eval_every == 0 and state.step < max_steps:
            best_eval = best_of(best_eval, run_eval())
        stop = preempt.requested or (t.stop_at_step and state.step >= t.stop_at_step)
        if (t.save_every and state.step % t.save_every == 0) or stop or state.step == max_steps:
            save_checkpoint(run_dir, policy, optimizer, state, t.keep_last)
        if stop and state.step < max_steps:
            log.warning("stopped at step %d; rerun with the same run dir to resume", state.step)
            bar.close()
            logger.close()
            return {}
    bar.close()

    # ---- final eval, export, summary ----
    eval_after = run_eval()
    best_eval = best_of(best_eval, eval_after)
    if t.export_final:
        export(policy, tok, Path(run_dir, "final"))
    if parallel.is_main():
        print_eval(
            "held-out metrics", eval_before or eval_after, eval_after if eval_before else None
        )
        summary = {
            "status": "ok", "overrides": overrides or [], "loss": spec.name, "steps": state.step,
            "skipped_steps": state.skipped_steps, "tokens": state.tokens,
            "train_wall_time_s": state.wall_time, "world_size": world.world_size,
            "commit": git_commit(), "data_counts": dict(data.counts), "eval_before": eval_before,
            "eval_final": eval_after, "eval_best": best_eval,
        }  # fmt: skip
        Path(run_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return eval_after
