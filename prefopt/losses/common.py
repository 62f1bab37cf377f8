"""Masked (B, K) helpers shared by every loss: validity, set reductions, standard metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.types import GroupStats


def has_preference(scores: Tensor, mask: Tensor) -> Tensor:
    """(B,) True where a group has >= 2 real responses whose scores are not all equal."""
    hi = scores.masked_fill(~mask, float("-inf")).amax(-1)
    lo = scores.masked_fill(~mask, float("inf")).amin(-1)
    return (mask.sum(-1) >= 2) & (hi > lo)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B,) mean of x over the True slots of each row; 0 for an empty row."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """(B,) logsumexp over the True slots of each row; callers keep every row non-empty."""
    return x.masked_fill(~mask, float("-inf")).logsumexp(-1)


def best_worst(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) indices of the highest- and lowest-scored real responses (first index on ties)."""
    best = scores.masked_fill(~mask, float("-inf")).argmax(-1)
    worst = scores.masked_fill(~mask, float("inf")).argmin(-1)
    return best, worst


def preference_metrics(rewards: Tensor, policy: GroupStats, scores: Tensor) -> dict[str, Tensor]:
    """Standard per-group metrics from a loss's implicit rewards (B, K).

    "chosen" is the highest-scored response of a group and "rejected" the lowest-scored one, so
    the metrics mean the same for pairwise (K = 2) and multi-response losses.
    """
    best, worst = best_worst(scores, policy.mask)

    def pick(x: Tensor, idx: Tensor) -> Tensor:
        return x.detach().float().gather(-1, idx[:, None]).squeeze(-1)

    chosen, rejected = pick(rewards, best), pick(rewards, worst)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "rewards/accuracy": (chosen > rejected).float(),
        "logps/chosen": pick(policy.logps, best),
        "logps/rejected": pick(policy.logps, worst),
        "avg_logps/chosen": pick(policy.avg_logps, best),
        "avg_logps/rejected": pick(policy.avg_logps, worst),
        "lengths/chosen": pick(policy.lengths, best),
        "lengths/rejected": pick(policy.lengths, worst),
    }


def zero_invalid(losses: Tensor, valid: Tensor) -> Tensor:
    """Replace the (finite) filler of invalid groups by 0 so summaries of ``losses`` stay clean."""
    return torch.where(valid, losses, torch.zeros_like(losses))
