"""Metric accumulation over micro-batches and ranks: one class instead of per-loop bookkeeping."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from prefopt.parallel import all_reduce_sum
from prefopt.types import LossOutput


class MetricSums:
    """Sums of per-group metrics over valid groups; ``finish`` reduces across ranks and averages."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.valid = 0
        self.groups = 0
        self.tokens = 0
        self.stats: dict[str, Tensor] = {}

    def add(self, out: LossOutput, num_tokens: int, keep: Tensor | None = None) -> None:
        """Add a micro-batch; ``keep`` (B,) drops padding groups from every count."""
        v = out.valid if keep is None else out.valid & keep
        self.valid += int(v.sum())
        self.groups += len(v) if keep is None else int(keep.sum())
        self.tokens += num_tokens
        self.sums["loss"] += float(out.losses.detach()[v].float().sum())
        for name, value in out.metrics.items():
            self.sums[name] += float(value.detach()[v].float().sum())
        for name, value in out.stat_updates.items():
            value = value.detach().double()
            self.stats[name] = self.stats[name] + value if name in self.stats else value

    def stat_sums(self) -> dict[str, Tensor]:
        """``LossOutput.stat_updates`` summed over micro-batches and ranks."""
        return {name: all_reduce_sum(value.clone()) for name, value in sorted(self.stats.items())}

    def finish(self) -> dict[str, float]:
        names = sorted(self.sums)
        packed = torch.tensor(
            [self.sums[n] for n in names] + [self.valid, self.groups, self.tokens],
            dtype=torch.float64,
        )
        packed = all_reduce_sum(packed).tolist()
        valid, groups, tokens = packed[-3:]
        out = {n: s / max(valid, 1) for n, s in zip(names, packed, strict=False)}
        out |= {"valid_groups": valid, "skipped_groups": groups - valid, "tokens": tokens}
        return out
