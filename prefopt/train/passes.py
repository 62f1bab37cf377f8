"""Forward + loss for one batch, shared by training and evaluation, and held-out evaluation."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import NamedTuple

import datasets
import torch
from torch import Tensor

from prefopt.data.loading import View
from prefopt.data.packing import batches
from prefopt.losses import LossSpec
from prefopt.losses.registry import LossFn, LossState
from prefopt.model import parallel
from prefopt.model.parallel import StatsModel, rank_slice
from prefopt.train.metrics import MetricSums
from prefopt.train.mismatched import kl_estimate
from prefopt.train.step import forward_loss


class PassOptions(NamedTuple):
    """How a no-grad pass over a split runs (evaluation, reference log-probs, KTO's baseline):
    groups per forward, padding id, log-prob chunk, precision, this rank's share, layout."""

    batch_groups: int
    pad_id: int
    chunk_size: int
    autocast: AbstractContextManager
    rank: int = 0
    world_size: int = 1
    layout: str = "padded"

    @classmethod
    def of(cls, t, pad_id: int, autocast: AbstractContextManager, world) -> PassOptions:
        """From ``trainer`` settings and the ``parallel.World`` (rank, ranks)."""
        return cls(
            t.eval_batch_groups,
            pad_id,
            t.logps_chunk_size,
            autocast,
            world.rank,
            world.world_size,
            t.layout,
        )


def step_inputs(
    policy: StatsModel,
    ref: StatsModel | None,
    data: datasets.Dataset,
    views: list[View],
    order: list[int],
    spec: LossSpec,
    opts: PassOptions,
) -> dict[str, Tensor]:
    """Loss inputs computed once over a whole step (or evaluation set), not per micro-batch:
    KTO's ``kl_estimate`` over the mismatched pairs of ``order`` (all ranks together)."""
    if not spec.needs_mismatched:
        return {}
    return {"kl_estimate": kl_estimate(policy, ref, data, views, order, opts)}


@torch.no_grad()
def evaluate(
    policy: StatsModel,
    ref: StatsModel | None,
    data: datasets.Dataset,
    views: list[View],
    spec: LossSpec,
    loss_fn: LossFn,
    opts: PassOptions,
    loss_state: LossState | None = None,
) -> dict[str, float]:
    """Mean loss and metrics over every valid held-out group (same definitions as training),
    each rank taking a slice; the padding that evens out the slices is not counted."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    device = next(policy.parameters()).device
    extra = step_inputs(policy, ref, data, views, list(range(len(views))), spec, opts)
    order, own = rank_slice(len(views), opts.rank, opts.world_size)
    size = opts.batch_groups
    for start, batch in zip(
        range(0, len(order), size),
        batches(data, views, order, size, opts.pad_id, device, opts.layout),
        strict=True,
    ):
        with opts.autocast:
            out = forward_loss(
                policy, ref, batch, spec, loss_fn, opts.chunk_size, loss_state, extra
            )
        keep = torch.arange(start, start + batch.num_groups, device=out.valid.device) < own
        sums.add(out, batch.num_tokens, keep)
    policy.train(was_training)
    parallel.reshard(policy)
    return sums.finish()
