"""Running z-score statistics for losses with a normalised per-pair margin (alpha-DPO, LMPO).

The state is three float64 0-dim CPU tensors: ``mean`` and ``std`` (exponential moving averages
of the batch mean and of the batch *standard deviation*, as LMPO's Eqs. 21-22 and both authors'
codes do) and ``initialized`` (1. or 0.). A loss reports the detached sums ``{sum, sq_sum,
count}`` of its valid groups' margins in ``LossOutput.stat_updates``; the loop adds them over
micro-batches and ranks and calls ``update_state`` once per optimizer step. The batch std is the
unbiased one (``torch.std``, as both codes), 0 for fewer than two values.

``stats_init`` (before the first update): ``batch`` starts the averages at the first step's
statistics and, until then, normalises with the current micro-batch's own mean and std (bias-free
initialisation; LMPO's paper gives no initial values); ``zero`` starts them at 0, as both
authors' codes do (no bias correction: the first margins are inflated by about 1 / (1 - decay)).

``zscore_stats`` (what normalises the current batch): ``running`` uses the state passed in, the
statistics of the previous steps (LMPO Eq. 20 normalises with alpha_t, then Eq. 21 updates; alpha-
DPO's "statistics over the training dataset" are not a function of the batch either); it keeps
gradient accumulation and data parallelism exact. ``running_and_batch`` first folds this micro-
batch's statistics into the state (not persisted), as the authors' codes do, which update the
average on every micro-batch before using it.
"""

from __future__ import annotations

import torch
from torch import Tensor

STATS_INIT = ("batch", "zero")
ZSCORE_STATS = ("running", "running_and_batch")
F64 = torch.float64


def init_state(stats_init: str, zscore_stats: str = "running_and_batch") -> dict[str, Tensor]:
    if stats_init not in STATS_INIT:
        raise ValueError(f"stats_init must be one of {STATS_INIT}, got {stats_init!r}")
    if stats_init == "zero" and zscore_stats == "running":
        # the first step would divide its margins by a running std of exactly 0
        raise ValueError(
            "loss.stats_init=zero with loss.zscore_stats=running normalises the first step by a "
            "std of 0; use loss.stats_init=batch, or loss.zscore_stats=running_and_batch (the "
            "authors' code, which folds each batch in before normalising)"
        )
    started = 1.0 if stats_init == "zero" else 0.0  # zero: the averages start at 0 right away
    return {
        "mean": torch.zeros((), dtype=F64),
        "std": torch.zeros((), dtype=F64),
        "initialized": torch.tensor(started, dtype=F64),
    }


def batch_sums(x: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Detached float64 sums of ``x`` (B,) over the valid groups: sum, sum of squares, count."""
    x = x.detach().to(F64) * valid
    return {"sum": x.sum(), "sq_sum": x.square().sum(), "count": valid.to(F64).sum()}


def moments(sums: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std from ``batch_sums``; (0, 0) for no value, std 0 for one value."""
    n = sums["count"]
    mean = sums["sum"] / n.clamp(min=1)
    var = (sums["sq_sum"] - n * mean.square()) / (n - 1).clamp(min=1)
    return mean, var.clamp(min=0).sqrt()


def _ema(state: dict[str, Tensor], mean: Tensor, std: Tensor, decay: float):
    """One EMA step: decay * old + (1 - decay) * batch; the batch values if not initialised."""
    started = state["initialized"] > 0
    new_mean = torch.where(started, decay * state["mean"] + (1 - decay) * mean, mean)
    new_std = torch.where(started, decay * state["std"] + (1 - decay) * std, std)
    return new_mean, new_std


def update_state(state: dict[str, Tensor], sums: dict[str, Tensor], decay: float):
    """The state after one optimizer step whose summed ``batch_sums`` are ``sums`` (pure).

    A step without a valid group (count 0) leaves the state as it was.
    """
    if not sums or float(sums["count"]) == 0:
        return dict(state)
    sums = {k: v.detach().to("cpu", F64) for k, v in sums.items()}
    mean, std = _ema(state, *moments(sums), decay)
    return {"mean": mean, "std": std, "initialized": torch.ones((), dtype=F64)}


def zscore(
    x: Tensor,
    valid: Tensor,
    state: dict[str, Tensor] | None,
    *,
    decay: float,
    eps: float,
    zscore_stats: str,
) -> Tensor:
    """(B,) (x - mean) / (std + eps) with detached statistics; 0 for invalid groups.

    Gradient flows through ``x`` only (LMPO Eq. 24: the statistics carry no gradient). Without
    a state (a loss called outside the loop) the batch is normalised with its own statistics.
    """
    if zscore_stats not in ZSCORE_STATS:
        raise ValueError(f"zscore_stats must be one of {ZSCORE_STATS}, got {zscore_stats!r}")
    state = init_state("batch") if state is None else state
    s = {k: v.to(device=x.device, dtype=F64) for k, v in state.items()}
    b_mean, b_std = moments(batch_sums(x, valid))
    if zscore_stats == "running":  # uninitialised: the micro-batch's own statistics
        started = s["initialized"] > 0
        mean, std = torch.where(started, s["mean"], b_mean), torch.where(started, s["std"], b_std)
    else:
        mean, std = _ema(s, b_mean, b_std, decay)
    z = (x - mean.to(x.dtype)) / (std + eps).to(x.dtype)
    return torch.where(valid, z, torch.zeros_like(z))
