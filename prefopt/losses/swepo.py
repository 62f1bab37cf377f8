"""SWEPO: Simultaneous Weighted Preference Optimization for Group Contrastive Alignment.

Gupta, Madhavan, Zhang, Bansal, Rajmohan, arXiv 2412.04628 v3 (v4, renamed "Multi-Preference
Optimization", differs). The text of v3 we work from has lost its formulas, so the loss here is
rebuilt from the prose, the proofs and the gradients; the readings taken are named in the
docstring of ``swepo_loss`` and argued in ``docs/losses.md``, section SWEPO.
SWEPO is the reference-based ancestor of REFA (``refa.py``) and shares its mean split and set
contrast: -log(sum_{Y+} w e^s / sum_all w e^s), the positives summed inside the log.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.losses.common import preference_metrics, zero_invalid
from prefopt.losses.refa import mean_split, score_deviation, set_contrast, top_split
from prefopt.losses.registry import LossConfig, register_loss
from prefopt.types import GroupStats, LossOutput

MODES = ("dynamic", "1vsk")
WEIGHTINGS = ("power", "exp")


def swepo_log_weights(
    scores: Tensor, mask: Tensor, weighting: str, p: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """(B, K) log w of each real response and (B, K) keep: the responses with w > 0.

    power (Sec. 4.3 "the p-th power of the deviation"): w = |dS|^p, with w = 1 for
        p = 0 (unweighted); for p > 0 a response exactly at the mean has w = 0 and drops out.
    exp (Sec. 4.1 "exponentiating their deviations ... with a chosen power"):
        w = exp(alpha * |dS|^p); p = 1 is Eqs. 5-6, p = 0 is a constant weight that cancels.
    dS = S - S_mean over the real responses (Eqs. 1-2), no std normalisation; no gradient.
    """
    dev = score_deviation(scores.detach(), mask, 1.0, "abs")  # (B, K) |dS|
    if p < 0:
        raise ValueError(f"p must be >= 0, got {p}")
    if weighting == "exp":
        return alpha * dev.pow(p), mask
    if weighting != "power":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if p == 0:
        return torch.zeros_like(dev), mask
    keep = mask & (dev > 0)
    # p * log|dS| rather than log(|dS|^p): no underflow to w = 0 for tiny deviations.
    return p * dev.masked_fill(~keep, 1.0).log(), keep


@dataclass
class SWEPOConfig(LossConfig):
    name: str = "swepo"
    beta: float = 0.1  # scale of the log-ratio (never named or valued in the paper; DPO's default)
    mode: str = "dynamic"  # dynamic: mean split (Eqs. 3-4) | 1vsk: top response vs all others
    weighting: str = "power"  # power: w = |dS|^p (Sec. 4.3) | exp: w = exp(alpha |dS|^p) (4.1)
    p: float = 1.0  # deviation power; Table 1 reports p = 0, 1, 2 (p = 1 best on Mistral)
    alpha: float = 1.0  # exp weighting scale (Eqs. 5-6; value never given); unused by power
    beta_on_weights: bool = False  # True: z = beta (h + log w) | False: z = beta h + log w


@register_loss("swepo", SWEPOConfig, needs_reference=True)
def swepo_loss(
    policy: GroupStats,
    ref: GroupStats,
    scores: Tensor,
    *,
    beta: float,
    mode: str,
    weighting: str,
    p: float,
    alpha: float,
    beta_on_weights: bool,
) -> LossOutput:
    """SWEPO, Eq. 11 (= 25 = 73) with the power weights of Eqs. 16-17, in the logit form of Eq. 14.

    h = log pi(y) - log pi_ref(y) (summed log-probs),  z = beta * h + log w
    L = -log( sum_{Y+} e^z / sum_{all} e^z ) = softplus(LSE_{Y-}(z) - LSE_{Y+}(z))

    Readings: weights w from ``weighting`` (see ``swepo_log_weights``; negatives use |dS|, the
    sign flip of Eq. 6); the paper never names beta: by default it scales the log-ratio only
    (Algorithm 1 scales the score after computing the weights), ``beta_on_weights`` scales
    h + log w; no length normalisation; the
    reference and the weights carry no gradient. ``mode="1vsk"``: Y+ = the top response (first
    index on ties), Y- = all others, weights from the mean of all K (only p = 0 is reported).
    Responses with w = 0 (power, p > 0, exactly at the mean) leave both sets; a group is valid
    when both sets keep a response.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    mask = policy.mask
    h = policy.logps - ref.logps.detach()  # (B, K) sequence log-ratios, Eqs. 7-8
    log_w, keep = swepo_log_weights(scores, mask, weighting, p, alpha)  # (B, K)
    z = beta * (h + log_w) if beta_on_weights else beta * h + log_w  # (B, K), Eq. 14
    split = mean_split if mode == "dynamic" else top_split
    pos, neg, valid = split(scores, mask)
    pos, neg = pos & keep, neg & keep
    valid = valid & pos.any(-1) & neg.any(-1)  # (B,)
    losses = zero_invalid(set_contrast(z, pos, neg, valid), valid)
    metrics = preference_metrics(beta * h, policy, scores)
    metrics |= {
        "swepo/positives": (pos & valid[:, None]).sum(-1).float(),
        "swepo/zero_weight": (mask & ~keep & valid[:, None]).sum(-1).float(),
    }
    return LossOutput(losses, valid, metrics)
