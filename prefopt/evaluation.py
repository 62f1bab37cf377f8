"""Forward + loss for one batch, shared by training and evaluation, and held-out evaluation."""

from __future__ import annotations

from contextlib import AbstractContextManager

import datasets
import torch

from prefopt import parallel
from prefopt.data.collate import Batch
from prefopt.data.loading import View, group_at
from prefopt.data.packing import collate_layout
from prefopt.losses import LossSpec
from prefopt.losses.registry import LossFn, LossState
from prefopt.metrics import MetricSums
from prefopt.parallel import StatsModel
from prefopt.types import LossOutput


def forward_loss(
    policy: StatsModel,
    ref: StatsModel | None,
    batch: Batch,
    spec: LossSpec,
    loss_fn: LossFn,
    chunk_size: int,
    loss_state: LossState | None = None,
) -> LossOutput:
    stats = policy(batch, chunk_size)
    ref_stats = None
    if spec.needs_reference and batch.ref_logps is not None:  # trainer.reference=precompute
        ref_stats = stats._replace(
            logps=batch.ref_logps.to(stats.logps.dtype),
            eos_logps=batch.ref_eos_logps.to(stats.logps.dtype),
        ).detach()
    elif spec.needs_reference:
        with torch.no_grad():
            ref_stats = ref(batch, chunk_size)
    extra = {}
    if spec.state is not None:
        extra["state"] = loss_state
    if spec.needs_mismatched:  # KTO: detached KL baseline from mismatched (prompt, response)
        with torch.no_grad():
            mismatched = batch.mismatched
            extra["mismatched_log_ratio"] = (
                policy(mismatched, chunk_size).logps - ref(mismatched, chunk_size).logps
            )
    return loss_fn(stats, ref_stats, batch.scores, **extra)


def batches(
    data: datasets.Dataset,
    views: list[View],
    order: list[int],
    size: int,
    pad_id: int,
    device: torch.device | str,
    mismatched: bool = False,
    layout: str = "padded",
):
    """Collated batches of ``size`` views taken in ``order``, in ``layout``."""
    for start in range(0, len(order), size):
        chunk = [views[i] for i in order[start : start + size]]
        groups = [(group_at(data, row), idx) for row, idx in chunk]
        yield collate_layout(groups, pad_id, layout, mismatched).to(device)


def rank_slice(n: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's share of ``range(n)`` padded (by wrapping around) to the same length on every
    rank, so all ranks run the same number of sharded forwards; and how many are its own."""
    own = list(range(rank, n, world_size))
    width = -(-n // world_size)
    return own + [(rank + world_size * i) % n for i in range(len(own), width)], len(own)


@torch.no_grad()
def evaluate(
    policy: StatsModel,
    ref: StatsModel | None,
    data: datasets.Dataset,
    views: list[View],
    spec: LossSpec,
    loss_fn: LossFn,
    *,
    batch_groups: int,
    pad_id: int,
    chunk_size: int,
    autocast: AbstractContextManager,
    loss_state: LossState | None = None,
    rank: int = 0,
    world_size: int = 1,
    layout: str = "padded",
) -> dict[str, float]:
    """Mean loss and metrics over every valid held-out group (same definitions as training),
    each rank taking a slice; the padding that evens out the slices is not counted."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    device = next(policy.parameters()).device
    order, own = rank_slice(len(views), rank, world_size)
    for start, batch in zip(range(0, len(order), batch_groups),
                            batches(data, views, order, batch_groups, pad_id, device,
                                    spec.needs_mismatched, layout), strict=True):  # fmt: skip
        with autocast:
            out = forward_loss(policy, ref, batch, spec, loss_fn, chunk_size, loss_state)
        keep = torch.arange(start, start + batch.num_groups, device=out.valid.device) < own
        sums.add(out, batch.num_tokens, keep)
    policy.train(was_training)
    parallel.reshard(policy)
    return sums.finish()
