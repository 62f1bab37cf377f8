"""SPO: Soft Preference Optimization.

"Soft Preference Optimization: Aligning Language Models to Expert Distributions", Sharifnassab,
Salehkaleybar, Ghiassian, Kanoria, Schuurmans, arXiv 2405.00747. Readings and alternatives:
``docs/losses.md``, section SPO.

L_SPO = L_pref + kl_weight * D_KL(pi || pi_ref) (Eq. 6, Algorithm 1). kl_weight is the "beta"
that App. D.2 sweeps but never defines, read as the weight of the KL term (the only knob left;
beta on L_pref instead is less plausible). This module holds the preference term, a pure (B, K)
loss over summed response log-probs l = log pi(y|x) (never length-normalised); the per-position
piece of the regularizer (Eq. 15) is ``prefopt.model.logprobs.token_kl``. The preference term
does not use pi_ref; the ``on_policy_kl`` extra (``prefopt.train.extras.on_policy_kl``) adds
the KL term on on-policy samples (the ``kl_*`` config fields), which is where pi_ref enters.

Every form is built from one term on a set T that holds a response i and its competitors:
    term(i, T) = -(1/alpha) log( pi_i^alpha / sum_{j in T} pi_j^alpha )
               = -(1/alpha) log_softmax(alpha * l_T)_i  (= (1/alpha) softplus(-alpha dl) for a pair)
with T(i) = {i} + {j : score_j < score_i}, so tied responses never compete with each other.

Readings chosen here (the paper leaves these open):
- pairwise on K > 2: all ordered pairs with distinct scores (the winner scored higher), averaged,
  so every pair of a group is one draw of the BT pair distribution D of Theorem 1 with equal b.
- best_of_n with several top-scored responses: the mean of their terms (each against the
  strictly worse ones); one best response is Eq. 16 exactly.
- ranked with ties: responses with equal scores share a rank and leave each other out of T
  (a Breslow-style tie rule); strict rankings are Eq. 17 exactly. The decay is eta^(k-1) on the
  k-th term (the paper's eta^k leaves the offset open; k - 1 keeps the top term at 1, so K = 2
  is Eq. 11).
- n-ary mu (Eq. 13 is pairwise only): mu(T) = 2 sigmoid((sum_{j in T} pi_j)^gamma - E_hat), one mu
  per term set.
- E_hat ("the current batch" in the paper): the previous optimizer step's mean over every
  weighted set of the effective batch (all micro-batches and ranks, through ``state``); the
  micro-batch mean on the first step or without state. Any symmetric positive mu keeps the
  fixed point (Theorem 2a), so the lag is safe, while a micro-batch of one group (the paper's
  per-device batch) would make mu identically 1.
- alpha = 0: Eq. 10/12 for pairs; other sets use the alpha -> 0+ gradient limit
  -(l_i - mean_T l) (the paper's alpha = 0 claims do not hold: the loss is linear in the
  logits). Unbounded below: it needs the KL term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.common import has_preference, preference_metrics, zero_invalid
from prefopt.losses.registry import LossConfig, LossState, StateSpec, register_loss
from prefopt.types import GroupStats, LossOutput

FORMS = ("pairwise", "best_of_n", "ranked")
WEIGHTINGS = ("basic", "weighted")


def _init_state(**_: object) -> LossState:
    return {
        "mu_baseline": torch.zeros((), dtype=torch.float64),
        "mu_baseline_count": torch.zeros((), dtype=torch.float64),
    }


def _update_state(state: LossState, sums: dict[str, Tensor], **_: object) -> LossState:
    """E_hat for the next step: the mean of (sum_T pi)^gamma over this step's weighted sets."""
    count = sums.get("spo/mu_power_count")
    if count is None or float(count) == 0:
        return state
    return {
        "mu_baseline": (sums["spo/mu_power_sum"] / count).double().cpu(),
        "mu_baseline_count": count.double().cpu(),
    }


@dataclass
class SPOConfig(LossConfig):
    name: str = "spo"
    form: str = "pairwise"  # pairwise (Eq. 11) | best_of_n (Eq. 16) | ranked (Eq. 17)
    weighting: str = "weighted"  # weighted: mu of Eq. 13 ("SPO") | basic: mu = 1 ("SPO-basic")
    alpha: float = 0.001  # softmax exponent; fixed point Softmax(r/alpha); swept {1e-3, 1e-2, 1e-1}
    gamma: float = 0.01  # exponent in mu (Eq. 13); 0.01 in every weighted run, never swept
    eta: float = 1.0  # ranked only: decay eta^(k-1) of the k-th term (App. D.2 sweeps {1, 0.5})
    # Read by the on_policy_kl extra, not by the loss function (Algorithm 1, Eq. 15's estimator):
    kl_weight: float = 0.1  # beta on the token-wise KL (D.2 sweeps {0.01, 0.1}); 0 turns it off
    kl_every: int = 8  # T: regenerate the on-policy sample batch every T optimizer steps
    kl_num_samples: int = 32  # |B|: samples per regeneration, one per recent training prompt
    kl_max_new_tokens: int = 256  # generation length cap (MISSING in the paper; our choice)


