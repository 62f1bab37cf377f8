# Run: .venv/bin/pytest tests/test_losses_spo.py -q
"""Tests for prefopt.losses.spo: SPO's preference term (arXiv 2405.00747, Eqs. 9-17) and
``token_kl``.

Expected values are computed with
python floats from the literal equations (pi^alpha / sum pi^alpha, never softplus/logsumexp), and
the fixed-point tests train a tabular policy with plain gradient descent.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from loss_helpers import F64, TOL, sigmoid, stats, t
from omegaconf import OmegaConf
from torch.testing import assert_close

from prefopt.losses import LOSSES, build_loss, get_spec
from prefopt.losses.spo import SPOConfig, spo_loss
from prefopt.model.logprobs import token_kl
from prefopt.types import LossOutput

FORMS = ("pairwise", "best_of_n", "ranked")


def spo(
    policy, scores, form="pairwise", weighting="basic", alpha=0.5, gamma=0.5, eta=1.0, state=None
) -> LossOutput:
    return spo_loss(
        policy,
        None,
        scores,
        form=form,
        weighting=weighting,
        alpha=alpha,
        gamma=gamma,
        eta=eta,
        state=state,
    )


def literal_term(ell: list[float], i: int, members: list[int], alpha: float) -> float:
    """-(1/alpha) log(pi_i^alpha / sum_{j in T} pi_j^alpha) with pi = exp(l) (Eqs. 9, 16, 17)."""
    num = math.exp(ell[i]) ** alpha
    return -math.log(num / sum(math.exp(ell[j]) ** alpha for j in members)) / alpha


def literal_mu(ell: list[float], members: list[int], baseline: float, gamma: float) -> float:
    """Eq. 13 literally: 2 sigmoid((sum_T pi)^gamma - E_hat)."""
    return 2.0 * sigmoid(sum(math.exp(ell[j]) for j in members) ** gamma - baseline)


def literal_sets(ell, score, form, eta):
    """(weight, term members, winner) of every term of one group, as the docstring reads Eq. 11,
    16 and 17 on scored data: T(i) = {i} + strictly worse responses."""
    K = len(ell)
    if form == "pairwise":
        pairs = [(i, j) for i in range(K) for j in range(K) if score[i] > score[j]]
        return [(1.0 / len(pairs), [i, j], i) for i, j in pairs]
    worse = {i: [j for j in range(K) if score[j] < score[i]] for i in range(K)}
    if form == "best_of_n":
        tops = [i for i in range(K) if score[i] == max(score)]
        return [(1.0 / len(tops), [i, *worse[i]], i) for i in tops]
    better = {i: sum(s > score[i] for s in score) for i in range(K)}
    return [(eta ** better[i], [i, *worse[i]], i) for i in range(K) if worse[i]]


def literal_losses(logps, scores, form, weighting, alpha, gamma, eta=1.0) -> list[float]:
    sets = [literal_sets(e, s, form, eta) for e, s in zip(logps, scores, strict=True)]
    powers = [
        sum(math.exp(e[j]) for j in m) ** gamma
        for e, g in zip(logps, sets, strict=True)
        for _, m, _ in g
    ]
    baseline = sum(powers) / len(powers)
    out = []
    for e, g in zip(logps, sets, strict=True):
        total = 0.0
        for w, m, i in g:
            mu = literal_mu(e, m, baseline, gamma) if weighting == "weighted" else 1.0
            total += w * mu * literal_term(e, i, m, alpha)
        out.append(total)
    return out


# Group 0: K = 3 with ranking 0 > 2 > 1; group 1: ties 2 = 2 > 1 (two best); group 2: strict.
LOGPS = [[-1.0, -2.5, -0.7], [-0.4, -1.1, -2.0], [-3.0, -0.2, -1.5]]
SCORES = [[3.0, 1.0, 2.0], [2.0, 2.0, 1.0], [0.5, 0.9, 0.1]]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("weighting", ["basic", "weighted"])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5])
def test_hand_values_every_form_and_weighting(form, weighting, alpha):
    eta = 0.5 if form == "ranked" else 1.0
    expected = literal_losses(LOGPS, SCORES, form, weighting, alpha, 0.5, eta)
    out = spo(stats(LOGPS), t(SCORES), form, weighting, alpha, gamma=0.5, eta=eta)
    assert out.valid.tolist() == [True, True, True]
    assert_close(out.losses, t(expected), **TOL)


def test_hand_value_by_hand():
    # One pair, l_w = -1, l_l = -2, alpha = 1: -log(e^-1 / (e^-1 + e^-2)) = log(1 + e^-1).
    out = spo(stats([[-1.0, -2.0]]), t([[1.0, 0.0]]), alpha=1.0)
    assert math.isclose(out.losses.item(), math.log(1 + math.exp(-1)), rel_tol=1e-12)
    # Weighted, one pair in the batch: (pi_w + pi_l)^gamma equals its own mean, so mu = 1.
    out = spo(stats([[-1.0, -2.0]]), t([[1.0, 0.0]]), weighting="weighted", alpha=1.0)
    assert math.isclose(out.losses.item(), math.log(1 + math.exp(-1)), rel_tol=1e-12)
    # Ranked, K = 3, strict ranking 0 > 1 > 2, l = (0, -1, -2), alpha = 1, eta = 0.5:
    # -log(1 / (1 + e^-1 + e^-2)) - 0.5 log(e^-1 / (e^-1 + e^-2)).
    hand = math.log(1 + math.exp(-1) + math.exp(-2)) + 0.5 * math.log(1 + math.exp(-1))
    out = spo(stats([[0.0, -1.0, -2.0]]), t([[3.0, 2.0, 1.0]]), "ranked", alpha=1.0, eta=0.5)
    assert math.isclose(out.losses.item(), hand, rel_tol=1e-12)


def test_alpha_one_is_cross_entropy_and_alpha_zero_is_eq_10():
    logps = [[-3.0, -1.0], [-0.5, -4.0]]
    out = spo(stats(logps), t([[1.0, 0.0]] * 2), alpha=1.0)  # Eq. 8
    ce = [-math.log(math.exp(w) / (math.exp(w) + math.exp(lo))) for w, lo in logps]
    assert_close(out.losses, t(ce), **TOL)
    out = spo(stats(logps), t([[1.0, 0.0]] * 2), alpha=0.0)  # Eq. 10: -(1/2) (l_w - l_l)
    assert_close(out.losses, t([-0.5 * (w - lo) for w, lo in logps]), **TOL)


@pytest.mark.parametrize("form", FORMS)
def test_alpha_to_zero_gradient_limit(form):
    """Digest 6: the gradient of Eq. 9 tends to that of Eq. 10 (and its set analogue)."""
    grads = {}
    for alpha in (0.0, 1e-7):
        policy = stats(LOGPS, grad=True)
        spo(policy, t(SCORES), form, alpha=alpha).losses.sum().backward()
        grads[alpha] = policy.logps.grad
    assert_close(grads[1e-7], grads[0.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("weighting", ["basic", "weighted"])
def test_forms_coincide_on_pairs(weighting):
    """Digest 10-11: with n = 2, Eq. 16 and Eq. 17 (mu_1) equal Eq. 11."""
    g = torch.Generator().manual_seed(0)
    logps = -30 * torch.rand(8, 2, generator=g, dtype=F64)
    scores = torch.randint(0, 3, (8, 2), generator=g).to(F64)
    outs = [spo(stats(logps), scores, form, weighting, alpha=0.7, eta=0.5) for form in FORMS]
    assert outs[0].valid.sum() >= 3 and (~outs[0].valid).any()
    for out in outs[1:]:
        assert_close(out.losses, outs[0].losses, **TOL)
        assert (out.valid == outs[0].valid).all()
        assert_close(out.metrics["spo/mu"], outs[0].metrics["spo/mu"], **TOL)


def test_pairwise_on_k3_averages_the_score_ordered_pairs():
    k3 = spo(stats(LOGPS[:1]), t(SCORES[:1]), weighting="basic")
    pairs = [[-1.0, -2.5], [-1.0, -0.7], [-0.7, -2.5]]  # 0 > 1, 0 > 2, 2 > 1
    k2 = spo(stats(pairs), t([[1.0, 0.0]] * 3), weighting="basic")
    assert_close(k3.losses, k2.losses.mean()[None], **TOL)
    assert k3.metrics["spo/sets"].item() == 3


def test_gradient_closed_forms_and_detached_mu():
    """Digest 4, 5, 10: dL/dl_w = -mu sigmoid(-alpha Delta); best-of-n: -mu (1{i*} - softmax)."""
    alpha = 0.8
    policy = stats([[-2.0, -1.0], [-1.0, -1.0]], grad=True)
    out = spo(policy, t([[1.0, 0.0], [1.0, 0.0]]), weighting="weighted", alpha=alpha)
    out.losses.sum().backward()
    mu = out.metrics["spo/mu"]
    d = t([-1.0, 0.0])
    expected = (mu * torch.sigmoid(-alpha * d))[:, None] * t([-1.0, 1.0])
    assert_close(policy.logps.grad, expected, **TOL)
    assert policy.logps.grad[1, 0].item() == pytest.approx(-mu[1].item() / 2)  # Delta = 0

    policy = stats(LOGPS[2:], grad=True)
    out = spo(policy, t(SCORES[2:]), "best_of_n", "weighted", alpha=alpha)
    out.losses.sum().backward()
    grad = policy.logps.grad[0]
    onehot = t([0.0, 1.0, 0.0])
    softmax = torch.softmax(alpha * t(LOGPS[2]), 0)
    assert_close(grad, -out.metrics["spo/mu"][0] * (onehot - softmax), **TOL)
    assert abs(grad.sum().item()) < 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_mu_is_detached(form):
    """Eq. 14: the gradient is that of sum mu * term with mu (and its batch mean) held constant."""
    alpha, gamma, eta = 0.5, 0.5, 0.5
    policy = stats(LOGPS, grad=True)
    spo(policy, t(SCORES), form, "weighted", alpha, gamma, eta).losses.sum().backward()
    ell = t(LOGPS).requires_grad_(True)
    sets = [literal_sets(e, s, form, eta) for e, s in zip(LOGPS, SCORES, strict=True)]
    powers = [
        sum(math.exp(e[j]) for j in m) ** gamma
        for e, g in zip(LOGPS, sets, strict=True)
        for _, m, _ in g
    ]
    baseline = sum(powers) / len(powers)
    total = ell.new_zeros(())
    for b, g in enumerate(sets):
        for w, m, i in g:
            mu = literal_mu(LOGPS[b], m, baseline, gamma)  # a python float: a constant
            total = total + w * mu * (ell[b, m] * alpha).logsumexp(0) / alpha - w * mu * ell[b, i]
    (expected,) = torch.autograd.grad(total, ell)
    assert_close(policy.logps.grad, expected, **TOL)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("weighting", ["basic", "weighted"])
def test_gradient_directions(form, weighting):
    policy = stats(LOGPS, grad=True)
    spo(policy, t(SCORES), form, weighting, alpha=0.5).losses.sum().backward()
    grad = policy.logps.grad
    for b, row in enumerate(SCORES):
        best = [k for k in range(3) if row[k] == max(row)]
        worst = [k for k in range(3) if row[k] == min(row)]
        assert (grad[b, best] < 0).all(), (b, grad[b])  # descent raises the best responses
        assert (grad[b, worst] > 0).all(), (b, grad[b])  # and lowers the worst ones
        assert abs(grad[b].sum().item()) < 1e-12  # shift invariance: only differences of l matter


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("weighting", ["basic", "weighted"])
def test_invalid_groups_and_masks(form, weighting):
    # Group 0: all tied. Group 1: one real response. Group 2: K = 2 in a K = 3 batch, with a
    # huge filler in the empty slot. Group 3: a normal group.
    logps = [[-1.0, -2.0, -3.0], [-1.0, 1e6, -1e6], [-1.0, -2.0, 1e6], [-1.0, -2.0, -3.0]]
    mask = [[True] * 3, [True, False, False], [True, True, False], [True] * 3]
    scores = [[2.0, 2.0, 2.0], [1.0, 5.0, 0.0], [1.0, 0.0, 9.0], [3.0, 2.0, 1.0]]
    policy = stats(logps, mask=mask, grad=True)
    out = spo(policy, t(scores), form, weighting, alpha=0.5)
    assert out.valid.tolist() == [False, False, True, True]
    assert out.losses[:2].tolist() == [0.0, 0.0]
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    grad = policy.logps.grad
    assert torch.isfinite(grad).all()
    assert (grad[:2] == 0).all() and grad[2, 2] == 0
    for value in out.metrics.values():
        assert not value.requires_grad and value.shape == (4,) and torch.isfinite(value).all()
    # The masked K = 3 group equals the same pair at K = 2 (basic: mu is per batch otherwise).
    if weighting == "basic":
        pair = spo(stats([[-1.0, -2.0]]), t([[1.0, 0.0]]), form, weighting, alpha=0.5)
        assert_close(out.losses[2], pair.losses[0], **TOL)


def test_all_invalid_batch_and_shift_invariance():
    out = spo(stats([[-1.0, -2.0]], grad=True), t([[1.0, 1.0]]), "ranked", "weighted")
    assert not out.valid.any() and out.losses.item() == 0.0
    assert out.stat_updates["spo/mu_power_count"].item() == 0
    shifted = [[x - 7.0 for x in row] for row in LOGPS]
    for form in FORMS:
        a = spo(stats(LOGPS), t(SCORES), form, alpha=0.4)
        b = spo(stats(shifted), t(SCORES), form, alpha=0.4)
        assert_close(a.losses, b.losses, **TOL)


@pytest.mark.parametrize("form", FORMS)
def test_long_sequences_do_not_underflow(form):
    """Underflow: l ~ -1000 nats, alpha = 1e-3; pi^alpha is never formed."""
    logps = [[-1000.0, -1010.0, -1200.0], [-800.0, -790.0, -805.0]]
    policy = stats(logps, grad=True)
    out = spo(policy, t([[3.0, 2.0, 1.0]] * 2), form, "weighted", alpha=1e-3, gamma=0.01)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.logps.grad).all()
    mu = out.metrics["spo/mu"]
    assert ((mu > 2 * sigmoid(-1)) & (mu < 2 * sigmoid(1))).all()
    assert (out.metrics["spo/mu"] != 1).any()  # exp(0.01 * -1000) differs from exp(0.01 * -800)


def test_mu_properties_and_running_baseline():
    """Eq. 13: symmetric, gamma = 0 gives 1, mu = 1 at the baseline; E_hat from the state."""
    logps = [[-1.0, -2.0], [-2.0, -1.0], [-0.1, -5.0]]
    ordered, flipped = t([[1.0, 0.0]] * 3), t([[0.0, 1.0]] * 3)
    a = spo(stats(logps), ordered, weighting="weighted")
    b = spo(stats(logps), flipped, weighting="weighted")
    assert_close(a.metrics["spo/mu"], b.metrics["spo/mu"], **TOL)  # symmetric in (y1, y2)
    assert_close(a.metrics["spo/mu"][0], a.metrics["spo/mu"][1], **TOL)
    g0 = spo(stats(logps), ordered, weighting="weighted", gamma=0.0)
    assert (g0.metrics["spo/mu"] == 1).all()

    spec = get_spec("spo")
    hp = spec.hparams(OmegaConf.structured(SPOConfig(gamma=0.5)))
    state = spec.state.init(**hp)
    assert_close(spo(stats(logps), ordered, weighting="weighted", state=state).losses, a.losses)
    # Two micro-batches: the folded state is the mean over all three pairs, and with it mu no
    # longer depends on how the batch was split.
    parts = [
        spo(stats(logps[:1]), ordered[:1], weighting="weighted"),
        spo(stats(logps[1:]), ordered[1:], weighting="weighted"),
    ]
    sums = {k: sum(p.stat_updates[k] for p in parts) for k in parts[0].stat_updates}
    state = spec.state.update(state, sums, **hp)
    power = [(math.exp(w) + math.exp(lo)) ** 0.5 for w, lo in logps]
    assert state["mu_baseline"].item() == pytest.approx(sum(power) / 3, rel=1e-12)
    whole = spo(stats(logps), ordered, weighting="weighted", state=state)
    kw = dict(weighting="weighted", state=state)
    split = torch.cat(
        [
            spo(stats(logps[:1]), ordered[:1], **kw).losses,
            spo(stats(logps[1:]), ordered[1:], **kw).losses,
        ]
    )
    assert_close(whole.losses, split, **TOL)
    assert_close(whole.losses, a.losses, **TOL)  # same mean as the one-batch micro mean here
    assert spec.state.update(state, {}, **hp) is state  # basic weighting reports nothing


# ----------------------------------------------------------------------------------------------
# Fixed point Softmax(r / alpha) on a tabular policy (Theorems 1-4)
# ----------------------------------------------------------------------------------------------

R = [1.0, 0.3, -0.5, 0.8, -1.2]


def tabular_data(form: str):
    """Groups (response indices, scores) and their probabilities D under BT / PL models.

    pairwise: BT-consistent D(y1, y2) = b({y1, y2}) sigmoid(r1 - r2), b symmetric, non-uniform;
    best_of_n: n-ary BT D(S, i) = softmax(r_S)_i over 3-subsets S; ranked: PL-consistent
    D(tau) = p_PL(tau) over the orderings of every 3-subset.
    """
    n, idx, sc, d = len(R), [], [], []
    if form == "pairwise":
        for i, j in itertools.combinations(range(n), 2):
            b = 1.0 + 0.5 * ((i + 2 * j) % 3)
            for w, lo in ((i, j), (j, i)):
                idx.append([w, lo])
                sc.append([1.0, 0.0])
                d.append(b * sigmoid(R[w] - R[lo]))
    elif form == "best_of_n":
        for s in itertools.combinations(range(n), 3):
            z = sum(math.exp(R[j]) for j in s)
            for k, i in enumerate(s):
                idx.append(list(s))
                sc.append([float(m == k) for m in range(3)])
                d.append(math.exp(R[i]) / z)
    else:
        for s in itertools.combinations(range(n), 3):
            for tau in itertools.permutations(s):
                p = 1.0
                for k in range(2):
                    p *= math.exp(R[tau[k]]) / sum(math.exp(R[j]) for j in tau[k:])
                idx.append(list(tau))
                sc.append([3.0, 2.0, 1.0])
                d.append(p)
    d = t(d)
    return torch.tensor(idx), t(sc), d / d.sum()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("weighting", "alpha"), [("basic", 0.5), ("weighted", 2.0)])
def test_tabular_fixed_point_is_softmax_r_over_alpha(form, weighting, alpha):
    """Theorems 1-4: (semi-)gradient descent on the expected loss reaches Softmax(r/alpha).

    Weighted: mu (gamma = 0.5, far from 1) is recomputed and detached at every step; any
    symmetric positive mu keeps the fixed point (Theorem 2a). Ranked uses eta = 0.5.
    """
    idx, scores, d = tabular_data(form)
    z = torch.zeros(len(R), dtype=F64, requires_grad=True)
    lr = 2.5 / alpha  # the loss's curvature in z scales with alpha
    for _ in range(2000):
        logps = torch.log_softmax(z, 0)[idx]  # (B, K) log pi of each group's responses
        out = spo(stats(logps), scores, form, weighting, alpha, gamma=0.5, eta=0.5)
        (grad,) = torch.autograd.grad((d * out.losses).sum(), z)
        with torch.no_grad():
            z -= lr * grad
        if grad.abs().max() < 1e-12:
            break
    assert grad.abs().max() < 1e-12
    target = torch.softmax(t(R) / alpha, 0)
    assert_close(torch.softmax(z.detach(), 0), target, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# token_kl (Eq. 15) and the regularizer's chain rule
# ----------------------------------------------------------------------------------------------


def test_token_kl_matches_direct_formula_and_is_nonnegative():
    g = torch.Generator().manual_seed(3)
    pol = torch.log_softmax(3 * torch.randn(6, 11, generator=g, dtype=F64), -1)
    ref = torch.log_softmax(3 * torch.randn(6, 11, generator=g, dtype=F64), -1)
    direct = [
        sum(math.exp(p) * (p - q) for p, q in zip(pr, qr, strict=True))
        for pr, qr in zip(pol.tolist(), ref.tolist(), strict=True)
    ]
    kl = token_kl(pol, ref)
    assert kl.shape == (6,)
    assert_close(kl, t(direct), **TOL)
    assert (kl > 0).all()
    assert_close(
        kl, torch.nn.functional.kl_div(ref, pol, log_target=True, reduction="none").sum(-1)
    )


def test_token_kl_zero_for_identical_and_handles_zero_probabilities():
    logits = torch.randn(4, 7, dtype=F64, generator=torch.Generator().manual_seed(4))
    pol_logits = logits.clone().requires_grad_(True)
    kl = token_kl(torch.log_softmax(pol_logits, -1), torch.log_softmax(logits, -1))
    assert_close(kl, torch.zeros(4, dtype=F64), rtol=0, atol=1e-14)
    kl.sum().backward()  # zero value and zero gradient at pi = pi_ref
    assert_close(pol_logits.grad, torch.zeros_like(logits), rtol=0, atol=1e-14)
    # A token the policy can never emit (-inf logit) contributes 0, with finite gradients.
    pol_logits = logits.clone()
    pol_logits[:, 0] = float("-inf")
    pol_logits.requires_grad_(True)
    kl = token_kl(torch.log_softmax(pol_logits, -1), torch.log_softmax(logits, -1))
    kl.sum().backward()
    assert torch.isfinite(kl).all() and (kl > 0).all()
    assert torch.isfinite(pol_logits.grad).all()


def test_token_kl_summed_over_positions_is_the_sequence_kl():
    """Digest 22: E_{y~pi}[sum_tau KL_tau] = KL_seq on a toy AR model (vocab {a, b, EOS}, forced
    EOS after 3 tokens), with the EOS-emitting position included; the stop-grad estimator's
    gradient differs from the sequence KL's (expected: samples are constants)."""
    eos, max_len = 2, 3
    prefixes = [()] + [p for n in (1, 2) for p in itertools.product((0, 1), repeat=n)]
    g = torch.Generator().manual_seed(5)
    pol_logits = torch.randn(len(prefixes), 3, generator=g, dtype=F64).requires_grad_(True)
    ref_logits = torch.randn(len(prefixes), 3, generator=g, dtype=F64)
    row = {p: i for i, p in enumerate(prefixes)}

    def dist(logits, prefix):
        if len(prefix) == max_len - 1:  # forced EOS: both models agree, KL 0 at this position
            return torch.log(t([0.0, 0.0, 1.0]))
        return torch.log_softmax(logits[row[prefix]], -1)

    sequences = [p + (eos,) for p in prefixes]  # every sequence ends with its EOS
    seq_kl = estimate = estimate_frozen = 0.0
    for y in sequences:
        lp_pol = [dist(pol_logits, y[:k]) for k in range(len(y))]
        lp_ref = [dist(ref_logits, y[:k]) for k in range(len(y))]
        log_p = sum(lp[s] for lp, s in zip(lp_pol, y, strict=True))
        log_q = sum(lq[s] for lq, s in zip(lp_ref, y, strict=True))
        per_seq = token_kl(torch.stack(lp_pol), torch.stack(lp_ref)).sum()  # positions summed
        seq_kl = seq_kl + log_p.exp() * (log_p - log_q)
        estimate = estimate + log_p.exp() * per_seq  # expectation over exact samples
        estimate_frozen = estimate_frozen + log_p.exp().detach() * per_seq  # samples as data
    assert_close(estimate, seq_kl, **TOL)
    (g_seq,) = torch.autograd.grad(seq_kl, pol_logits, retain_graph=True)
    (g_frozen,) = torch.autograd.grad(estimate_frozen, pol_logits)
    assert (g_seq - g_frozen).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Registry and config
# ----------------------------------------------------------------------------------------------


def test_registration_and_kl_fields_stay_out_of_the_function():
    spec = LOSSES["spo"]
    assert not spec.needs_reference and spec.k is None and spec.state is not None
    assert spec.extras == ("on_policy_kl",)  # the loop adds kl_weight * KL on samples
    cfg = OmegaConf.structured(SPOConfig())
    hp = spec.hparams(cfg)
    assert set(hp) == {"form", "weighting", "alpha", "gamma", "eta"}
    assert (cfg.kl_weight, cfg.kl_every, cfg.kl_num_samples) == (0.1, 8, 32)
    _, fn = build_loss(cfg)
    out = fn(stats(LOGPS), None, t(SCORES))
    assert torch.isfinite(out.losses).all() and out.valid.all()
    with pytest.raises(ValueError, match="form"):
        spo(stats(LOGPS), t(SCORES), form="abs")
