"""Held-out evaluation: the loss and its metrics over every valid group of a split, with the
training step's own ``forward_loss`` and ``LossContext``, so both measure the same thing."""

from __future__ import annotations

from dataclasses import replace

import torch

from prefopt.data.collate import Group
from prefopt.data.loading import view_group
from prefopt.model.logprobs import StatsModel
from prefopt.train.extras import StepExtras, StepRows
from prefopt.train.metrics import MetricSums
from prefopt.train.passes import PassOptions, evaluating, rank_batches
from prefopt.train.step import LossContext, forward_loss


@torch.no_grad()
def evaluate(
    policy: StatsModel,
    ref: StatsModel | None,
    rows: StepRows,
    ctx: LossContext,
    opts: PassOptions,
    extras: StepExtras | None = None,
) -> dict[str, float]:
    """Mean loss and metrics over every valid group of ``rows`` (a split and its views), in eval
    mode, each rank taking a slice; the padding that evens out the slices is not counted. The
    loss's ``extras`` give their inputs once for the whole split (KTO's ``kl_estimate``)."""
    data, views, order = rows.data, rows.views, rows.order
    sums = MetricSums()
    with evaluating(policy):
        if extras:
            ctx = replace(ctx, inputs=extras.inputs(policy, rows))

        def group(i: int) -> Group:
            return view_group(data, views[order[i]])

        for p in rank_batches(len(order), group, policy, opts):
            with opts.autocast:
                out = forward_loss(policy, ref, p.batch, ctx)
            keep = torch.arange(p.batch.num_groups, device=out.valid.device) < p.own
            sums.add(out, p.batch.num_tokens, keep)
    return sums.finish()
