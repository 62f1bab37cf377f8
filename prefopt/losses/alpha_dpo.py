"""alpha-DPO: SimPO with an adaptive, detached, z-scored reward margin.

"alpha-DPO: Adaptive Reward Margin is What Direct Preference Optimization Needs" (ICLR 2025
submission; published as "AlphaDPO", Wu et al., ICML 2025), arXiv 2410.10148. Readings and
alternatives: ``docs/losses.md``, section alpha-DPO.

Notation: l_bar = logps / lengths (EOS counted), u = beta * (l_bar_w - l_bar_l) (Eq. 12), M the
DPO implicit-reward margin (Eq. 10), M* its z-score (Eq. 11) with running statistics
(``prefopt/losses/running.py``).

``convention`` (the paper's Eq. 10 uses summed log-probs and the margin gamma + alpha M*; the
authors' code length-normalises M and scales alpha by beta, and the reported alpha values are in
the code's units):
- ``code`` (default; the authors' code, ``ln: true``): M = (l_bar_w - l_bar_ref_w) - (l_bar_l -
  l_bar_ref_l), length-normalised, and the margin is gamma + alpha * beta * M*. The reported alpha
  values (0.05, 0.2) and the defaults below are in this convention.
- ``paper`` (Eqs. 10-12 literally): M = beta * ((logps_w - ref_w) - (logps_l - ref_l)) on summed
  log-probs, margin gamma + alpha * M*. Same loss as ``code`` with alpha_paper = beta * alpha_code
  when the two M give the same z-scores (equal lengths).
``gamma`` is the absolute margin in both (the code's gamma_beta_ratio times beta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from prefopt.losses import running
from prefopt.losses.common import has_preference, preference_metrics, zero_invalid
from prefopt.losses.registry import LossConfig, StateSpec, register_loss
from prefopt.types import GroupStats, LossOutput

CONVENTIONS = ("code", "paper")


def dpo_margin(policy: GroupStats, ref: GroupStats, beta: float, convention: str) -> Tensor:
    """(B,) detached M: Eq. 10 (``paper``) or its length-normalised, beta-free form (``code``)."""
    if convention == "paper":
        ratio = beta * (policy.logps - ref.logps)  # (B, 2)
    elif convention == "code":
        ratio = policy.avg_logps - ref.avg_logps  # (B, 2)
    else:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return (ratio[:, 0] - ratio[:, 1]).detach()


@dataclass
class AlphaDPOConfig(LossConfig):
    name: str = "alpha_dpo"
    beta: float = 2.5  # scale of the length-normalised log-prob difference u (Eq. 12)
    gamma: float = 1.5  # ABSOLUTE target margin (the code's gamma_beta_ratio 0.6 times beta)
    alpha: float = 0.2  # weight of the adaptive margin M*, in ``convention``'s units
    convention: str = "code"  # code: M length-normalised, margin alpha*beta*M* | paper: Eq. 10-12
    zscore: bool = True  # False: the "w/o Normalization" ablation (raw M, Table 2)
    zscore_stats: str = "running"  # running: previous steps' stats | running_and_batch: code
    momentum: float = 0.9  # EMA weight of the old statistics, one update per optimizer step
    eps: float = 1e-6  # added to the running std (the code has none: NaN when std = 0)
    stats_init: str = "batch"  # batch: start from the first step's stats | zero: the code


def _init(*, stats_init: str, convention: str, zscore_stats: str, **_) -> dict[str, Tensor]:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return running.init_state(stats_init, zscore_stats)


def _update(state: dict[str, Tensor], sums: dict[str, Tensor], *, momentum: float, **_):
    return running.update_state(state, sums, momentum)


@register_loss(
    "alpha_dpo",
    AlphaDPOConfig,
    needs_reference=True,
    k=2,
    state=StateSpec(init=_init, update=_update),
)
def alpha_dpo_loss(
    policy: GroupStats,
    ref: GroupStats,
    scores: Tensor,
    *,
    beta: float,
    gamma: float,
    alpha: float,
    convention: str,
    zscore: bool,
    zscore_stats: str,
    momentum: float,
    eps: float,
    state: dict[str, Tensor] | None = None,
) -> LossOutput:
    """alpha-DPO, Eq. 12: -log sigmoid(u - sg[gamma + alpha * M*]).

    u = beta * (l_bar_w - l_bar_l);  M* = (M - mu_M) / (sigma_M + eps) (Eq. 11).
    The whole margin is detached, so no gradient reaches the reference or flows through M:
    the loss is SimPO with a per-pair constant margin. ``state=None`` (outside the loop)
    normalises with the batch's own statistics (``stats_init`` is read by the state's init).
    """
    valid = has_preference(scores, policy.mask) & (scores[:, 0] > scores[:, 1])  # (B,)
    rewards = beta * policy.avg_logps  # (B, 2)
    u = rewards[:, 0] - rewards[:, 1]  # (B,)
    m = dpo_margin(policy, ref, beta, convention)  # (B,)
    m_star = (
        running.zscore(m, valid, state, decay=momentum, eps=eps, zscore_stats=zscore_stats)
        if zscore
        else m
    )
    scale = alpha * beta if convention == "code" else alpha
    target = (gamma + scale * m_star).detach()  # (B,) sg[gamma + alpha M*]
    losses = zero_invalid(-F.logsigmoid(u - target), valid)
    metrics = preference_metrics(rewards, policy, scores)
    metrics |= {"alpha_dpo/m": m, "alpha_dpo/m_star": m_star.detach(), "alpha_dpo/margin": target}
    return LossOutput(losses, valid, metrics, running.batch_sums(m, valid))
