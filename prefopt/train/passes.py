"""No-grad passes over a split: their settings (``PassOptions``) and held-out evaluation."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import NamedTuple

import datasets
import torch

from prefopt.data.loading import View
from prefopt.data.packing import batches
from prefopt.losses import LossSpec
from prefopt.losses.registry import LossFn, LossState
from prefopt.model import parallel
from prefopt.model.logprobs import StatsModel
from prefopt.model.parallel import rank_slice
from prefopt.train.extras import StepExtras, StepRows
from prefopt.train.metrics import MetricSums
from prefopt.train.step import forward_loss


class PassOptions(NamedTuple):
    """How a no-grad pass over a split runs (evaluation, reference log-probs, step extras):
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
    extras: StepExtras | None = None,
) -> dict[str, float]:
    """Mean loss and metrics over every valid held-out group (same definitions as training),
    each rank taking a slice; the padding that evens out the slices is not counted. The loss's
    ``extras`` give their inputs once for the whole split (KTO's ``kl_estimate``)."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    device = next(policy.parameters()).device
    rows = StepRows(data, views, list(range(len(views))))
    inputs = extras.inputs(policy, rows) if extras else {}
    order, own = rank_slice(len(views), opts.rank, opts.world_size)
    size = opts.batch_groups
    for start, batch in zip(
        range(0, len(order), size),
        batches(data, views, order, size, opts.pad_id, device, opts.layout),
        strict=True,
    ):
        with opts.autocast:
            out = forward_loss(
                policy, ref, batch, spec, loss_fn, opts.chunk_size, loss_state, inputs
            )
        keep = torch.arange(start, start + batch.num_groups, device=out.valid.device) < own
        sums.add(out, batch.num_tokens, keep)
    policy.train(was_training)
    parallel.reshard(policy)
    return sums.finish()
