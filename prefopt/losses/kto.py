"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024), on multi-response groups.

"KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306, Eq. 8. Readings:
``docs/losses.md``, section KTO.

Desirable / undesirable labels come from the scores (``labels``): ``best_worst`` marks a group's
highest-scored response desirable and its lowest undesirable (the binarized-UltraFeedback
convention the SimPO/alpha-DPO baseline tables use); ``mean_split`` marks responses above the
group's mean score desirable and the rest undesirable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.losses.common import (
    best_worst,
    has_preference,
    masked_mean,
    preference_metrics,
    zero_invalid,
)
from prefopt.losses.registry import LossConfig, register_loss
from prefopt.types import GroupStats, LossOutput


@dataclass
class KTOConfig(LossConfig):
    name: str = "kto"
    beta: float = 0.1  # KTO paper default
    lambda_d: float = 1.0  # weight of desirable examples
    lambda_u: float = 1.0  # weight of undesirable examples
    labels: str = "best_worst"  # best_worst | mean_split


def _labels(scores: Tensor, mask: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """(B, K) bool masks of desirable and undesirable responses."""
    if mode == "best_worst":
        best, worst = best_worst(scores, mask)
        slots = torch.arange(scores.shape[1], device=scores.device)
        return slots == best[:, None], slots == worst[:, None]
    if mode == "mean_split":
        desirable = mask & (scores > masked_mean(scores, mask)[:, None])
        return desirable, mask & ~desirable
    raise ValueError(f"kto labels must be 'best_worst' or 'mean_split', got {mode!r}")


@register_loss("kto", KTOConfig, needs_reference=True, extras=("mismatched_kl",))
def kto_loss(
    policy: GroupStats,
    ref: GroupStats,
    scores: Tensor,
    *,
    beta: float,
    lambda_d: float,
    lambda_u: float,
    labels: str,
    kl_estimate: Tensor,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, Eq. 8), per group the mean over its labelled responses of

        lambda_y - v(x, y),  v = lambda_d sigma(beta (r - z0)) | lambda_u sigma(beta (z0 - r)),

    r = log pi(y|x) - log ref(y|x) (summed), and the KL baseline z0 = max(0, ``kl_estimate``),
    detached: the paper's batch estimate, mean log pi(y'|x) - log ref(y'|x) over mismatched
    pairs, taken over the whole optimizer step (every micro-batch and rank; see
    ``prefopt.train.extras.mismatched_kl``), so it does not depend on how the step is split.
    """
    valid = has_preference(scores, policy.mask)
    desirable, undesirable = _labels(scores, policy.mask, labels)
    z0 = kl_estimate.detach().clamp(min=0)
    rewards = policy.logps - ref.logps  # (B, K)
    value = torch.where(
        desirable,
        lambda_d * torch.sigmoid(beta * (rewards - z0)),
        lambda_u * torch.sigmoid(beta * (z0 - rewards)),
    )
    weight = torch.where(desirable, lambda_d, lambda_u)
    labelled = (desirable | undesirable) & policy.mask
    losses = ((weight - value) * labelled).sum(-1) / labelled.sum(-1).clamp(min=1)
    metrics = preference_metrics(beta * rewards, policy, scores)
    metrics["kto/z0"] = z0.expand_as(losses).detach()
    return LossOutput(zero_invalid(losses, valid), valid, metrics)
