# Run: .venv/bin/pytest tests/test_losses_baselines.py -q
"""Tests for prefopt.losses.baselines: IPO, CPO, ORPO, R-DPO, SLiC-HF, RRHF, InfoNCA.

Expected values come from python ``math`` on explicit numbers or python-float loops over the
responses, never from the torch expression of the loss itself.
"""

from __future__ import annotations

import decimal
import math

import pytest
import torch
from loss_helpers import F64, TOL, assert_detached_metrics, neg_log_sigmoid, random_stats, stats, t
from torch.testing import assert_close

from prefopt.losses import LOSSES
from prefopt.losses.baselines import (
    cpo_loss,
    infonca_loss,
    ipo_loss,
    log1mexp,
    orpo_log_odds,
    orpo_loss,
    rdpo_loss,
    rrhf_loss,
    slic_hf_loss,
)
from prefopt.losses.pairwise import dpo_loss
from prefopt.types import GroupStats

# Pairwise fixtures: two ordered pairs, a tie (invalid) and a reversed pair (invalid).
POLICY = [[-10.0, -12.0], [-20.0, -15.0], [-5.0, -6.0], [-7.0, -9.0]]
REF = [[-11.0, -11.5], [-19.0, -17.0], [-5.5, -5.0], [-7.5, -8.0]]
LENGTHS = [[4.0, 6.0], [10.0, 5.0], [2.0, 2.0], [3.0, 3.0]]
PAIR_SCORES = [[8.0, 3.0], [0.9, 0.2], [5.0, 5.0], [1.0, 4.0]]
PAIR_VALID = [True, True, False, False]


def masked_by_validity(values: list[float]) -> list[float]:
    return [v if ok else 0.0 for v, ok in zip(values, PAIR_VALID, strict=True)]


# ----------------------------------------------------------------------------------------------
# IPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_ipo_hand_value(average_log_prob):
    tau = 0.1
    expected = []
    for (pw, pl), (rw, rl), (lw, ll) in zip(POLICY, REF, LENGTHS, strict=True):
        if average_log_prob:
            margin = (pw / lw - rw / lw) - (pl / ll - rl / ll)
        else:
            margin = (pw - rw) - (pl - rl)
        expected.append((margin - 1 / (2 * tau)) ** 2)
    # Group 0 summed by hand: (1 - (-0.5) - 5)^2 = 12.25.
    assert math.isclose(expected[0], 12.25) or average_log_prob
    out = ipo_loss(
        stats(POLICY, LENGTHS),
        stats(REF, LENGTHS),
        t(PAIR_SCORES),
        tau=tau,
        average_log_prob=average_log_prob,
    )
    assert out.valid.tolist() == PAIR_VALID
    assert_close(out.losses, t(masked_by_validity(expected)), **TOL)


def test_ipo_optimum_has_zero_loss_and_gradient():
    tau = 0.25  # target margin 1 / (2 tau) = 2, exact in binary
    policy = stats([[-3.0, -5.0], [-1.0, -4.5]], grad=True)
    ref = stats([[0.0, 0.0], [-2.0, -3.5]])
    out = ipo_loss(policy, ref, t([[1.0, 0.0], [1.0, 0.0]]), tau=tau, average_log_prob=False)
    assert_close(out.losses, torch.zeros(2, dtype=F64), rtol=0, atol=0)
    out.losses.sum().backward()
    assert_close(policy.logps.grad, torch.zeros(2, 2, dtype=F64), rtol=0, atol=0)


def test_ipo_gradient_signs_below_and_above_target():
    policy = stats(POLICY, grad=True)
    out = ipo_loss(policy, stats(REF), t(PAIR_SCORES), tau=0.1, average_log_prob=False)
    out.losses.sum().backward()
    grad = policy.logps.grad
    # Margins 1.5 and -3 are below the target 5: chosen pushed up, rejected down.
    assert (grad[:2, 0] < 0).all() and (grad[:2, 1] > 0).all()
    assert_close(grad[2:], torch.zeros(2, 2, dtype=F64), rtol=0, atol=0)
    # Above the target IPO pulls the margin back (its regularisation, unlike DPO).
    above = stats([[0.0, -20.0]], grad=True)
    ipo_loss(above, stats([[0.0, 0.0]]), t([[1.0, 0.0]]), tau=0.1, average_log_prob=False)[
        0
    ].sum().backward()
    assert above.logps.grad[0, 0] > 0 and above.logps.grad[0, 1] < 0


