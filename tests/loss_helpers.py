"""Builders and checks shared by the loss tests (``tests/test_losses*.py``).

Expected values in those tests are computed by hand or with plain Python loops; these helpers
only build inputs and check the output contract, so none of them computes a loss.
"""

from __future__ import annotations

import math

import torch

from prefopt.types import GroupStats, LossOutput

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64 comparisons of two computations of one quantity


def t(x, dtype=F64) -> torch.Tensor:
    """A fresh tensor (never a view of ``x``) of ``dtype``."""
    return torch.as_tensor(x, dtype=dtype).clone()


def stats(
    logps,
    lengths=None,
    eos_logps=None,
    has_eos=None,
    mask=None,
    *,
    grad: bool = False,
    dtype=F64,
) -> GroupStats:
    """GroupStats from lists or tensors; default lengths 1, eos_logps -2, has_eos and mask True.

    ``grad`` makes ``logps`` and ``eos_logps`` leaves that require grad.
    """
    logps = t(logps, dtype)
    shape = logps.shape
    lengths = torch.ones(shape, dtype=dtype) if lengths is None else t(lengths, dtype)
    eos_logps = torch.full(shape, -2.0, dtype=dtype) if eos_logps is None else t(eos_logps, dtype)
    has_eos = torch.ones(shape, dtype=torch.bool) if has_eos is None else torch.as_tensor(has_eos)
    mask = torch.ones(shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    if grad:
        logps.requires_grad_(True)
        eos_logps.requires_grad_(True)
    return GroupStats(logps, lengths, eos_logps, has_eos.bool(), mask.bool())


def random_stats(
    B: int, K: int, seed: int, *, grad: bool = False
) -> tuple[GroupStats, torch.Tensor]:
    """Random (B, K) stats with integer scores 0..10 (so ties with the mean are exact)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 20, (B, K), generator=g).to(F64)
    avg = -0.3 - 2.5 * torch.rand(B, K, generator=g, dtype=F64)
    eos = -0.05 - 4.0 * torch.rand(B, K, generator=g, dtype=F64)
    has_eos = torch.rand(B, K, generator=g) > 0.25
    scores = torch.randint(0, 11, (B, K), generator=g).to(F64)
    return stats(avg * lengths, lengths, eos, has_eos, grad=grad), scores


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def neg_log_sigmoid(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def assert_detached_metrics(out: LossOutput, B: int) -> None:
    """Metrics are finite, detached (B,) tensors; running-statistics sums are detached scalars."""
    assert out.metrics
    for key, value in out.metrics.items():
        assert not value.requires_grad and value.grad_fn is None, key
        assert value.shape == (B,), key
        assert torch.isfinite(value).all(), key
    for key, value in out.stat_updates.items():
        assert not value.requires_grad and value.grad_fn is None, key
        assert value.shape == () and value.dtype == F64, key
