"""Baselines of the seed papers' comparisons: IPO, CPO, ORPO, R-DPO, SLiC-HF, RRHF, InfoNCA.

Pairwise losses (K = 2) read column 0 as chosen and column 1 as rejected, valid only where
scores[:, 0] > scores[:, 1] (as in ``pairwise.py``). RRHF and InfoNCA take any K >= 2 and go
through ``mask``. Standard forms: the SimPO paper's Table 3 (Meng et al. 2024, arXiv 2405.14734),
checked against the original papers; each docstring names the reading taken where a paper leaves
a choice (summed vs length-averaged log-probs, NLL normaliser, ties). The readings are collected
in ``docs/losses.md``, section Baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.common import (
    best_worst,
    has_preference,
    masked_logsumexp,
    preference_metrics,
    zero_invalid,
)
from prefopt.losses.pairwise import _ordered_pair
from prefopt.losses.registry import LossConfig, register_loss
from prefopt.types import GroupStats, LossOutput

_LN2 = math.log(2.0)


@dataclass
class IPOConfig(LossConfig):
    name: str = "ipo"
    tau: float = 0.1  # target margin 1/(2 tau) = 5; no paper default: TRL's beta 0.1 (SimPO grid)
    average_log_prob: bool = False  # False: summed log-ratios (paper); True: per-token (TRL)


@register_loss("ipo", IPOConfig, needs_reference=True, k=2)
def ipo_loss(
    policy: GroupStats, ref: GroupStats, scores: Tensor, *, tau: float, average_log_prob: bool
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): (h_w - h_l - 1/(2 tau))^2.

    "A General Theoretical Paradigm to Understand Learning from Human Preferences";
    h = log pi - log pi_ref.

    Reading: h uses summed response log-probs, the paper's log pi(y|x); ``average_log_prob``
    gives TRL's variant (both log-probs divided by |y| before the ratio). Implicit reward: h.
    """
    h = policy.logps - ref.logps  # (B, 2)
    h = h / policy.lengths if average_log_prob else h  # TRL: per-token means, ref on same |y|
    gap = h[:, 0] - h[:, 1] - 1.0 / (2.0 * tau)  # (B,)
    valid = _ordered_pair(scores, policy.mask)
    losses = zero_invalid(gap.square(), valid)
    metrics = preference_metrics(h, policy, scores) | {"ipo/gap": gap.detach()}
    return LossOutput(losses, valid, metrics)


@dataclass
class CPOConfig(LossConfig):
    name: str = "cpo"
    beta: float = 0.1  # CPO paper and TRL CPOConfig default
    lam: float = 1.0  # NLL weight: the paper adds L_NLL unweighted (TRL cpo_alpha 1.0)


@register_loss("cpo", CPOConfig, k=2)
def cpo_loss(
    policy: GroupStats, ref: GroupStats | None, scores: Tensor, *, beta: float, lam: float
) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417, Sec. 3: L_CPO = L_prefer + L_NLL; Eq. unverified).

    "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation".

    -log sigmoid(beta log pi_w - beta log pi_l) + lam * NLL(y_w)

    Reading: the preference term uses summed log-probs (DPO with a uniform reference, as the
    paper derives it); NLL(y_w) is the mean token NLL of the chosen response (-logps_w / |y_w|,
    as TRL). Reference-free; ``ref`` is ignored.
    """
    rewards = beta * policy.logps  # (B, 2)
    preference = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])  # (B,)
    nll = -policy.avg_logps[:, 0]  # (B,)
    valid = _ordered_pair(scores, policy.mask)
    losses = zero_invalid(preference + lam * nll, valid)
    metrics = preference_metrics(rewards, policy, scores)
    metrics |= {"cpo/preference": preference.detach(), "cpo/nll": nll.detach()}
    return LossOutput(losses, valid, metrics)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler 2012).

    x > -ln 2 uses log(-expm1(x)), otherwise log1p(-exp(x)). Each branch sees only inputs from
    its own range, so the branch torch.where drops stays finite and no NaN reaches backward.
    """
    near = x > -_LN2
    a = torch.where(near, x, torch.full_like(x, -_LN2))
    b = torch.where(near, torch.full_like(x, -_LN2), x)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def orpo_log_odds(avg_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) with p = exp(avg_logps): ORPO's odds of the length-normalised likelihood.

    avg_logps is clamped at -1e-12: p = 1 exactly (float32 can round a sum to 0) has infinite odds.
    """
    x = avg_logps.clamp(max=-1e-12)
    return x - log1mexp(x)


@dataclass
class ORPOConfig(LossConfig):
    name: str = "orpo"
    lam: float = 0.1  # odds-ratio weight lambda; the paper's value (TRL ORPOConfig beta 0.1)


@register_loss("orpo", ORPOConfig, k=2)
def orpo_loss(
    policy: GroupStats, ref: GroupStats | None, scores: Tensor, *, lam: float
) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 6-7): L_SFT + lam * L_OR.

    "ORPO: Monolithic Preference Optimization without Reference Model".

    L_SFT = -log pi_w / |y_w| (token-mean NLL of the chosen response, the paper's L_SFT);
    L_OR  = -log sigmoid(log odds(y_w) - log odds(y_l)), odds = p / (1 - p), p = exp(log pi / |y|).
    log(1 - p) goes through ``log1mexp`` (the NaN of trl#1473, #2564). Reference-free.
    Implicit reward: the log-odds.
    """
    log_odds = orpo_log_odds(policy.avg_logps)  # (B, 2)
    ratio = log_odds[:, 0] - log_odds[:, 1]  # (B,)
    nll = -policy.avg_logps[:, 0]  # (B,)
    valid = _ordered_pair(scores, policy.mask)
    losses = zero_invalid(nll - lam * F.logsigmoid(ratio), valid)
    metrics = preference_metrics(log_odds, policy, scores)
    metrics |= {"orpo/nll": nll.detach(), "orpo/log_odds_ratio": ratio.detach()}
    return LossOutput(losses, valid, metrics)