# ----------------------------------------------------------------------------------------------
# CPO
# ----------------------------------------------------------------------------------------------


def test_cpo_hand_value():
    beta, lam = 0.1, 1.0
    # Group 0 by hand: -log sigmoid(0.1 * (-10 + 12)) + 10 / 4 = -log sigmoid(0.2) + 2.5.
    assert math.isclose(neg_log_sigmoid(0.2) + 2.5, 0.5981388693815918 + 2.5, rel_tol=1e-12)
    expected = [
        neg_log_sigmoid(beta * (pw - pl)) + lam * (-pw / lw)
        for (pw, pl), (lw, _) in zip(POLICY, LENGTHS, strict=True)
    ]
    out = cpo_loss(stats(POLICY, LENGTHS), None, t(PAIR_SCORES), beta=beta, lam=lam)
    assert out.valid.tolist() == PAIR_VALID
    assert_close(out.losses, t(masked_by_validity(expected)), **TOL)
    assert_close(out.metrics["cpo/nll"][:2], t([2.5, 2.0]), **TOL)


def test_cpo_without_nll_is_dpo_with_zero_reference():
    policy = random_stats(6, 2, seed=1)[0]
    scores = t([[3.0, 1.0], [2.0, 2.0], [0.0, 5.0], [9.0, 8.0], [4.0, 0.0], [7.0, 6.0]])
    zero_ref = stats(torch.zeros(6, 2, dtype=F64), policy.lengths)
    cpo = cpo_loss(policy, None, scores, beta=0.3, lam=0.0)
    dpo = dpo_loss(policy, zero_ref, scores, beta=0.3, label_smoothing=0.0)
    assert_close(cpo.losses, dpo.losses, **TOL)
    assert torch.equal(cpo.valid, dpo.valid)


# ----------------------------------------------------------------------------------------------
# ORPO
# ----------------------------------------------------------------------------------------------


def log_odds_hand(a: float) -> float:
    p = math.exp(a)
    return math.log(p / (1.0 - p))


def test_orpo_hand_value():
    lam = 0.1
    expected = []
    for (pw, pl), (lw, ll) in zip(POLICY, LENGTHS, strict=True):
        ratio = log_odds_hand(pw / lw) - log_odds_hand(pl / ll)
        expected.append(-pw / lw + lam * neg_log_sigmoid(ratio))
    # Group 0 by hand: a_w = -2.5, a_l = -2; log odds = a - log(1 - e^a).
    by_hand = -2.5 - math.log(1 - math.exp(-2.5)) - (-2.0 - math.log(1 - math.exp(-2.0)))
    assert math.isclose(by_hand, log_odds_hand(-2.5) - log_odds_hand(-2.0), rel_tol=1e-12)
    out = orpo_loss(stats(POLICY, LENGTHS), None, t(PAIR_SCORES), lam=lam)
    assert out.valid.tolist() == PAIR_VALID
    assert_close(out.losses, t(masked_by_validity(expected)), **TOL)
    assert_close(out.metrics["orpo/log_odds_ratio"][0].item(), by_hand, **TOL)


