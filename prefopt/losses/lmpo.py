"""LMPO: Length-Controlled Margin-Based Preference Optimization without Reference Model.

Anonymous ACL submission, arXiv 2502.14643. Readings and alternatives: ``docs/losses.md``,
section LMPO.

Notation: avg = logps / lengths (EOS counted); the home-court advantage h multiplies exp(-d)
(Eqs. 3, 10), i.e. enters as the additive margin log h, not scaled by beta; the length-
controlled margin m (Eqs. 7-8) is z-scored with running statistics (Eq. 9 with the EMA of Eqs.
20-22, ``prefopt/losses/running.py``) into m_bar.

Readings: p is Eq. 8's length-normalised probability, not the sequence probability that App. A
Eq. 29 differentiates (which is ~0 for real responses, making m constant); m has no factor 1/2
(the authors' code's /2 is a no-op under the z-score); ``detach`` False lets the gradient flow
through m as in App. A, True detaches lam * m_bar as the authors' code does (then LMPO is SimPO
with a per-pair margin log h + lam * m_bar).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from prefopt.losses import running
from prefopt.losses.common import has_preference, preference_metrics, zero_invalid
from prefopt.losses.registry import LossConfig, StateSpec, register_loss
from prefopt.types import GroupStats, LossOutput


def length_normalized_prob(policy: GroupStats, length_factor: bool) -> Tensor:
    """(B, 2) Eq. 8: p_y = exp(avg_y * L_bar / |y|), L_bar = (|y_w| + |y_l|) / 2.

    ``length_factor`` False gives p_y = exp(avg_y) ("w/o avg-length normalization", Table 2).
    """
    avg = policy.avg_logps  # (B, 2)
    if not length_factor:
        return avg.exp()
    return (avg * policy.lengths.mean(-1, keepdim=True) / policy.lengths).exp()


def lmpo_margin(p_w: Tensor, p_l: Tensor, power: int) -> Tensor:
    """Eq. 7: m = (1 - p_w) * (1 - (p_w - p_l)^power); power 5 (paper), 3 = "cube" ablation."""
    return (1 - p_w) * (1 - (p_w - p_l) ** power)


@dataclass
class LMPOConfig(LossConfig):
    name: str = "lmpo"
    beta: float = 2.5  # scale of the average log-probs (Eq. 11); not applied to log_h or lam*m_bar
    log_h: float = 1.4  # log of the home-court advantage h, the additive margin (h = e^1.4)
    lam: float = 0.2  # weight of the z-scored length-controlled margin m_bar (Eq. 11)
    detach: bool = False  # False: gradient through m (App. A) | True: authors' code, sg[lam m_bar]
    power: int = 5  # exponent of (p_w - p_l) in Eq. 7; 3 = the "cube function" ablation
    length_factor: bool = True  # Eq. 8's (|y_w|+|y_l|)/(2|y|); False = "w/o avg-length" ablation
    zscore: bool = True  # False: the "w/o Z-score normalization" ablation (raw m)
    zscore_stats: str = "running"  # running: alpha_t, beta_t (Eq. 20) | running_and_batch: code
    ema_decay: float = 0.9  # gamma of Eqs. 21-22 (code value), one update per optimizer step
    eps: float = 1e-6  # added to the running std (the code has none)
    stats_init: str = "batch"  # batch: start from the first step's stats | zero: the code


def _init(*, stats_init: str, zscore_stats: str, **_) -> dict[str, Tensor]:
    return running.init_state(stats_init, zscore_stats)


def _update(state: dict[str, Tensor], sums: dict[str, Tensor], *, ema_decay: float, **_):
    return running.update_state(state, sums, ema_decay)


@register_loss("lmpo", LMPOConfig, k=2, state=StateSpec(init=_init, update=_update))
def lmpo_loss(
    policy: GroupStats,
    ref: GroupStats | None,
    scores: Tensor,
    *,
    beta: float,
    log_h: float,
    lam: float,
    detach: bool,
    power: int,
    length_factor: bool,
    zscore: bool,
    zscore_stats: str,
    ema_decay: float,
    eps: float,
    state: dict[str, Tensor] | None = None,
) -> LossOutput:
    """LMPO, Eqs. 10-11: -log(1 / (1 + h exp(-d))) = softplus(log h - d).

    d = beta * (avg_w - avg_l) - lam * m_bar,  m_bar = (m - a) / (b + eps) (Eq. 9), with a, b
    the running mean and std of m (no gradient, Eq. 24). Reference-free; ``ref`` is ignored.
    ``state=None`` (outside the loop) normalises with the batch's own statistics
    (``stats_init`` is read by the state's init).
    """
    valid = has_preference(scores, policy.mask) & (scores[:, 0] > scores[:, 1])  # (B,)
    rewards = beta * policy.avg_logps  # (B, 2)
    p = length_normalized_prob(policy, length_factor)  # (B, 2)
    m = lmpo_margin(p[:, 0], p[:, 1], power)  # (B,)
    m_bar = (
        running.zscore(m, valid, state, decay=ema_decay, eps=eps, zscore_stats=zscore_stats)
        if zscore
        else m
    )
    if detach:
        m_bar = m_bar.detach()
    d = rewards[:, 0] - rewards[:, 1] - lam * m_bar  # (B,)
    losses = zero_invalid(F.softplus(log_h - d), valid)
    metrics = preference_metrics(rewards, policy, scores)
    metrics |= {
        "lmpo/margin": m.detach(),
        "lmpo/m_bar": m_bar.detach(),
        "lmpo/p_chosen": p[:, 0].detach(),
    }
    return LossOutput(losses, valid, metrics, running.batch_sums(m, valid))
