"""Metric accumulation over micro-batches and ranks: one class instead of per-loop bookkeeping.

Sums stay on the device while a step runs (no host sync per micro-batch); ``reduce`` sums them
over ranks in one collective, and ``finish`` reads them back in one transfer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.model.parallel import all_reduce_sum
from prefopt.types import LossOutput

COUNTS = ("valid_groups", "groups", "tokens")


class MetricSums:
    """Sums of per-group metrics over valid groups; ``finish`` reduces across ranks and averages."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.tokens = 0
        self.stats: dict[str, Tensor] = {}

    def _add(self, name: str, value: Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add(self, out: LossOutput, num_tokens: int, keep: Tensor | None = None) -> None:
        """Add a micro-batch; ``keep`` (B,) drops padding groups from every count."""
        v = out.valid if keep is None else out.valid & keep
        self._add("valid_groups", v.sum(dtype=torch.float64))
        groups = torch.ones_like(v) if keep is None else keep
        self._add("groups", groups.sum(dtype=torch.float64))
        self.tokens += num_tokens
        # where, not a boolean gather: same sums, no device-to-host copy of the group count
        self._add("loss", torch.where(v, out.losses.detach().double(), 0.0).sum())
        for name, value in out.metrics.items():
            self._add(name, torch.where(v, value.detach().double(), 0.0).sum())
        for name, value in out.stat_updates.items():
            value = value.detach().double()
            self.stats[name] = self.stats[name] + value if name in self.stats else value

    def stat_sums(self) -> dict[str, Tensor]:
        """``LossOutput.stat_updates`` summed over micro-batches and ranks."""
        return {name: all_reduce_sum(value.clone()) for name, value in sorted(self.stats.items())}

    def reduce(self, flags: dict[str, bool] | None = None) -> ReducedMetrics:
        """Sum every metric (and the per-rank ``flags``, counted over ranks) over ranks in one
        collective, on the device: nothing is read back yet."""
        names = sorted(self.sums)
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        values = [self.sums[n].reshape(()) for n in names]
        values.append(torch.tensor(float(self.tokens), dtype=torch.float64, device=device))
        flag_names = sorted(flags or {})
        values += [
            torch.tensor(float(flags[f]), dtype=torch.float64, device=device) for f in flag_names
        ]
        packed = all_reduce_sum(torch.stack(values)) if values else torch.zeros(0)
        return ReducedMetrics([*names, "tokens", *(f"flag/{f}" for f in flag_names)], packed)

    def finish(self) -> dict[str, float]:
        return self.reduce().read()


class ReducedMetrics:
    """Metric sums reduced over ranks, still on the device; ``read`` averages on the host."""

    def __init__(self, names: list[str], packed: Tensor) -> None:
        self.names, self.packed = names, packed

    def __getitem__(self, name: str) -> Tensor:
        return self.packed[self.names.index(name)]

    def read(self, extra: dict[str, Tensor] | None = None) -> dict[str, float]:
        """One device-to-host transfer: averages over valid groups, plus counts, flags (how many
        ranks raised them) and ``extra`` scalars as they are."""
        extra = extra or {}
        tail = [v.detach().double().reshape(()).to(self.packed.device) for v in extra.values()]
        values = torch.cat([self.packed, torch.stack(tail)]) if tail else self.packed
        host = dict(zip([*self.names, *extra], values.tolist(), strict=True))
        valid = host.get("valid_groups", 0.0)
        out: dict[str, float] = {}
        for name, value in host.items():
            if name in COUNTS or name.startswith("flag/") or name in extra:
                out[name] = value
            else:
                out[name] = value / max(valid, 1)
        out["skipped_groups"] = out.pop("groups", 0.0) - valid
        out.setdefault("valid_groups", valid)
        return out