@dataclass
class RDPOConfig(LossConfig):
    name: str = "rdpo"
    beta: float = 0.1  # DPO's default
    alpha: float = 0.05  # per-token length weight; no paper default: smallest of SimPO's grid


@register_loss("rdpo", RDPOConfig, needs_reference=True, k=2)
def rdpo_loss(
    policy: GroupStats, ref: GroupStats, scores: Tensor, *, beta: float, alpha: float
) -> LossOutput:
    """R-DPO (Park et al. 2024, arXiv 2403.19159; SimPO Table 3 form, Eq. no. unverified).

    "Disentangling Length from Quality in Direct Preference Optimization" (length-regularised
    DPO).

    -log sigmoid(beta (h_w - h_l) + alpha (|y_w| - |y_l|)), h = log pi - log pi_ref (summed)

    Sign: the length penalty -alpha |y| in the RLHF objective moves into the implicit reward as
    +alpha |y|, so a longer chosen response already earns margin and is pushed up less. The
    alpha-DPO authors' code subtracts, and measures the batch size instead of the lengths; not
    copied. |y| counts response tokens including EOS.
    """
    rewards = beta * (policy.logps - ref.logps)  # (B, 2)
    length_margin = alpha * (policy.lengths[:, 0] - policy.lengths[:, 1])  # (B,)
    valid = _ordered_pair(scores, policy.mask)
    margin = rewards[:, 0] - rewards[:, 1] + length_margin
    losses = zero_invalid(-F.logsigmoid(margin), valid)
    metrics = preference_metrics(rewards, policy, scores)
    metrics["rdpo/length_margin"] = length_margin.detach()
    return LossOutput(losses, valid, metrics)


@dataclass
class SLiCHFConfig(LossConfig):
    name: str = "slic_hf"
    delta: float = 1.0  # calibration margin; SLiC-HF and HALOs slic.yaml (beta: 1.0)
    lam: float = 0.1  # regulariser weight; HALOs slic.yaml lambda_coef 0.1 (in SimPO's grid)


