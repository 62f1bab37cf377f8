"""Micro-batch planning: the views of a step (or a pass) -> collated micro-batches.

``batches`` takes views in a given order, a fixed number at a time; ``budget_batches`` fills
micro-batches to a token budget with ``plan_micro_batches``, a pure function of the step's
ordered views, so a resumed run (which replays the same views per step) plans the same
micro-batches, and every rank plans the same split and runs its share. ``Batching`` says how the
chosen groups are laid out (``prefopt.data.packing``) and where they go.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import datasets
import torch

from prefopt.data.collate import Batch, Group
from prefopt.data.loading import View, view_group
from prefopt.data.packing import PackedBatch, collate_layout
from prefopt.data.tokenize import TokenizedGroup


class Batching(NamedTuple):
    """How a run's micro-batches are made: their layout, the padding id, the device, and this
    rank's place among the ranks (a token-budget plan gives each rank its share)."""

    layout: str = "padded"
    pad_id: int = 0
    device: torch.device | str = "cpu"
    rank: int = 0
    world_size: int = 1

    def collate(self, groups: list[Group]) -> Batch | PackedBatch:
        return collate_layout(groups, self.pad_id, self.layout).to(self.device)


class ViewSize(NamedTuple):
    tokens: int  # positions the view adds to a packed row in its layout
    rows: int  # responses (rows of the padded layout)
    width: int  # longest prompt + response: the padded row width the view needs


def view_size(group: TokenizedGroup, idx: Sequence[int], layout: str) -> ViewSize:
    P, R = len(group.prompt_ids), [len(group.response_ids[r]) for r in idx]
    tokens = P + sum(R) if layout == "shared" else sum(P + r for r in R)
    return ViewSize(tokens, len(R), P + max(R))


def _cost(sizes: Sequence[ViewSize], items: list[int], padded: bool) -> int:
    """Positions a micro-batch computes: rows x widest row (padded) or the packed row length."""
    if padded:
        return sum(sizes[i].rows for i in items) * max(sizes[i].width for i in items)
    return sum(sizes[i].tokens for i in items)


def plan_micro_batches(
    sizes: Sequence[ViewSize], budget: int, layout: str = "packed", num_splits: int = 1
) -> list[list[int]]:
    """Split a step's views (``sizes[i]`` for the i-th view) into micro-batches of at most
    ``budget`` forward positions; returns indices into ``sizes``, ascending in each micro-batch.

    Deterministic (a pure function of its inputs; ties broken by index) and exhaustive: every view
    is in exactly one micro-batch, and a view over the budget gets one of its own. Views are
    taken longest first (length grouping): ``padded`` fills micro-batches one after another, so
    similar widths share one and little is padding; the packed layouts fill the first micro-batch
    with room (first-fit decreasing), so few, full rows are run. The number of micro-batches is a
    multiple of ``num_splits`` (ranks; rank r runs ``plan[r::num_splits]``) by halving the largest
    ones, so every rank runs the same number of sharded forwards.
    """
    if budget <= 0:
        raise ValueError(f"the micro-batch token budget must be positive, got {budget}")
    padded = layout == "padded"
    key = (lambda i: sizes[i].width) if padded else (lambda i: sizes[i].tokens)
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-key(i), i)):
        if padded:
            fits = [len(bins) - 1] if bins and _cost(sizes, [*bins[-1], i], True) <= budget else []
        else:
            fits = [j for j, load in enumerate(loads) if load + sizes[i].tokens <= budget][:1]
        if fits:
            bins[fits[0]].append(i)
            loads[fits[0]] += sizes[i].tokens
        else:
            bins.append([i])
            loads.append(sizes[i].tokens)
    while len(bins) % num_splits:
        splittable = [j for j, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            msg = f"{len(sizes)} views cannot make a multiple of {num_splits} micro-batches"
            raise ValueError(f"{msg}; make the global batch a multiple of the ranks")
        j = max(splittable, key=lambda j: (_cost(sizes, bins[j], padded), -j))
        half = len(bins[j]) // 2
        bins[j : j + 1] = [bins[j][:half], bins[j][half:]]
    return [sorted(b) for b in bins]


def budget_batches(
    data: datasets.Dataset, views: list[View], order: list[int], budget: int, how: Batching
) -> list[Batch | PackedBatch]:
    """This rank's micro-batches of the step whose views are ``order`` (the global order: every
    rank plans the same split and runs its share ``plan[rank::world_size]``), each at most
    ``budget`` forward positions in ``how.layout`` (a longer view gets one of its own)."""
    groups = [view_group(data, views[i]) for i in order]
    sizes = [view_size(g, idx, how.layout) for g, idx in groups]
    plan = plan_micro_batches(sizes, budget, how.layout, how.world_size)
    return [how.collate([groups[i] for i in mb]) for mb in plan[how.rank :: how.world_size]]


def batches(
    data: datasets.Dataset, views: list[View], order: list[int], size: int, how: Batching
) -> Iterator[Batch | PackedBatch]:
    """Collated batches of ``size`` views taken in ``order``."""
    for start in range(0, len(order), size):
        yield how.collate([view_group(data, views[i]) for i in order[start : start + size]])
