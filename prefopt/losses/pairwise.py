"""Pairwise baselines (K = 2): column 0 is the chosen response, column 1 the rejected one.

Multi-response data reaches these losses through the dataset's pair construction
(``dataset.pairs``: best_vs_worst, best_vs_each, all_pairs), which orders each pair by score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.common import has_preference, preference_metrics, zero_invalid
from prefopt.losses.registry import LossConfig, register_loss
from prefopt.types import GroupStats, LossOutput


def _ordered_pair(scores: Tensor, mask: Tensor) -> Tensor:
    return has_preference(scores, mask) & (scores[:, 0] > scores[:, 1])


def _smoothed_logsigmoid_loss(margin: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(m) - eps log sigmoid(-m); eps = 0 is the plain Bradley-Terry loss."""
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


@dataclass
class DPOConfig(LossConfig):
    name: str = "dpo"
    beta: float = 0.1  # KL strength; implicit reward = beta * (log pi - log pi_ref)
    label_smoothing: float = 0.0  # conservative DPO (cDPO): assumed label-flip probability


@register_loss("dpo", DPOConfig, needs_reference=True, k=2)
def dpo_loss(
    policy: GroupStats, ref: GroupStats, scores: Tensor, *, beta: float, label_smoothing: float
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    "Direct Preference Optimization: Your Language Model is Secretly a Reward Model":
    -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))), summed log-probs.

    ``label_smoothing`` > 0 gives conservative DPO (Mitchell 2023); 0 is the paper's loss.
    """
    rewards = beta * (policy.logps - ref.logps)  # (B, 2)
    margin = rewards[:, 0] - rewards[:, 1]  # (B,)
    valid = _ordered_pair(scores, policy.mask)
    losses = zero_invalid(_smoothed_logsigmoid_loss(margin, label_smoothing), valid)
    return LossOutput(losses, valid, preference_metrics(rewards, policy, scores))


@dataclass
class SimPOConfig(LossConfig):
    name: str = "simpo"
    beta: float = 2.0  # scale of the length-normalised log-likelihood reward
    gamma: float = 1.0  # target reward margin (SimPO's gamma; gamma/beta = 0.5 here)
    label_smoothing: float = 0.0


@register_loss("simpo", SimPOConfig, k=2)
def simpo_loss(
    policy: GroupStats,
    ref: GroupStats | None,
    scores: Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6).

    "SimPO: Simple Preference Optimization with a Reference-Free Reward".

    -log sigmoid(beta/|y_w| log pi_w - beta/|y_l| log pi_l - gamma)

    Reference-free; ``ref`` is ignored. |y| counts response tokens including EOS.
    """
    rewards = beta * policy.avg_logps  # (B, 2)
    margin = rewards[:, 0] - rewards[:, 1] - gamma  # (B,)
    valid = _ordered_pair(scores, policy.mask)
    losses = zero_invalid(_smoothed_logsigmoid_loss(margin, label_smoothing), valid)
    return LossOutput(losses, valid, preference_metrics(rewards, policy, scores))
