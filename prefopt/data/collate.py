"""Group views -> Batch (padded layout) and the deterministic, resumable order of views.

Padded layout: one row per (group, response): prompt + response, right-padded. It is the
reference layout; the packed and prompt-shared layouts (``prefopt.data.packing``) replace
``collate`` and share ``GroupBatch``'s (B, K) fields, so the statistics and losses do not change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor

from prefopt.data.tokenize import TokenizedGroup

Group = tuple[TokenizedGroup, tuple[int, ...]]  # a group and the response indices of its view


def _moved(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if hasattr(value, "to") else value  # tensors and tensor indexes


@dataclass(frozen=True, kw_only=True)
class GroupBatch:
    """What a micro-batch holds in every layout (``Batch``: padded; ``packing.PackedBatch``:
    packed or shared): the groups' (B, K) fields and where each row (one response) sits in
    them. Losses and the loop read only these, so the layouts are interchangeable."""

    row_group: Tensor  # (N,) group index b of each row
    row_slot: Tensor  # (N,) response slot k of each row
    scores: Tensor  # (B, K) float32
    mask: Tensor  # (B, K) bool, real responses
    has_eos: Tensor  # (B, K) bool
    ref_logps: Tensor | None = None  # (B, K) precomputed reference log-probs, when cached
    ref_eos_logps: Tensor | None = None  # (B, K)
    sequence_tokens: int = 0  # prompt + response tokens of every row, counted at collate time

    @property
    def num_groups(self) -> int:
        return self.scores.shape[0]

    @property
    def num_tokens(self) -> int:
        """Sequence tokens: prompt + response of every row (the same count in every layout, so
        a throughput metric built on it compares layouts on the same data); a plain int, so
        reading it never waits for the device."""
        return self.sequence_tokens

    def to(self, device: torch.device | str) -> Self:
        """The batch with every tensor (and tensor index) on ``device``."""
        moved = {f.name: _moved(getattr(self, f.name), device) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **moved)


@dataclass(frozen=True, kw_only=True)
class Batch(GroupBatch):
    """The padded layout: one right-padded row per (group, response)."""

    input_ids: Tensor  # (N, T) one row per real response, right-padded
    attention_mask: Tensor  # (N, T)
    response_mask: Tensor  # (N, T) True on response tokens (the trained-on targets)

    @property
    def forward_tokens(self) -> int:
        """Positions the forward computes, padding included."""
        return self.input_ids.numel()


def collate(groups: list[Group], pad_id: int) -> Batch:
    """Lay out groups (each with the response indices of its view) as padded rows."""
    rows = [
        (b, k, g.prompt_ids, g.response_ids[r])
        for b, (g, idx) in enumerate(groups)
        for k, r in enumerate(idx)
    ]
    T = max(len(p) + len(r) for *_, p, r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    response_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for n, (_, _, p, r) in enumerate(rows):
        input_ids[n, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[n, : len(p) + len(r)] = True
        response_mask[n, len(p) : len(p) + len(r)] = True
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        row_group=torch.tensor([b for b, *_ in rows]),
        row_slot=torch.tensor([k for _, k, *_ in rows]),
        **group_fields(groups),
        sequence_tokens=sum(len(p) + len(r) for *_, p, r in rows),
    )


def group_fields(groups: list[Group]) -> dict[str, Tensor | None]:
    """The (B, K) fields every layout shares, by name: scores (float32), mask and has_eos
    (bool), and the cached reference log-probs (float32, None when the groups lack them)."""
    B, K = len(groups), max(len(idx) for _, idx in groups)
    scores = torch.zeros((B, K), dtype=torch.float32)
    mask = torch.zeros((B, K), dtype=torch.bool)
    has_eos = torch.zeros((B, K), dtype=torch.bool)
    for b, (g, idx) in enumerate(groups):
        scores[b, : len(idx)] = torch.tensor([g.scores[r] for r in idx], dtype=torch.float32)
        mask[b, : len(idx)] = True
        has_eos[b, : len(idx)] = torch.tensor([g.has_eos[r] for r in idx])
    return {
        "scores": scores,
        "mask": mask,
        "has_eos": has_eos,
        "ref_logps": per_slot(groups, "ref_logps"),
        "ref_eos_logps": per_slot(groups, "ref_eos_logps"),
    }


def per_slot(groups: list[Group], field: str) -> Tensor | None:
    """(B, K) float32 of a per-response list field, or None when the groups lack it."""
    if any(getattr(g, field) is None for g, _ in groups):
        return None
    out = torch.zeros((len(groups), max(len(idx) for _, idx in groups)), dtype=torch.float32)
    for b, (g, idx) in enumerate(groups):
        out[b, : len(idx)] = torch.tensor([getattr(g, field)[r] for r in idx])
    return out


def view_order(num_views: int, seed: int, epoch: int) -> list[int]:
    """The permutation of views for one epoch: a pure function of (seed, epoch), so a resumed
    run that knows how many views it consumed continues with exactly the next ones."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_views, generator=gen).tolist()


def views_at(num_views: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of the ``count`` views after the first ``start`` of the endless epoch stream."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), num_views)
        out.extend(view_order(num_views, seed, epoch)[offset : offset + count - len(out)])
    return out