@pytest.mark.parametrize("x", [-1e-12, -1e-8, -1e-3, -0.5, -math.log(2), -0.7, -3.0, -50.0])
def test_log1mexp_matches_50_digit_decimal(x):
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        expected = float((1 - decimal.Decimal(x).exp()).ln())
    assert_close(log1mexp(t([x])).item(), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_orpo_log_odds_finite_at_extremes(dtype):
    avg = [[-1e-8, -50.0], [-50.0, -1e-8], [0.0, -1.0], [-1e-30, -1e-20]]
    policy = stats(avg, grad=True, dtype=dtype)
    out = orpo_loss(policy, None, t([[1.0, 0.0]] * 4, dtype), lam=0.1)
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(policy.logps.grad).all()
    log_odds = orpo_log_odds(t(avg, dtype))
    assert torch.isfinite(log_odds).all()
    # p = exp(-1e-8): odds ~ 1e8; p = exp(-50): log odds ~ -50.
    rtol = 1e-6 if dtype == F64 else 1e-5
    assert_close(log_odds[0, 0].item(), -math.log(-math.expm1(-1e-8)) - 1e-8, rtol=rtol, atol=0)
    assert_close(log_odds[0, 0].item(), log_odds_hand(-1e-8), rtol=rtol, atol=0)
    assert_close(log_odds[0, 1].item(), -50.0, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------
# R-DPO
# ----------------------------------------------------------------------------------------------


def test_rdpo_hand_value_and_sign():
    beta, alpha = 0.1, 0.05
    expected = [
        neg_log_sigmoid(beta * ((pw - rw) - (pl - rl)) + alpha * (lw - ll))
        for (pw, pl), (rw, rl), (lw, ll) in zip(POLICY, REF, LENGTHS, strict=True)
    ]
    # Group 0 by hand: 0.1 * 1.5 + 0.05 * (4 - 6) = 0.05.
    assert math.isclose(expected[0], neg_log_sigmoid(0.05))
    out = rdpo_loss(
        stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(PAIR_SCORES), beta=beta, alpha=alpha
    )
    assert_close(out.losses, t(masked_by_validity(expected)), **TOL)
    # A longer chosen response earns margin, so its loss is lower than with equal lengths.
    longer = rdpo_loss(
        stats([[-10.0, -12.0]], [[9.0, 3.0]]),
        stats([[-11.0, -11.5]]),
        t([[1.0, 0.0]]),
        beta=beta,
        alpha=alpha,
    )
    equal = rdpo_loss(
        stats([[-10.0, -12.0]], [[3.0, 3.0]]),
        stats([[-11.0, -11.5]]),
        t([[1.0, 0.0]]),
        beta=beta,
        alpha=alpha,
    )
    assert longer.losses.item() < equal.losses.item()


def test_rdpo_without_length_term_is_dpo():
    policy = random_stats(6, 2, seed=2)[0]
    ref = random_stats(6, 2, seed=3)[0]
    scores = t([[3.0, 1.0], [2.0, 2.0], [0.0, 5.0], [9.0, 8.0], [4.0, 0.0], [7.0, 6.0]])
    rdpo = rdpo_loss(policy, ref, scores, beta=0.2, alpha=0.0)
    dpo = dpo_loss(policy, ref, scores, beta=0.2, label_smoothing=0.0)
    assert_close(rdpo.losses, dpo.losses, **TOL)
    assert torch.equal(rdpo.valid, dpo.valid)


# ----------------------------------------------------------------------------------------------
# SLiC-HF
# ----------------------------------------------------------------------------------------------


def test_slic_hf_hand_value():
    delta, lam = 1.0, 0.1
    expected = [max(0.0, delta - pw + pl) - lam * pw for pw, pl in POLICY]
    # Group 0 by hand: max(0, 1 + 10 - 12) + 0.1 * 10 = 0 + 1; group 1: max(0, 1 + 20 - 15) + 2 = 8.
    assert expected[:2] == [1.0, 8.0]
    out = slic_hf_loss(stats(POLICY), None, t(PAIR_SCORES), delta=delta, lam=lam)
    assert out.valid.tolist() == PAIR_VALID
    assert_close(out.losses, t(masked_by_validity(expected)), **TOL)


def test_slic_hf_without_nll_is_zero_beyond_the_margin():
    policy = stats([[-3.0, -9.0], [-1.0, -2.5]], grad=True)  # margins 6 and 1.5 > delta = 1
    out = slic_hf_loss(policy, None, t([[1.0, 0.0], [1.0, 0.0]]), delta=1.0, lam=0.0)
    assert_close(out.losses, torch.zeros(2, dtype=F64), rtol=0, atol=0)
    out.losses.sum().backward()
    assert_close(policy.logps.grad, torch.zeros(2, 2, dtype=F64), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# RRHF
# ----------------------------------------------------------------------------------------------


def rrhf_direct(policy: GroupStats, scores: torch.Tensor, lam: float) -> list[float]:
    """Eqs. 2-4 with python loops over the real responses; 0 where no pair is ordered."""
    logps, lengths, mask = policy.logps.tolist(), policy.lengths.tolist(), policy.mask.tolist()
    out = []
    for b, row in enumerate(scores.tolist()):
        real = [k for k in range(len(row)) if mask[b][k]]
        p = {k: logps[b][k] / lengths[b][k] for k in real}
        pairs = [(i, j) for i in real for j in real if row[i] < row[j]]
        if not pairs:
            out.append(0.0)
            continue
        rank = sum(max(0.0, p[i] - p[j]) for i, j in pairs)
        best = max(real, key=lambda k: (row[k], -k))  # first index among the top scores
        out.append(rank + lam * -logps[b][best])
    return out


def test_rrhf_hand_value():
    # p = (-1, -0.5, -2, -0.25); r = (3, 1, 2, 0). Ordered pairs (worse, better) with p_i > p_j:
    # (1 vs 0): -0.5 > -1 -> 0.5; (1 vs 2): -0.5 > -2 -> 1.5; (3 vs 0): 0.75; (3 vs 1): 0.25;
    # (3 vs 2): 1.75; (2 vs 0): -2 < -1 -> 0. Rank = 4.75; best = 0, SFT = -logps_0 = 4.
    policy = stats([[-4.0, -1.0, -6.0, -0.5]], [[4.0, 2.0, 3.0, 2.0]])
    scores = t([[3.0, 1.0, 2.0, 0.0]])
    out = rrhf_loss(policy, None, scores, lam=0.5)
    assert_close(out.losses, t([4.75 + 0.5 * 4.0]), **TOL)
    assert_close(out.losses, t(rrhf_direct(policy, scores, 0.5)), **TOL)
    assert_close(out.metrics["rrhf/rank"], t([4.75]), **TOL)


# K = 4 groups with the edge cases of a ranking loss: distinct scores, two pairs of ties, all
# tied (no preference), an outlier, tied runners-up (RRHF and InfoNCA both use it)
TIED_SCORES = [
    [9.0, 3.0, 5.0, 1.0],
    [2.0, 2.0, 4.0, 4.0],
    [6.0, 6.0, 6.0, 6.0],
    [1.0, 7.0, 0.0, 50.0],
    [3.0, 9.0, 9.0, 2.0],
]


def test_rrhf_matches_direct_on_random_groups_with_ties_and_padding():
    policy = random_stats(6, 4, seed=4)[0]
    scores = t([*TIED_SCORES, [0.0, 1.0, 2.0, 3.0]])
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[3, 3] = False
    mask[5, 1:] = False  # one real response: invalid
    policy = policy._replace(mask=mask)
    out = rrhf_loss(policy, None, scores, lam=0.7)
    assert out.valid.tolist() == [True, True, False, True, True, False]
    assert_close(out.losses, t(rrhf_direct(policy, scores, 0.7)), **TOL)


def test_rrhf_pair_without_sft_is_hinge():
    policy = random_stats(5, 2, seed=5)[0]
    scores = t([[4.0, 1.0], [0.0, 2.0], [3.0, 3.0], [9.0, 8.0], [1.0, 5.0]])
    out = rrhf_loss(policy, None, scores, lam=0.0)
    expected = []
    for (a0, a1), (r0, r1) in zip(policy.avg_logps.tolist(), scores.tolist(), strict=True):
        (pw, pl) = (a0, a1) if r0 > r1 else (a1, a0)
        expected.append(0.0 if r0 == r1 else max(0.0, pl - pw))
    assert_close(out.losses, t(expected), **TOL)


# ----------------------------------------------------------------------------------------------
# InfoNCA
# ----------------------------------------------------------------------------------------------


def infonca_direct(policy, ref, scores, beta: float, alpha: float) -> list[float]:
    """Cross-entropy between softmax(r / alpha) and softmax(beta h), python loops."""
    pol, rf, mask = policy.logps.tolist(), ref.logps.tolist(), policy.mask.tolist()
    out = []
    for b, row in enumerate(scores.tolist()):
        real = [k for k in range(len(row)) if mask[b][k]]
        r = [row[k] for k in real]
        if len(real) < 2 or max(r) == min(r):
            out.append(0.0)
            continue
        w = [math.exp((x - max(r)) / alpha) for x in r]
        target = [x / sum(w) for x in w]
        z = [beta * (pol[b][k] - rf[b][k]) for k in real]
        e = [math.exp(x - max(z)) for x in z]
        out.append(-sum(q * math.log(x / sum(e)) for q, x in zip(target, e, strict=True)))
    return out


def infonca_batch(seed: int) -> tuple[GroupStats, GroupStats, torch.Tensor]:
    policy, ref = random_stats(5, 4, seed=seed)[0], random_stats(5, 4, seed=seed + 1)[0]
    scores = t(TIED_SCORES)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[3, 3] = False
    logps = torch.where(mask, policy.logps, torch.full_like(policy.logps, 40.0))
    return policy._replace(logps=logps, mask=mask), ref._replace(mask=mask), scores


@pytest.mark.parametrize(("beta", "alpha"), [(0.1, 2.0), (0.5, 0.7), (0.01, 1e-4)])
def test_infonca_matches_direct(beta, alpha):
    policy, ref, scores = infonca_batch(seed=6)
    out = infonca_loss(policy, ref, scores, beta=beta, alpha=alpha)
    assert out.valid.tolist() == [True, True, False, True, True]
    assert_close(out.losses, t(infonca_direct(policy, ref, scores, beta, alpha)), **TOL)


def test_infonca_hand_value():
    # h = (1, -1, 0), beta = 1, r / alpha = (0, 0, -inf-ish): target (1/2, 1/2, ~0).
    # loss = -(1/2) (1 - lse) - (1/2) (-1 - lse) = lse, lse = log(e + 1/e + 1).
    policy = stats([[1.0, -1.0, 0.0]])
    ref = stats([[0.0, 0.0, 0.0]])
    out = infonca_loss(policy, ref, t([[5.0, 5.0, 1.0]]), beta=1.0, alpha=1e-3)
    assert_close(out.losses.item(), math.log(math.e + 1 / math.e + 1.0), **TOL)


def test_infonca_pair_is_label_smoothed_dpo():
    policy, ref = random_stats(5, 2, seed=7)[0], random_stats(5, 2, seed=8)[0]
    scores = t([[4.0, 1.0], [0.0, 2.0], [9.0, 8.5], [1.0, 5.0], [2.5, 2.0]])
    beta, alpha = 0.2, 1.5
    out = infonca_loss(policy, ref, scores, beta=beta, alpha=alpha)
    expected = []
    h = (policy.logps - ref.logps).tolist()
    for (h0, h1), (r0, r1) in zip(h, scores.tolist(), strict=True):
        (hw, hl, rw, rl) = (h0, h1, r0, r1) if r0 > r1 else (h1, h0, r1, r0)
        eps = 1.0 / (1.0 + math.exp(-(rl - rw) / alpha))
        expected.append(
            (1 - eps) * neg_log_sigmoid(beta * (hw - hl)) + eps * neg_log_sigmoid(-beta * (hw - hl))
        )
    assert_close(out.losses, t(expected), **TOL)


def test_infonca_small_alpha_is_one_hot_cross_entropy():
    policy, ref, _ = infonca_batch(seed=9)
    scores = t([[9.0, 7.5, 7.0, 5.0]] * 5)
    beta = 0.3
    out = infonca_loss(policy, ref, scores, beta=beta, alpha=1e-3)
    expected = []
    for b, row in enumerate((beta * (policy.logps - ref.logps)).tolist()):
        real = [k for k in range(4) if policy.mask[b, k]]
        lse = math.log(sum(math.exp(row[k]) for k in real))
        expected.append(-(row[0] - lse))
    assert_close(out.losses, t(expected), **TOL)


# ----------------------------------------------------------------------------------------------
# Shared properties of the seven losses
# ----------------------------------------------------------------------------------------------

PAIRWISE = {
    "ipo": (ipo_loss, dict(tau=1e-3, average_log_prob=False)),  # target margin 500: below it
    "cpo": (cpo_loss, dict(beta=0.1, lam=1.0)),
    "orpo": (orpo_loss, dict(lam=0.1)),
    "rdpo": (rdpo_loss, dict(beta=0.1, alpha=0.05)),
    "slic_hf": (slic_hf_loss, dict(delta=100.0, lam=0.1)),  # hinge active everywhere
}
MULTI = {
    "rrhf": (rrhf_loss, dict(lam=1.0)),
    "infonca": (infonca_loss, dict(beta=0.01, alpha=1e-4)),
}
ALL = PAIRWISE | MULTI
REFERENCE_FREE = ["cpo", "orpo", "slic_hf", "rrhf"]


def test_registry_capabilities():
    for name in ALL:
        spec = LOSSES[name]
        assert spec.config_cls().name == name and spec.fn is ALL[name][0]
        assert spec.needs_reference == (name not in REFERENCE_FREE), name
        assert spec.k == (2 if name in PAIRWISE else None), name


@pytest.mark.parametrize("name", sorted(ALL))
def test_gradient_signs(name):
    fn, hp = ALL[name]
    policy = random_stats(6, 2, seed=10, grad=True)[0]
    if name == "rrhf":  # make the rejected response's average log-prob the larger one
        base = torch.stack([policy.avg_logps[:, 0] - 0.5, policy.avg_logps[:, 0]], -1).detach()
        policy = stats(base * policy.lengths, policy.lengths, grad=True)
    ref = random_stats(6, 2, seed=11)[0]
    out = fn(policy, ref, t([[3.0, 1.0]] * 6), **hp)
    assert out.valid.all()
    out.losses.sum().backward()
    assert (policy.logps.grad[:, 0] < 0).all() and (policy.logps.grad[:, 1] > 0).all()
    assert_detached_metrics(out, 6)


@pytest.mark.parametrize("name", sorted(ALL))
def test_invalid_groups_have_zero_loss_and_finite_gradients(name):
    fn, hp = ALL[name]
    K = 2 if name in PAIRWISE else 3
    policy = random_stats(4, K, seed=12, grad=True)[0]
    ref = random_stats(4, K, seed=13)[0]
    scores = torch.arange(K, 0, -1, dtype=F64).repeat(4, 1)
    scores[1] = 2.0  # all tied
    scores[2] = scores[2].flip(-1)  # reversed: invalid for pairwise, fine for K-way
    out = fn(policy, ref, scores, **hp)
    invalid = [1, 2] if name in PAIRWISE else [1]
    assert out.valid.tolist() == [i not in invalid for i in range(4)]
    assert (out.losses[invalid] == 0).all()
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(policy.logps.grad).all()
    assert (policy.logps.grad[invalid] == 0).all()


@pytest.mark.parametrize("name", REFERENCE_FREE)
def test_reference_free_losses_ignore_reference(name):
    fn, hp = ALL[name]
    K = 2 if name in PAIRWISE else 3
    policy, ref = random_stats(5, K, seed=14)[0], random_stats(5, K, seed=15)[0]
    scores = torch.randint(0, 4, (5, K), generator=torch.Generator().manual_seed(0)).to(F64)
    a, b = fn(policy, None, scores, **hp), fn(policy, ref, scores, **hp)
    assert_close(a.losses, b.losses, rtol=0, atol=0)
    assert torch.equal(a.valid, b.valid) and a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert_close(a.metrics[key], b.metrics[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MULTI))
def test_masked_slot_equals_smaller_k(name):
    fn, hp = MULTI[name]
    hp = hp | ({"alpha": 1.3} if name == "infonca" else {})  # a soft target uses every slot
    full = random_stats(1, 4, seed=16)[0]
    ref = random_stats(1, 4, seed=17)[0]
    logps = full.logps.detach().clone()
    logps[0, 3] = 40.0  # garbage the mask must hide
    lengths = full.lengths.clone()
    lengths[0, 3] = 1.0
    scores4 = t([[2.0, 7.0, 4.0, 50.0]])
    padded = stats(logps, lengths, mask=[[True, True, True, False]], grad=True)
    small = stats(logps[:, :3], lengths[:, :3], grad=True)
    out4 = fn(padded, ref._replace(mask=padded.mask), scores4, **hp)
    out3 = fn(small, stats(ref.logps[:, :3], ref.lengths[:, :3]), scores4[:, :3], **hp)
    assert_close(out4.losses, out3.losses, **TOL)
    out4.losses.sum().backward()
    out3.losses.sum().backward()
    assert_close(padded.logps.grad[:, :3], small.logps.grad, **TOL)
    assert padded.logps.grad[0, 3] == 0
