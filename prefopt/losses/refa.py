"""REFA: Reference Free Alignment for multi-preference optimization.

Gupta, Madhavan, Zhang, Bansal, Rajmohan, arXiv 2412.16378 (the early version with Eqs. 1-34;
the later version's EOS regularizers are not implemented). Readings and alternatives:
``docs/losses.md``, section REFA.

Notation: mean split Y+ = {r > r_bar}, Y- = {r <= r_bar} (Eqs. 1-2: ties with the mean are
negative), length-normalised log-probs l_bar = logps / lengths (Eq. 3; the paper does not say
whether EOS counts in |y|, here it does), deviation dS = (r - r_bar)^p (App. C.4), EOS regularizer
R (Eq. 33).

Groups without signal (all scores equal, so Y+ is empty and the loss would be -log 0; or fewer
than 2 real responses) are invalid: no loss (their EOS regularizer is dropped too), excluded from
the batch mean and counted in ``skipped_groups``.

Variants: ``refa_dynamic`` (Eq. 34, the paper's method), ``refa_1vsall`` (Eq. 20 + LN + R), and
the three reference-free InfoNCA variants ``refa_infonca``, ``refa_infonca_dynamic`` and
``refa_infonca_1vsall`` (named in Table 3 only; their formulas are rebuilt here from App. A-C).
The InfoNCA target temperature is ``target_alpha``, distinct from the deviation scale ``alpha``
of Eq. 8 (the paper calls both alpha).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import ConfigError
from prefopt.losses.common import (
    best_worst,
    has_preference,
    masked_logsumexp,
    masked_mean,
    preference_metrics,
    zero_invalid,
)
from prefopt.losses.registry import LossConfig, register_loss
from prefopt.types import GroupStats, LossOutput

DEVIATIONS = ("signed", "abs")


def check_deviation(p: float, mode: str) -> None:
    """``loss.deviation`` and ``loss.p``: a negative deviation to a fractional power is not real."""
    if mode not in DEVIATIONS:
        raise ConfigError(f"loss.deviation={mode!r}: expected one of {DEVIATIONS}")
    if mode == "signed" and p != int(p):
        raise ConfigError(
            f"loss.p={p} with loss.deviation=signed: (r - r_bar)^p is not a real number for a "
            "fractional p and a response below the mean",
            fix="use an integer loss.p, or loss.deviation=abs (|r - r_bar|^p)",
        )


def check_gamma(gamma: float) -> None:
    if gamma < 0:
        raise ConfigError(f"loss.gamma={gamma}: must be >= 0 (the weight of the negative set)")


def score_deviation(scores: Tensor, mask: Tensor, p: float, mode: str) -> Tensor:
    """(B, K) dS = (r - r_bar)^p ("signed", App. C.4 literally) or |r - r_bar|^p ("abs", SWEPO)."""
    check_deviation(p, mode)
    centred = scores - masked_mean(scores, mask)[:, None]
    return centred.pow(p) if mode == "signed" else centred.abs().pow(p)


def eos_regularizer(policy: GroupStats, lam: float) -> Tensor:
    """(B,) Eq. 33: R = lam * sum_y P(EOS at |y|) over all real responses that end in EOS.

    Not divided by K. lam > 0 penalises the EOS probability where the data end a response
    (longer outputs, Table 4); responses truncated before their EOS are left out.
    """
    keep = policy.mask & policy.has_eos
    return lam * (policy.eos_logps.exp() * keep).sum(-1)


def mean_split(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, K) Y+ = {r > r_bar} (Eq. 1), Y- = the other real responses (Eq. 2: ties with the mean
    are negative), and (B,) validity: both sets non-empty.

    Validity is read from the sets (an empty Y+ means all scores are equal), not from the
    scores: with near-equal scores the rounded mean can reach the maximum.
    """
    r_bar = masked_mean(scores, mask)[:, None]
    pos = mask & (scores > r_bar)
    neg = mask & ~pos
    return pos, neg, pos.any(-1) & neg.any(-1)