@register_loss(
    "spo",
    SPOConfig,
    needs_reference=False,
    k=None,
    extras=("on_policy_kl",),
    state=StateSpec(_init_state, _update_state),
)
def spo_loss(
    policy: GroupStats,
    ref: GroupStats | None,
    scores: Tensor,
    *,
    form: str,
    weighting: str,
    alpha: float,
    gamma: float,
    eta: float,
    state: LossState | None = None,
) -> LossOutput:
    """SPO preference term (Eqs. 9-13, 16, 17); reference-free, ``ref`` is ignored.

    pairwise:  mean over pairs s_i > s_j of  mu_ij (1/alpha) softplus(-alpha (l_i - l_j))  (Eq. 11)
    best_of_n: -(mu/alpha) log_softmax(alpha l)_best                                       (Eq. 16)
    ranked:    -(1/alpha) sum_k eta^(k-1) mu_k log_softmax(alpha l_{tau(k..n)})_0           (Eq. 17)
    mu(T) = 2 sigmoid((sum_{j in T} pi_j)^gamma - E_hat), detached (Eqs. 13-14); basic: mu = 1.
    l = policy.logps, summed response log-probs with EOS. See the module docstring for readings.
    """
    if form not in FORMS or weighting not in WEIGHTINGS or alpha < 0:
        raise ValueError(
            f"spo: form in {FORMS}, weighting in {WEIGHTINGS}, alpha >= 0; got "
            f"{form!r}, {weighting!r}, {alpha}"
        )
    mask = policy.mask
    K = mask.shape[-1]
    valid = has_preference(scores, mask)  # (B,)
    ell = policy.logps.masked_fill(~mask, 0.0)  # (B, K); finite filler in empty slots
    real = mask & valid[:, None]
    beats = real[:, :, None] & real[:, None, :] & (scores[:, :, None] > scores[:, None, :])

    if form == "pairwise":  # sets T = {i, j}: (B, K, K) terms, pair (i, j) has i winning
        active = beats
        delta = ell[:, :, None] - ell[:, None, :]  # (B, K, K)
        terms = -0.5 * delta if alpha == 0 else F.softplus(-alpha * delta) / alpha
        set_lse = torch.logaddexp(ell[:, :, None], ell[:, None, :]).detach()  # log(pi_i + pi_j)
        offsets = torch.full_like(terms, 0.0 if alpha == 0 else math.log(2.0) / alpha)
    else:  # sets T(i) = {i} + {j : s_j < s_i}: (B, K) terms, (B, K, K) membership
        eye = torch.eye(K, dtype=torch.bool, device=mask.device)
        members = beats | eye  # the diagonal keeps every set non-empty (finite logsumexp)
        active = beats.any(-1)  # (B, K): responses with something to beat
        if form == "best_of_n":
            top = scores.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
            active = active & (scores == top)
        x = ell[:, None, :].expand(-1, K, -1).masked_fill(~members, float("-inf"))  # (B, K, K)
        size = members.sum(-1).to(ell.dtype)  # (B, K)
        if alpha == 0:
            terms = -(ell - (ell[:, None, :] * members).sum(-1) / size)
            offsets = torch.zeros_like(terms)
        else:
            terms = ((alpha * x).logsumexp(-1) - alpha * ell) / alpha
            offsets = size.log() / alpha
        set_lse = x.detach().logsumexp(-1)  # log sum_{j in T(i)} pi_j

    weights = active.to(ell.dtype)
    if form == "ranked" and eta != 1.0:
        n_better = (real[:, None, :] & (scores[:, None, :] > scores[:, :, None])).sum(-1)
        weights = weights * eta ** n_better.to(ell.dtype)
    stat_updates: dict[str, Tensor] = {}
    mu = torch.ones_like(terms)
    if weighting == "weighted":
        power = torch.exp(gamma * set_lse) * active  # (sum_T pi)^gamma, in log space
        n_sets = active.sum().to(ell.dtype)
        baseline = power.sum() / n_sets.clamp(min=1)  # micro-batch E_hat
        if state is not None:
            stored = state["mu_baseline"].to(ell.device, ell.dtype)
            has_stored = state["mu_baseline_count"].to(ell.device) > 0
            baseline = torch.where(has_stored, stored, baseline)
        mu = 2 * torch.sigmoid(power - baseline)
        stat_updates = {"spo/mu_power_sum": power.sum(), "spo/mu_power_count": n_sets}

    dims = tuple(range(1, terms.dim()))
    # Pairs and tied best responses are averaged; the ranked terms are summed as in Eq. 17.
    norm = 1.0 if form == "ranked" else active.sum(dims).clamp(min=1)
    losses = zero_invalid((mu * weights * terms).sum(dims) / norm, valid)  # (B,)
    excess = zero_invalid((mu * weights * (terms - offsets)).sum(dims) / norm, valid)
    rewards = (alpha if alpha > 0 else 0.5) * policy.logps  # r = alpha log pi at the fixed point
    metrics = preference_metrics(rewards, policy, scores)
    metrics |= {
        "spo/mu": ((mu * active).sum(dims) / active.sum(dims).clamp(min=1)).detach(),
        "spo/sets": active.sum(dims).to(ell.dtype),
        "spo/excess_loss": excess.detach(),  # loss minus its value at equal log-probs
    }
    return LossOutput(losses, valid, metrics, stat_updates)
