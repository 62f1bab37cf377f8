"""Train a causal LM on multi-response preference data with any registered loss.

    python -m prefopt.train                                   # embedded default (CPU, offline)
    python -m prefopt.train loss=simpo model=tiny trainer=debug
    python -m prefopt.train loss=dpo model=llama3_8b_instruct dataset=ultrafeedback_binarized \
        trainer=gpu logger=wandb
    python -m prefopt.train hydra.run.dir=outputs/refa_dynamic/<run>   # resume that run

One step: take ``global_batch_groups`` views from the endless, seeded epoch stream; let the loss's
step extras (``prefopt.train.extras``: KTO's KL baseline, SPO's KL term) see the whole step once;
for each micro-batch run one forward over all its responses (and the frozen reference when the
loss needs it), compute per-group losses, backward their sum; then divide the gradients by the
number of valid groups of the whole step, add the extras' regularizer, clip, and step. A step
whose loss or gradient is not finite is dropped before the optimizer sees it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import prefopt.losses  # noqa: F401  (registers loss schemas before composition)
from prefopt.checks import validate, validate_batching
from prefopt.data.collate import views_at
from prefopt.errors import HubError, TrainingError
from prefopt.losses import build_loss
from prefopt.model import parallel
from prefopt.model.load import load_tokenizer
from prefopt.train.banner import announce, run_facts, show_first_batch
from prefopt.train.checkpoint import (
    Preemption,
    TrainState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from prefopt.train.extras import ExtraEnv, StepExtras, StepRows
from prefopt.train.heldout import evaluate
from prefopt.train.logger import SweepInfo, build_logger
from prefopt.train.optim import build_optimizer, lr_at, set_lr
from prefopt.train.passes import PassOptions
from prefopt.train.plan import format_plan, plan_for_run
from prefopt.train.setup import build_models, make_autocast, prepare_data
from prefopt.train.step import LossContext, StepContext, step_micro_batches, train_step
from prefopt.train.summary import best_of, export, git_commit, peak_memory_gib, print_eval

log = logging.getLogger("prefopt")
MAX_CONSECUTIVE_SKIPS = 10


def count_skip(state: TrainState, consecutive: int, lr: float) -> int:
    """Record a skipped step; stop the run after ``MAX_CONSECUTIVE_SKIPS`` in a row."""
    state.skipped_steps += 1
    log.warning("step %d skipped: no valid group, or a non-finite loss or gradient", state.step)
    if consecutive + 1 >= MAX_CONSECUTIVE_SKIPS:
        raise TrainingError(
            f"{consecutive + 1} consecutive steps skipped, up to step {state.step + 1} at learning "
            f"rate {lr:.3g}: the loss or the gradient was not finite, or no group was valid",
            fix="lower optimizer.lr (diverging weights); if the first steps fail too, check the "
            "data's scores, or train in fp32 (trainer.precision=fp32)",
        )
    return consecutive + 1


def run(  # noqa: C901  (one function from build to summary, read top to bottom)
    composed: DictConfig, overrides: list[str] | None = None, sweep: SweepInfo | None = None
) -> dict[str, float]:
    """Train as the composed config says; return the final held-out metrics ({} when stopped
    early). The config is checked and made typed here, once: below, each part is a dataclass."""
    cfg = validate(composed)  # TrainConfig; cfg.loss is the loss's own dataclass
    t = cfg.trainer
    world = parallel.init_distributed(t.device, t.collective_timeout_s)
    validate_batching(t, world.world_size)
    torch.manual_seed(cfg.seed)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run_dir = cfg.run_dir
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    precision = parallel.resolve_precision(world.device, t.precision, t.master_dtype)
    autocast = make_autocast(precision, world.device)

    # ---- loss, memory plan, tokenizer, data, models, optimizer ----
    spec, loss_fn = build_loss(cfg.loss)
    # The plan needs only the model's config and the trainer's lengths: it refuses what cannot
    # fit before the data is tokenized and any weight is allocated (every rank, so all stop).
    memory = plan_for_run(cfg, world)
    plan_text = f"memory plan per GPU ({world.world_size} rank(s)):\n{format_plan(memory)}"
    with parallel.main_first():  # rank 0 converts and tokenizes once; the others read the cache
        try:
            tok = load_tokenizer(cfg.model, cfg.cache_dir)
            data = prepare_data(cfg, tok, spec)
        except HubError:  # offline: a dry run still shows the plan (shipped shapes) before it
            if t.dry_run and parallel.is_main():
                print(plan_text, flush=True)
            raise
    G = t.global_batch_groups
    max_steps = t.max_steps or math.ceil(t.epochs * len(data.train_views) / G)
    # ---- banner (rank 0, summary.json); the dry run stops here, before any weight is read ----
    # the plan counted the parameters on the meta device already: the banner reuses the count
    facts = run_facts(cfg, tok, data, spec, world, max_steps, plan_text, memory.params)
    announce(facts, run_dir, "dry_run" if t.dry_run else "running")
    if t.dry_run:
        first_views = views_at(len(data.train_views), cfg.seed, 0, G)
        show_first_batch(step_micro_batches(t, data, first_views, world, tok.pad_token_id))
        return {}
    # no-grad passes (evaluation, reference log-probs, the loss's extras): batch, chunk, share
    passes = PassOptions.of(t, tok.pad_token_id, autocast)
    policy, ref, data = build_models(cfg, spec, tok, data, world, precision, passes)
    # what the loss declares beyond (policy, ref, scores): per-step inputs and regularizers
    extras = StepExtras.build(spec, cfg.loss, ExtraEnv(ref, passes, tok.eos_token_id))
    optimizer = build_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad])
    state = TrainState(
        loss_state=spec.init_state(cfg.loss) if spec.state else {}, world_size=world.world_size
    )
    resume_from = resolve_resume(t.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer, world.world_size)
        log.info("resumed from %s at step %d", resume_from, state.step)
    policy.train()
    logger = build_logger(cfg.logger, run_dir, dataclasses.asdict(cfg), sweep)

    # what the loss needs besides the models and a batch: the same in the step and the evaluation
    step_ctx = StepContext(
        LossContext(spec, loss_fn, t.logps_chunk_size),
        autocast,
        t.max_grad_norm,
        sync_every_micro_batch=t.grad_sync == "every",
    )
    eval_rows = StepRows.split(data.eval, data.eval_views)

    def run_eval() -> dict[str, float]:
        ctx = dataclasses.replace(step_ctx.loss, state=state.loss_state)
        metrics = evaluate(policy, ref, eval_rows, ctx, passes, extras)
        logger.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        return metrics

    eval_before = run_eval() if state.step == 0 else None
    best_eval = eval_before
    preempt = Preemption()
    bar = tqdm(
        total=max_steps,
        initial=state.step,
        dynamic_ncols=True,
        disable=not (t.progress and parallel.is_main()),
    )
    consecutive_skips = 0

    # ---- training loop ----
    while state.step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(state.step, cfg.optimizer.lr, t, max_steps)
        set_lr(optimizer, lr)
        # Every rank draws the same global order and takes its slice of it.
        step_views = views_at(len(data.train_views), cfg.seed, state.consumed, G)
        micro_batches = step_micro_batches(t, data, step_views, world, tok.pad_token_id)
        # the extras see the whole step (all ranks' views), once, before its first micro-batch
        rows = StepRows(data.train, data.train_views, step_views, state.step)
        inputs = extras.inputs(policy, rows)
        regularizer = extras.regularizer(policy, rows, state.extra_state)
        ctx = step_ctx.for_step(state.loss_state, inputs, regularizer)
        metrics, applied, stop_signal, stat_sums = train_step(
            policy, ref, micro_batches, ctx, preempt.requested
        )
        if applied:
            optimizer.step()
            if spec.state is not None:
                state.loss_state = spec.update_state(state.loss_state, stat_sums, cfg.loss)
            consecutive_skips = 0
        else:  # never let a NaN reach the weights; the data is consumed all the same
            consecutive_skips = count_skip(state, consecutive_skips, lr)
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.consumed += G
        state.tokens += int(metrics["tokens"])
        dt = time.perf_counter() - t0
        state.wall_time += dt

        # ---- log, eval, checkpoint ----
        if state.step % t.log_every == 0 or state.step == max_steps:
            logger.log(
                {
                    **{f"train/{k}": v for k, v in metrics.items()},
                    "train/lr": lr,
                    "train/skipped_steps": state.skipped_steps,
                    "perf/tokens_per_s": metrics["tokens"] / dt,
                },
                step=state.step,
            )
        bar.update(1)
        bar.set_postfix(
            loss=f"{metrics.get('loss', math.nan):.4f}", tok_s=f"{metrics['tokens'] / dt:.0f}"
        )
        if t.eval_every and state.step % t.eval_every == 0 and state.step < max_steps:
            best_eval = best_of(best_eval, run_eval())
        # A signal seen by any rank stops all of them after the same step (agreed in train_step).
        stop = stop_signal or (t.stop_at_step and state.step >= t.stop_at_step)
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
        merged = cfg.model.lora is not None and cfg.model.lora.export_merged  # LoRA
        export(policy, tok, Path(run_dir, "final"), merged)
    peaks = parallel.all_gather_objects(peak_memory_gib(world.device))  # every rank takes part
    if parallel.is_main():
        print_eval("held-out metrics", eval_before, eval_after)
        summary = {
            "status": "ok",
            "overrides": overrides or [],
            "loss": spec.name,
            "steps": state.step,
            "skipped_steps": state.skipped_steps,
            "tokens": state.tokens,
            "train_wall_time_s": state.wall_time,
            "world_size": world.world_size,
            "commit": git_commit(),
            "data_counts": dict(data.counts),
            "eval_before": eval_before,
            "eval_final": eval_after,
            "eval_best": best_eval,
            "peak_memory_gib_per_rank": peaks,
            "banner": facts.as_dict(),
        }
        Path(run_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return eval_after