@register_loss("slic_hf", SLiCHFConfig, k=2)
def slic_hf_loss(
    policy: GroupStats, ref: GroupStats | None, scores: Tensor, *, delta: float, lam: float
) -> LossOutput:
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425; SimPO Table 3 form, Eq. unverified).

    "SLiC-HF: Sequence Likelihood Calibration with Human Feedback": calibration + regulariser.

    max(0, delta - log pi_w + log pi_l) - lam * log pi_w

    Reading: summed sequence log-probs in both terms (the paper's log P(y|x)); the regulariser's
    target is the chosen response (SimPO's Table 3; the paper's SFT reference y_ref is not in
    the data). Reference-free. Implicit reward: log pi.
    """
    hinge = F.relu(delta - policy.logps[:, 0] + policy.logps[:, 1])  # (B,)
    nll = -policy.logps[:, 0]  # (B,)
    valid = _ordered_pair(scores, policy.mask)
    losses = zero_invalid(hinge + lam * nll, valid)
    metrics = preference_metrics(policy.logps, policy, scores)
    metrics |= {"slic_hf/hinge": hinge.detach(), "slic_hf/nll": nll.detach()}
    return LossOutput(losses, valid, metrics)


@dataclass
class RRHFConfig(LossConfig):
    name: str = "rrhf"
    lam: float = 1.0  # SFT weight: the paper's L = L_rank + L_ft (official train.sh rrhf_weight 1)


@register_loss("rrhf", RRHFConfig)
def rrhf_loss(
    policy: GroupStats, ref: GroupStats | None, scores: Tensor, *, lam: float
) -> LossOutput:
    """RRHF (Yuan et al. 2023, arXiv 2304.05302, Eqs. 2-4): L_rank + lam * L_ft.

    "RRHF: Rank Responses to Align Language Models with Human Feedback without tears".

    p_i    = log pi(y_i) / |y_i|                        (Eq. 2, length-normalised)
    L_rank = sum_{r_i < r_j} max(0, p_i - p_j)         (Eq. 3, every ordered pair, not averaged)
    L_ft   = -log pi(y_best), summed over tokens        (Eq. 4, best = argmax r, first on ties)

    Reading: L_ft is the paper's summed NLL; the official code takes a token mean over padded
    positions and weights L_rank by rrhf_weight instead. Pairs with equal scores are skipped;
    a group without two distinct real scores is invalid. Reference-free.
    """
    mask = policy.mask
    p = policy.avg_logps.masked_fill(~mask, 0.0)  # (B, K); filler keeps garbage out
    real_pair = mask[:, :, None] & mask[:, None, :]  # (B, K, K)
    worse = real_pair & (scores[:, :, None] < scores[:, None, :])  # [b, i, j]: r_i < r_j
    rank = (F.relu(p[:, :, None] - p[:, None, :]) * worse).sum((-2, -1))  # (B,)
    best, _ = best_worst(scores, mask)
    sft = -policy.logps.gather(-1, best[:, None]).squeeze(-1)  # (B,)
    valid = has_preference(scores, mask)
    losses = zero_invalid(rank + lam * sft, valid)
    metrics = preference_metrics(p, policy, scores)
    metrics |= {"rrhf/rank": rank.detach(), "rrhf/sft": sft.detach()}
    return LossOutput(losses, valid, metrics)


@dataclass
class InfoNCAConfig(LossConfig):
    name: str = "infonca"
    beta: float = 0.01  # official yamls/*_qlora.yaml
    alpha: float = 0.0001  # reward temperature, target softmax(r / alpha): official 1e-4


@register_loss("infonca", InfoNCAConfig, needs_reference=True)
def infonca_loss(
    policy: GroupStats, ref: GroupStats, scores: Tensor, *, beta: float, alpha: float
) -> LossOutput:
    """InfoNCA (Chen et al. 2024, arXiv 2402.05369; Eq. no. unverified; SWEPO's Eqs. 23-24).

    "Noise Contrastive Alignment of Language Models with Explicit Rewards" (InfoNCA and NCA).

    -sum_i softmax_i(r / alpha) * log softmax_i(beta * (log pi_i - log pi_ref_i))

    Both softmaxes run over the real responses only. ``alpha`` divides the rewards, as the
    official code's ``temperature_alpha`` does (its comment calls that 1 / paper_alpha); 1e-4
    makes the target nearly one-hot on the best response. Tied top scores share the target
    mass: the official +0.01 bonus to the first response is not copied. A group whose scores
    are all equal is invalid. Implicit reward: beta * (log pi - log pi_ref).
    """
    valid = has_preference(scores, policy.mask)
    keep = policy.mask & valid[:, None]  # (B, K)
    real = keep | ~valid[:, None]  # invalid groups: every slot, so no softmax is empty
    z = (beta * (policy.logps - ref.logps)).masked_fill(~keep, 0.0)  # (B, K)
    r = (scores / alpha).masked_fill(~keep, 0.0)
    target = r.masked_fill(~real, float("-inf")).softmax(-1)  # exactly 0 off ``real``
    log_p = z - masked_logsumexp(z, real)[:, None]  # finite everywhere
    losses = zero_invalid(-(target * log_p).sum(-1), valid)
    metrics = preference_metrics(beta * (policy.logps - ref.logps), policy, scores)
    return LossOutput(losses, valid, metrics)
