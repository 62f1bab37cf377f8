"""One optimizer step, top to bottom: this rank's micro-batches, a forward to per-group
statistics (and the reference's), the loss, one backward per micro-batch, one normalisation by
the step's valid groups, the loss extras' per-step regularizer if any, clipping, and one
decision all ranks share. ``prefopt/train/loop.py`` calls it once per step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from prefopt.config import TrainerConfig
from prefopt.data.batching import Batching, batches, budget_batches
from prefopt.data.collate import Batch
from prefopt.data.loading import DataSplits
from prefopt.data.packing import PackedBatch
from prefopt.losses import LossSpec
from prefopt.losses.registry import LossFn, LossState
from prefopt.model import parallel
from prefopt.model.logprobs import StatsModel
from prefopt.train.metrics import MetricSums
from prefopt.types import LossOutput


def step_micro_batches(
    t: TrainerConfig, data: DataSplits, step_views: list[int], world: parallel.World, pad_id: int
) -> list[Batch | PackedBatch]:
    """This rank's micro-batches of a step, in ``trainer.layout``: filled to
    ``micro_batch_tokens`` (planned over the whole step, so every rank runs as many), or
    ``micro_batch_groups`` views at a time from the rank's slice of the step."""
    how = Batching(t.layout, pad_id, world.device, world.rank, world.world_size)
    if t.micro_batch_tokens:
        return budget_batches(data.train, data.train_views, step_views, t.micro_batch_tokens, how)
    order = step_views[world.rank :: world.world_size]
    return list(batches(data.train, data.train_views, order, t.micro_batch_groups, how))


@dataclass(frozen=True)
class LossContext:
    """What turns a batch's statistics into its loss, the same in a training step and in a
    held-out evaluation (``prefopt.train.heldout``)."""

    spec: LossSpec
    fn: LossFn  # the loss with its hyperparameters bound (``build_loss``)
    chunk_size: int  # response tokens per log-prob chunk
    state: LossState | None = None  # running statistics of stateful losses
    # The loss extras' keyword inputs for this step or evaluation pass (KTO's kl_estimate).
    inputs: dict[str, Tensor] = field(default_factory=dict)


def forward_loss(
    policy: StatsModel, ref: StatsModel | None, batch: Batch | PackedBatch, ctx: LossContext
) -> LossOutput:
    """The batch's statistics (and the reference's: cached in the batch, or a no-grad forward of
    the frozen reference), then the loss with the context's state and extras' inputs."""
    stats = policy(batch, ctx.chunk_size)
    ref_stats = None
    if ctx.spec.needs_reference and batch.ref_logps is not None:  # trainer.reference=precompute
        ref_stats = stats._replace(
            logps=batch.ref_logps.to(stats.logps.dtype),
            eos_logps=batch.ref_eos_logps.to(stats.logps.dtype),
        ).detach()
    elif ctx.spec.needs_reference:
        with torch.no_grad():
            ref_stats = ref(batch, ctx.chunk_size)
    kwargs = dict(ctx.inputs)
    if ctx.spec.state is not None:
        kwargs["state"] = ctx.state
    return ctx.fn(stats, ref_stats, batch.scores, **kwargs)


@dataclass(frozen=True)
class StepContext:
    """What one optimizer step needs besides the models and its micro-batches: the run's
    settings (``loop.py`` builds it once) and, per step, ``for_step``'s values."""

    loss: LossContext
    autocast: AbstractContextManager
    max_grad_norm: float
    # trainer.grad_sync=every: reduce-scatter each micro-batch's gradients (they accumulate
    # sharded); False (``last``): only the last one's (FSDP2 accumulates them unsharded)
    sync_every_micro_batch: bool = True
    # The loss extras' per-step term that is not per group (``StepExtras.regularizer``: SPO's
    # on-policy KL): it runs its own backward after the group losses are normalised and returns
    # its detached per-rank value.
    regularizer: Callable[[], torch.Tensor] | None = None

    def for_step(
        self,
        state: LossState | None,
        inputs: dict[str, Tensor],
        regularizer: Callable[[], Tensor] | None,
    ) -> StepContext:
        """This context for one step: the loss's state and the extras' inputs and term."""
        loss = replace(self.loss, state=state, inputs=inputs)
        return replace(self, loss=loss, regularizer=regularizer)


class StepResult(NamedTuple):
    metrics: dict[str, float]  # averaged over valid groups and ranks, plus counts and grad_norm
    applied: bool  # False: the optimizer must not step (non-finite loss or gradient, no group)
    stop: bool  # some rank was asked to stop (a signal): every rank checkpoints and exits
    stat_sums: dict[str, torch.Tensor]  # reduced LossOutput.stat_updates (stateful losses)


def train_step(
    policy: StatsModel,
    ref: StatsModel | None,
    micro_batches: list[Batch | PackedBatch],
    ctx: StepContext,
    stop_requested: bool = False,
) -> StepResult:
    """Accumulate gradients over the micro-batches, normalise by the step's valid groups, clip,
    and decide once whether the step may be applied.

    Every micro-batch runs its backward on every rank, finite or not: with ``grad_sync=last``
    the last one flushes the gradients FSDP accumulated unsharded into the sharded ones, so a
    skipped step leaves nothing behind (``zero_grad`` clears the sharded ones), and no rank
    leaves a collective the others are in. The decision
    (finite loss, finite gradient norm, at least one valid group) and the stop flag come from one
    reduction all ranks share; the host reads the step's numbers once, at the end.
    """
    sums = MetricSums()
    for i, batch in enumerate(micro_batches):
        # Reduce-scatter each micro-batch (gradients accumulate sharded), or only the last one
        # (trainer.grad_sync=last); every rank runs the same number of micro-batches.
        last = i == len(micro_batches) - 1
        parallel.set_gradient_sync(policy, ctx.sync_every_micro_batch or last)
        with ctx.autocast:
            out = forward_loss(policy, ref, batch, ctx.loss)
        torch.where(out.valid, out.losses, 0.0).sum().backward()
        sums.add(out, batch.num_tokens)
    totals = sums.reduce({"stop": stop_requested})
    valid = totals["valid_groups"]
    params = [p for p in policy.parameters() if p.grad is not None]
    parallel.divide_gradients(params, valid)  # one normalisation for accumulation and ranks
    extra: dict[str, torch.Tensor] = {}
    if ctx.regularizer is not None:  # a per-step term (SPO's KL), added after the normalisation
        with ctx.autocast:
            value = ctx.regularizer()
        extra["regularizer"] = parallel.all_reduce_sum(value.double().clone()) / parallel.size()
    norm = parallel.clip_grad_norm(params, ctx.max_grad_norm)
    ok = torch.isfinite(totals["loss"]) & torch.isfinite(norm) & (valid > 0)
    if "regularizer" in extra:
        ok &= torch.isfinite(extra["regularizer"])
    metrics = totals.read({**extra, "grad_norm": norm, "applied": ok})
    stop = metrics.pop("flag/stop") > 0
    applied = bool(metrics.pop("applied"))
    return StepResult(metrics, applied, stop, sums.stat_sums() if applied else {})