def top_split(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, K) Y+ = {argmax r}, Y- = every other real response (Eq. 20), and (B,) validity.

    Ties for the top go to the first index (the paper does not say; its App. C.3 example "pick
    the first '8'" suggests it), so a tied runner-up is a negative. Valid where the real scores
    are not all equal.
    """
    best, _ = best_worst(scores, mask)
    pos = F.one_hot(best, scores.shape[-1]).bool() & mask
    return pos, mask & ~pos, has_preference(scores, mask)


def set_contrast(z: Tensor, pos: Tensor, neg: Tensor, valid: Tensor, gamma: float = 1.0) -> Tensor:
    """(B,) -log(A / (A + gamma B)), A = sum_{Y+} e^z, B = sum_{Y-} e^z, in the stable form
    softplus(log gamma + LSE_{Y-}(z) - LSE_{Y+}(z)), the same value without overflow.

    Slots outside both sets reach neither the value nor the gradient. Invalid rows get both sets
    filled (other slots' z set to 0) so that the LSEs stay finite and no NaN reaches backward;
    callers zero those rows.
    """
    check_gamma(gamma)
    z = z.masked_fill(~(pos | neg), 0.0)
    pos, neg = pos | ~valid[:, None], neg | ~valid[:, None]
    log_gamma = torch.log(torch.as_tensor(gamma, dtype=z.dtype, device=z.device))
    return F.softplus(log_gamma + masked_logsumexp(z, neg) - masked_logsumexp(z, pos))


# ----------------------------------------------------------------------------------------------
# REFA-dynamic and REFA-1-vs-all: weighted set contrast + EOS regularizer
# ----------------------------------------------------------------------------------------------


@dataclass
class REFADynamicConfig(LossConfig):
    name: str = "refa_dynamic"
    beta: float = 2.5  # inverse temperature on l_bar + alpha*dS (paper's Sec. 7 range: 2.0-4.0)
    gamma: float = 1.0  # weight of the negative set (paper's Sec. 7 range: 0.7-1.4)
    alpha: float = 0.5  # deviation-weight scale, Eq. 8 (no value reported in the paper)
    p: float = 2.0  # deviation power (App. C.4); p = 2 is the headline method
    deviation: str = "signed"  # signed (r - r_bar)^p as printed | abs |r - r_bar|^p (SWEPO)
    lam: float = 0.05  # EOS regularizer weight, Eq. 33 ("a small constant"; none reported)
    length_normalize: bool = True  # False gives REFABASE-dynamic (Eq. 21)

    def check(self) -> None:
        check_gamma(self.gamma)
        check_deviation(self.p, self.deviation)


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
    """REFA-dynamic, Eq. 34 = Eq. 24 (Eq. 11) + Eq. 33, in a numerically stable form.

    z_y = beta * (l_bar_y + alpha * dS_y)
    L   = softplus(log gamma + LSE_{Y-}(z) - LSE_{Y+}(z)) + lam * sum_y P(EOS at |y|)
    which equals -log(A / (A + gamma * B)) + R with A = sum_{Y+} e^z, B = sum_{Y-} e^z.
    Reference-free; ``ref`` is ignored.
    """
    pos, neg, valid = mean_split(scores, policy.mask)  # Eqs. 1-2; (B, K), (B, K), (B,)
    out = _weighted_contrast(
        policy,
        scores,
        pos,
        neg,
        valid,
        beta=beta,
        gamma=gamma,
        alpha=alpha,
        p=p,
        deviation=deviation,
        lam=lam,
        length_normalize=length_normalize,
    )
    out.metrics["refa/positives"] = (pos & valid[:, None]).sum(-1).float()
    return out


def _weighted_contrast(
    policy: GroupStats,
    scores: Tensor,
    pos: Tensor,
    neg: Tensor,
    valid: Tensor,
    *,
    beta: float,
    gamma: float,
    alpha: float,
    p: float,
    deviation: str,
    lam: float,
    length_normalize: bool,
) -> LossOutput:
    """The loss both REFA-dynamic and REFA-1-vs-all share, given their sets Y+ and Y-:
    softplus(log gamma + LSE_{Y-}(z) - LSE_{Y+}(z)) + R, z = beta (l_bar + alpha dS)."""
    ell = policy.avg_logps if length_normalize else policy.logps  # (B, K)
    z = beta * (ell + alpha * score_deviation(scores, policy.mask, p, deviation))  # (B, K)
    contrastive = set_contrast(z, pos, neg, valid, gamma)
    reg = eos_regularizer(policy, lam)
    metrics = preference_metrics(beta * ell, policy, scores)
    metrics |= {"refa/contrastive": contrastive.detach(), "refa/eos_reg": reg.detach()}
    return LossOutput(zero_invalid(contrastive + reg, valid), valid, metrics)


@dataclass
class REFA1vsAllConfig(LossConfig):
    name: str = "refa_1vsall"
    beta: float = 3.0  # inverse temperature on l_bar + alpha*dS (Sec. 7 range 2.0-4.0, midpoint)
    gamma: float = 1.05  # weight of the negative set (paper's Sec. 7 range 0.7-1.4, midpoint)
    alpha: float = 0.5  # deviation-weight scale, Eq. 8 (no value reported in the paper)
    p: float = 2.0  # deviation power (App. C.4); only p = 2 is reported for 1-vs-all (Table 3)
    deviation: str = "signed"  # signed (r - r_bar)^p as printed | abs |r - r_bar|^p (SWEPO)
    lam: float = 0.05  # EOS regularizer weight, Eq. 33 ("a small constant"; none reported)
    length_normalize: bool = True  # False gives REFABASE-1vsAll exactly as printed (Eq. 20)

    def check(self) -> None:
        check_gamma(self.gamma)
        check_deviation(self.p, self.deviation)


@register_loss("refa_1vsall", REFA1vsAllConfig)
def refa_1vsall_loss(
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
    """REFA-1-vs-all (Table 3): Eq. 20 with l_bar (Eq. 3) and the EOS regularizer (Eq. 33).

    z_y = beta * (l_bar_y + alpha * dS_y),  Y+ = {argmax r},  Y- = every other real response
    L   = softplus(log gamma + LSE_{Y-}(z) - LSE_{Y+}(z)) + lam * sum_y P(EOS at |y|)

    Reading: the paper prints only Eq. 20 (no LN, no R) and does not say whether Table 3's row
    adds them; here LN and R are added the way Eq. 24 and Eq. 34 add them to the dynamic loss
    (``length_normalize=False, lam=0`` is Eq. 20). dS uses the mean of all K scores, as printed,
    so Y- holds above-mean runners-up, which under p = 1 get the largest negative weights. Top
    ties: first index. Reference-free.
    """
    pos, neg, valid = top_split(scores, policy.mask)
    out = _weighted_contrast(
        policy,
        scores,
        pos,
        neg,
        valid,
        beta=beta,
        gamma=gamma,
        alpha=alpha,
        p=p,
        deviation=deviation,
        lam=lam,
        length_normalize=length_normalize,
    )
    above_mean = neg & (scores > masked_mean(scores, policy.mask)[:, None]) & valid[:, None]
    out.metrics["refa/above_mean_negatives"] = above_mean.sum(-1).float()
    return out


# ----------------------------------------------------------------------------------------------
# Reference-free InfoNCA variants (named in Table 3; rebuilt from App. A-C)
# ----------------------------------------------------------------------------------------------


def _log_softmax(x: Tensor, support: Tensor, valid: Tensor) -> Tensor:
    """(B, K) log softmax over each row's ``support`` slots; finite filler elsewhere.

    Invalid rows normalise over every slot (masked-out values set to 0) so nothing is -inf or NaN.
    """
    x = x.masked_fill(~support, 0.0)
    return x - masked_logsumexp(x, support | ~valid[:, None])[:, None]


def _infonca_output(
    policy: GroupStats,
    scores: Tensor,
    valid: Tensor,
    c: Tensor,
    *,
    beta: float,
    lam: float,
    length_normalize: bool,
) -> LossOutput:
    """L = -sum_i c_i log softmax_i(beta * l_bar) + R, softmax over all real responses (Eq. 19).

    ``c`` (B, K) holds the target weights of the variant, 0 outside its sum; no gradient.
    """
    ell = policy.avg_logps if length_normalize else policy.logps  # (B, K)
    log_model = _log_softmax(beta * ell, policy.mask, valid)  # (B, K) log p^model
    contrastive = -(c * log_model).sum(-1)
    reg = eos_regularizer(policy, lam)
    losses = zero_invalid(contrastive + reg, valid)
    metrics = preference_metrics(beta * ell, policy, scores)
    metrics |= {
        "refa/contrastive": contrastive.detach(),
        "refa/eos_reg": reg.detach(),
        "refa/target_mass": torch.where(valid, c.sum(-1), 0.0).detach(),
    }
    return LossOutput(losses, valid, metrics)


def _target(scores: Tensor, support: Tensor, valid: Tensor, target_alpha: float) -> Tensor:
    """(B, K) p^target = softmax(target_alpha * r) over ``support`` (Eq. 14), 0 elsewhere."""
    log_p = _log_softmax(target_alpha * scores.detach(), support, valid)
    return log_p.exp().masked_fill(~support, 0.0)


@dataclass
class REFAInfoNCAConfig(LossConfig):
    name: str = "refa_infonca"
    beta: float = 2.25  # inverse temperature on l_bar (paper's Sec. 7 range 2.0-2.5, midpoint)
    target_alpha: float = 1.0  # p^target = softmax(target_alpha * r), Eq. 14 (none reported)
    lam: float = 0.0  # EOS regularizer weight, Eq. 33; the paper does not say R is added
    length_normalize: bool = True  # l_bar (Eq. 3) in the model softmax; False: summed logps


@register_loss("refa_infonca", REFAInfoNCAConfig)
def refa_infonca_loss(
    policy: GroupStats,
    ref: GroupStats | None,
    scores: Tensor,
    *,
    beta: float,
    target_alpha: float,
    lam: float,
    length_normalize: bool,
) -> LossOutput:
    """REFA-InfoNCA (Table 3; reference-free InfoNCA, Eq. 19 with Eq. 14's target).

    L = -sum_{i=1..K} p_i^target log softmax_i(beta * l_bar) [+ lam * sum_y P(EOS at |y|)]

    Reading (the paper names this variant but prints no formula): LN and beta as in Eq. 24 (the
    paper's beta range 2.0-2.5 is a per-token scale); no deviation weights, no gamma; R off by
    default (lam = 0), since the paper does not say it is added.
    Groups whose scores are all equal (a uniform target, no preference) are invalid.
    """
    valid = has_preference(scores, policy.mask)
    c = _target(scores, policy.mask, valid, target_alpha)
    return _infonca_output(
        policy, scores, valid, c, beta=beta, lam=lam, length_normalize=length_normalize
    )


@dataclass
class REFAInfoNCADynamicConfig(REFAInfoNCAConfig):
    name: str = "refa_infonca_dynamic"
    renormalize_target: bool = False  # False keeps p^target over all K (Fix 1 as printed)


@register_loss("refa_infonca_dynamic", REFAInfoNCADynamicConfig)
def refa_infonca_dynamic_loss(
    policy: GroupStats,
    ref: GroupStats | None,
    scores: Tensor,
    *,
    beta: float,
    target_alpha: float,
    lam: float,
    length_normalize: bool,
    renormalize_target: bool,
) -> LossOutput:
    """REFA-InfoNCA (dynamic) (Table 3; App. C.1 "Fix 1": drop the below-mean terms).

    L = -sum_{i in Y+} p_i^target log softmax_i(beta * l_bar) [+ R],  softmax over all K

    Reading (named but not printed in the paper): Fix 1 with Y+ = {r > r_bar} (Eq. 1). The paper
    leaves open whether p^target is renormalised over Y+: by default it is the softmax over all
    K, as Fix 1 prints it; ``renormalize_target`` renormalises. R off by default (lam = 0).
    """
    mask = policy.mask
    pos, _, valid = mean_split(scores, mask)
    c = _target(scores, pos if renormalize_target else mask, valid, target_alpha)
    c = c.masked_fill(~pos, 0.0)
    out = _infonca_output(
        policy, scores, valid, c, beta=beta, lam=lam, length_normalize=length_normalize
    )
    out.metrics["refa/positives"] = (pos & valid[:, None]).sum(-1).float()
    return out


@dataclass
class REFAInfoNCA1vsAllConfig(REFAInfoNCAConfig):
    name: str = "refa_infonca_1vsall"
    target_weight: bool = False  # False c = 1 (Fix 2 as printed) | True c = p^target_top


@register_loss("refa_infonca_1vsall", REFAInfoNCA1vsAllConfig)
def refa_infonca_1vsall_loss(
    policy: GroupStats,
    ref: GroupStats | None,
    scores: Tensor,
    *,
    beta: float,
    target_alpha: float,
    lam: float,
    length_normalize: bool,
    target_weight: bool,
) -> LossOutput:
    """REFA-InfoNCA (1-vs-all) (Table 3; App. C.2 "Fix 2").

    L = -c * log softmax_{i*}(beta * l_bar) [+ R],  i* = argmax r (first index on ties)

    Reading (named but not printed in the paper): the weight c is left open; c = 1 by default
    (Fix 2 as printed) or c = p_{i*}^target (``target_weight``), and ``target_alpha`` matters only
    then. A per-positive loss over Y+ (another reading of the paper's Section 8) is not offered.
    R off by default (lam = 0).
    """
    mask = policy.mask
    top, _, valid = top_split(scores, mask)
    c = top.to(policy.logps.dtype)
    if target_weight:
        c = c * _target(scores, mask, valid, target_alpha)
    return _infonca_output(
        policy, scores, valid, c, beta=beta, lam=lam, length_normalize=length_normalize
    )
