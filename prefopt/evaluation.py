"""Forward + loss for one batch, shared by training and evaluation, and held-out evaluation."""

from __future__ import annotations

from contextlib import AbstractContextManager

import datasets
import torch
from transformers import PreTrainedModel

from prefopt.data.collate import Batch, collate
from prefopt.data.loading import View, group_at
from prefopt.losses import LossSpec
from prefopt.losses.registry import LossFn, LossState
from prefopt.metrics import MetricSums
from prefopt.stats import group_stats
from prefopt.types import LossOutput


def forward_loss(
    policy: PreTrainedModel,
    ref: PreTrainedModel | None,
    batch: Batch,
    spec: LossSpec,
    loss_fn: LossFn,
    chunk_size: int,
    loss_state: LossState | None = None,
) -> LossOutput:
    stats = group_stats(policy, batch, chunk_size)
    ref_stats = None
    if spec.needs_reference and batch.ref_logps is not None:  # trainer.reference=precompute
        ref_stats = stats._replace(
            logps=batch.ref_logps.to(stats.logps.dtype),
            eos_logps=batch.ref_eos_logps.to(stats.logps.dtype),
        ).detach()
    elif spec.needs_reference:
        with torch.no_grad():
            ref_stats = group_stats(ref, batch, chunk_size)
    extra = {}
    if spec.state is not None:
        extra["state"] = loss_state
    if spec.needs_mismatched:  # KTO: detached KL baseline from mismatched (prompt, response)
        with torch.no_grad():
            mismatched = batch.mismatched
            extra["mismatched_log_ratio"] = (
                group_stats(policy, mismatched, chunk_size).logps
                - group_stats(ref, mismatched, chunk_size).logps
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
):
    """Collated batches of ``size`` views taken in ``order``."""
    for start in range(0, len(order), size):
        chunk = [views[i] for i in order[start : start + size]]
        groups = [(group_at(data, row), idx) for row, idx in chunk]
        yield collate(groups, pad_id, mismatched).to(device)


@torch.no_grad()
def evaluate(
    policy: PreTrainedModel,
    ref: PreTrainedModel | None,
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
) -> dict[str, float]:
    """Mean loss and metrics over every valid held-out group (same definitions as training)."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    device = next(policy.parameters()).device
    order = list(range(len(views)))
    for batch in batches(data, views, order, batch_groups, pad_id, device, spec.needs_mismatched):
        with autocast:
            out = forward_loss(policy, ref, batch, spec, loss_fn, chunk_size, loss_state)
        sums.add(out, batch.num_tokens)
    policy.train(was_training)
    return sums.finish()
