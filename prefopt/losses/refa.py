"""REFA: Reference-Free Alignment for multi-preference optimization (Gupta et al.; paper 000).

Notation follows ``shared/papers/digest-refa.md``: mean split Y+ = {r > r_bar}, Y- = {r <= r_bar}
(Eqs. 1-2), length-normalised log-probs l_bar = logps / lengths (Eq. 3, EOS counted in |y|:
reading L1), deviation dS = (r - r_bar)^p (App. C.4), EOS regularizer R (Eq. 33).

Policy for groups whose scores are all equal (Y+ empty, the loss is -log 0, digest U7): the group
is invalid; it gets no loss (its EOS regularizer is dropped too), is excluded from the batch mean
and counted in ``skipped_groups``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.common import (
    masked_logsumexp,
    masked_mean,
    preference_metrics,
    zero_invalid,
)
from prefopt.losses.registry import LossConfig, register_loss
from prefopt.types import GroupStats, LossOutput


def score_deviation(scores: Tensor, mask: Tensor, p: float, mode: str) -> Tensor:
    """(B, K) dS = (r - r_bar)^p ("signed", App. C.4 literally) or |r - r_bar|^p ("abs", SWEPO)."""
    centred = scores - masked_mean(scores, mask)[:, None]
    if mode == "signed":
        if p != int(p):
            raise ValueError(f"deviation='signed' needs an integer p (got {p}); use 'abs'")
        return centred.pow(p)
    if mode == "abs":
        return centred.abs().pow(p)
    raise ValueError(f"deviation must be 'signed' or 'abs', got {mode!r}")


def eos_regularizer(policy: GroupStats, lam: float) -> Tensor:
    """(B,) Eq. 33: R = lam * sum_y P(EOS at |y|) over all real responses that end in EOS.

    Not divided by K. lam > 0 penalises the EOS probability where the data end a response
    (longer outputs, Table 4); responses truncated before their EOS are left out.
    """
    keep = policy.mask & policy.has_eos
    return lam * (policy.eos_logps.exp() * keep).sum(-1)


@dataclass
class REFADynamicConfig(LossConfig):
    name: str = "refa_dynamic"
    beta: float = 2.5  # inverse temperature on l_bar + alpha*dS (section 7 range: 2.0-4.0)
    gamma: float = 1.0  # weight of the negative set (section 7 range: 0.7-1.4)
    alpha: float = 0.5  # deviation-weight scale, Eq. 8 (no value reported in the paper)
    p: float = 2.0  # deviation power (App. C.4); p = 2 is the headline method
    deviation: str = "signed"  # signed (r - r_bar)^p as printed | abs |r - r_bar|^p (SWEPO)
    lam: float = 0.05  # EOS regularizer weight, Eq. 33 ("a small constant"; none reported)
    length_normalize: bool = True  # False gives REFABASE-dynamic (Eq. 21)


@register_loss("refa_dynamic", REFADynamicConfig)
def refa_dynamic_loss(
    policy: GroupStats,
    ref: GroupStats | None,
    scores: Tensor,
    *,
    beta: float,
    gamma: float,
    alpha: float,
    p: float,
    deviation: str,
    lam: float,
    length_normalize: bool,
) -> LossOutput:
    """REFA-dynamic, Eq. 34 = Eq. 24 (Eq. 11) + Eq. 33, in the stable form of digest section 2.

    z_y = beta * (l_bar_y + alpha * dS_y)
    L   = softplus(log gamma + LSE_{Y-}(z) - LSE_{Y+}(z)) + lam * sum_y P(EOS at |y|)
    which equals -log(A / (A + gamma * B)) + R with A = sum_{Y+} e^z, B = sum_{Y-} e^z.
    Reference-free; ``ref`` is ignored.
    """
    mask = policy.mask
    ell = policy.avg_logps if length_normalize else policy.logps  # (B, K)
    z = beta * (ell + alpha * score_deviation(scores, mask, p, deviation))  # (B, K)
    r_bar = masked_mean(scores, mask)[:, None]
    pos = mask & (scores > r_bar)  # Eq. 1
    neg = mask & ~pos  # Eq. 2: ties with the mean are negative
    # U7 on the sets themselves: with near-equal scores the rounded mean can reach the maximum.
    valid = pos.any(-1) & neg.any(-1)  # (B,)
    # Invalid groups get both sets filled so the LSEs stay finite (no NaN reaches backward).
    pos, neg = pos | ~valid[:, None], neg | ~valid[:, None]
    z = z.masked_fill(~mask, 0.0)
    log_gamma = torch.log(torch.as_tensor(gamma, dtype=z.dtype, device=z.device))
    contrastive = F.softplus(log_gamma + masked_logsumexp(z, neg) - masked_logsumexp(z, pos))
    reg = eos_regularizer(policy, lam)
    losses = zero_invalid(contrastive + reg, valid)
    metrics = preference_metrics(beta * ell, policy, scores)
    metrics |= {
        "refa/contrastive": contrastive.detach(),
        "refa/eos_reg": reg.detach(),
        "refa/positives": (pos & mask & valid[:, None]).sum(-1).float(),
    }
    return LossOutput(losses, valid, metrics)
