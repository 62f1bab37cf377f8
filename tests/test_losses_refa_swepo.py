# Run: .venv/bin/pytest tests/test_losses_refa_swepo.py -q
"""REFA-1-vs-all, the three REFA-InfoNCA variants (their K = 2 forms, shift invariance, target
limits) and SWEPO (identities of its reconstructed loss; see docs/losses.md).

Expected values come from python-float loops over responses written from the papers' ratio
forms (-log(A / (A + gamma B)), -sum p_target log p_model, -log(sum_{Y+} w e^s / sum w e^s)),
never from the softplus / logsumexp code of the losses. Everything is float64 on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_helpers import F64, TOL, assert_detached_metrics, neg_log_sigmoid, random_stats, stats, t
from torch.testing import assert_close

from prefopt.losses import LOSSES
from prefopt.losses.pairwise import dpo_loss
from prefopt.losses.refa import (
    refa_1vsall_loss,
    refa_dynamic_loss,
    refa_infonca_1vsall_loss,
    refa_infonca_dynamic_loss,
    refa_infonca_loss,
)
from prefopt.losses.swepo import swepo_loss
from prefopt.types import GroupStats, LossOutput


def edge_batch(seed: int, *, grad: bool = False) -> tuple[GroupStats, torch.Tensor]:
    """K = 4 batch: random groups plus masked slots holding garbage, ties with the mean, a tied
    top, all-equal scores, a single real response, a K = 2 group, truncated responses."""
    policy, scores = random_stats(9, 4, seed=seed)
    logps, lengths, eos, has_eos, mask = (x.clone() for x in policy)
    scores[0] = t([9.0, 8.0, 4.0, 1.0])  # mean 5.5: the 8 is an above-mean runner-up
    scores[1] = t([1.0, 2.0, 3.0, 0.0])  # mean 2 over the 3 real slots: the 2 ties the mean
    mask[1, 3] = False
    scores[2] = t([1.0, 2.0, 3.0, 2.0])  # mean 2: the two 2s tie with the mean
    scores[3] = t([6.0, 6.0, 6.0, 6.0])  # all equal: invalid
    mask[4, 1:] = False  # one real response: invalid
    mask[5, 2:] = False  # K = 2 group
    scores[5, :2] = t([3.0, 7.0])
    has_eos[6] = t([False, True, False, True]).bool()
    scores[7] = t([8.0, 8.0, 1.0, 1.0])  # tied top (App. C.3): first index wins in 1-vs-all
    scores[8] = t([2.0, 9.0, 5.0, 7.0])
    logps = torch.where(mask, logps, torch.full_like(logps, 50.0))
    scores = torch.where(mask, scores, torch.full_like(scores, 100.0))
    eos = torch.where(mask, eos, torch.zeros_like(eos))
    has_eos = has_eos | ~mask
    lengths = torch.where(mask, lengths, torch.ones_like(lengths))
    return stats(logps, lengths, eos, has_eos, mask, grad=grad), scores


VALID_MEAN = [True, True, True, False, False, True, True, True, True]  # also for 1-vs-all


def groups(policy: GroupStats, scores: torch.Tensor, values: torch.Tensor | None = None):
    """Per group: (real slot indices, {slot: score}, {slot: value}, {slot: eos term})."""
    values = policy.avg_logps if values is None else values
    vals, mask = values.tolist(), policy.mask.tolist()
    eos, has_eos = policy.eos_logps.tolist(), policy.has_eos.tolist()
    for b, row in enumerate(scores.tolist()):
        real = [k for k in range(len(row)) if mask[b][k]]
        eos_terms = [math.exp(eos[b][k]) for k in real if has_eos[b][k]]
        yield real, {k: row[k] for k in real}, {k: vals[b][k] for k in real}, eos_terms


def first_top(real: list[int], r: dict[int, float]) -> int:
    top = real[0]
    for k in real:
        if r[k] > r[top]:
            top = k
    return top


# ----------------------------------------------------------------------------------------------
# REFA-1-vs-all
# ----------------------------------------------------------------------------------------------

R1_DEFAULTS = dict(
    beta=3.0, gamma=1.05, alpha=0.5, p=2.0, deviation="signed", lam=0.0, length_normalize=True
)


def r1(policy, scores, **overrides) -> LossOutput:
    return refa_1vsall_loss(policy, None, scores, **(R1_DEFAULTS | overrides))


def r1_direct(policy, scores, **overrides) -> list[float]:
    """Eq. 20 with l_bar, plus lam * sum P(EOS): -log(e^z* / (e^z* + gamma sum_{j != *} e^z_j))."""
    hp = R1_DEFAULTS | overrides
    vals = policy.avg_logps if hp["length_normalize"] else policy.logps
    out = []
    for real, r, ell, eos_terms in groups(policy, scores, vals):
        if len(real) < 2 or max(r.values()) == min(r.values()):
            out.append(0.0)
            continue
        r_bar = sum(r.values()) / len(real)
        top = first_top(real, r)
        ez = {}
        for k in real:
            dev = r[k] - r_bar
            ds = dev ** hp["p"] if hp["deviation"] == "signed" else abs(dev) ** hp["p"]
            ez[k] = math.exp(hp["beta"] * (ell[k] + hp["alpha"] * ds))
        b_sum = sum(ez[k] for k in real if k != top)
        loss = -math.log(ez[top] / (ez[top] + hp["gamma"] * b_sum))
        out.append(loss + hp["lam"] * sum(eos_terms))
    return out


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize(("p", "deviation"), [(1.0, "signed"), (1.0, "abs"), (2.0, "signed")])
def test_refa_1vsall_matches_direct(p, deviation, length_normalize):
    policy, scores = edge_batch(seed=100, grad=True)
    hp = dict(
        beta=3.0 if length_normalize else 0.2,
        gamma=0.8,
        alpha=0.3,
        p=p,
        deviation=deviation,
        lam=0.1,
        length_normalize=length_normalize,
    )
    out = r1(policy, scores, **hp)
    assert out.valid.tolist() == VALID_MEAN
    assert_close(out.losses, t(r1_direct(policy, scores, **hp)), **TOL)
    assert out.metrics["refa/above_mean_negatives"][[0, 7]].tolist() == [1.0, 1.0]
    assert_detached_metrics(out, 9)


def test_refa_1vsall_gradient_signs_and_tie_break():
    policy, scores = edge_batch(seed=101, grad=True)
    out = r1(policy, scores, p=1.0, lam=0.0)
    out.losses.sum().backward()
    grad = policy.logps.grad
    for b, (real, r, _, _) in enumerate(groups(policy, scores)):
        if not out.valid[b]:
            assert (grad[b] == 0).all()
            continue
        top = first_top(real, r)
        assert grad[b, top] < 0
        assert all(grad[b, k] > 0 for k in real if k != top)
    # Group 7 = (8, 8, 1, 1): the first 8 is Y+, the second a negative.
    assert grad[7, 0] < 0 < grad[7, 1]
    assert (grad[~policy.mask] == 0).all()


def test_refa_1vsall_negatives_include_above_mean_runner_up():
    """Digest 3.2: dS uses the mean of all K, so under p = 1 the runner-up 8 of (9, 8, 4, 1)
    is a negative with the largest weight e^{alpha beta dS} of the negative sum."""
    beta, alpha, gamma = 2.0, 0.5, 1.0
    group = stats([[-1.0, -1.0, -1.0, -1.0]], grad=True)  # equal l_bar: gradients show weights
    out = r1(group, t([[9.0, 8.0, 4.0, 1.0]]), beta=beta, alpha=alpha, gamma=gamma, p=1.0)
    out.losses.sum().backward()
    grad = group.logps.grad[0].tolist()
    # dL/dl_bar_j = beta * gamma * w_j / (w_top + gamma * sum_neg w) on Y-, w = e^{alpha beta dS}.
    w = [math.exp(alpha * beta * d) for d in (3.5, 2.5, -1.5, -4.5)]
    total = w[0] + gamma * sum(w[1:])
    expected = [beta * (w[0] / total - 1.0)] + [beta * gamma * x / total for x in w[1:]]
    assert_close(t(grad), t(expected), **TOL)
    assert grad[1] > grad[2] > grad[3] > 0
    assert out.metrics["refa/above_mean_negatives"].item() == 1.0
    # REFA-dynamic puts the 8 in Y+ instead.
    dyn = refa_dynamic_loss(
        group,
        None,
        t([[9.0, 8.0, 4.0, 1.0]]),
        beta=beta,
        gamma=gamma,
        alpha=alpha,
        p=1.0,
        deviation="signed",
        lam=0.0,
        length_normalize=True,
    )
    assert dyn.metrics["refa/positives"].item() == 2.0


@pytest.mark.parametrize(("p", "deviation"), [(1.0, "signed"), (1.0, "abs"), (2.0, "signed")])
@pytest.mark.parametrize("gamma", [0.7, 1.0, 1.4])
def test_pairs_refa_1vsall_equals_dynamic(p, deviation, gamma):
    policy, _ = random_stats(6, 2, seed=102)
    scores = t([[7.0, 2.0], [5.0, 4.0], [0.0, 9.0], [10.0, 3.0], [6.0, 5.5], [4.0, 4.0]])
    policy = stats(*policy, grad=True)
    hp = dict(beta=2.5, gamma=gamma, alpha=0.7, p=p, deviation=deviation, lam=0.2)
    one = r1(policy, scores, **hp)
    dyn = refa_dynamic_loss(policy, None, scores, length_normalize=True, **hp)
    assert one.valid.tolist() == dyn.valid.tolist() == [True] * 5 + [False]
    assert_close(one.losses, dyn.losses, **TOL)
    (g_one,) = torch.autograd.grad(one.losses.sum(), policy.logps)
    (g_dyn,) = torch.autograd.grad(dyn.losses.sum(), policy.logps)
    assert_close(g_one, g_dyn, **TOL)


# ----------------------------------------------------------------------------------------------
# REFA-InfoNCA variants
# ----------------------------------------------------------------------------------------------

NCA_DEFAULTS = dict(beta=2.25, target_alpha=0.7, lam=0.0, length_normalize=True)
NCA_VARIANTS = {
    "plain": (refa_infonca_loss, {}),
    "dynamic": (refa_infonca_dynamic_loss, {"renormalize_target": False}),
    "dynamic_renorm": (refa_infonca_dynamic_loss, {"renormalize_target": True}),
    "1vsall": (refa_infonca_1vsall_loss, {"target_weight": False}),
    "1vsall_weighted": (refa_infonca_1vsall_loss, {"target_weight": True}),
}


def nca(variant: str, policy, scores, **overrides) -> LossOutput:
    fn, options = NCA_VARIANTS[variant]
    return fn(policy, None, scores, **(NCA_DEFAULTS | options | overrides))


def nca_direct(variant: str, policy, scores, **overrides) -> list[float]:
    """-sum_i c_i log p_i^model with p^model = softmax(beta l_bar), c from p^target (Eq. 14)."""
    hp = NCA_DEFAULTS | overrides
    vals = policy.avg_logps if hp["length_normalize"] else policy.logps
    out = []
    for real, r, ell, eos_terms in groups(policy, scores, vals):
        r_bar = sum(r.values()) / max(len(real), 1)
        pos = [k for k in real if r[k] > r_bar]
        if len(real) < 2 or not pos:
            out.append(0.0)
            continue
        z_model = sum(math.exp(hp["beta"] * ell[k]) for k in real)
        p_model = {k: math.exp(hp["beta"] * ell[k]) / z_model for k in real}
        support = pos if variant == "dynamic_renorm" else real
        z_target = sum(math.exp(hp["target_alpha"] * r[k]) for k in support)
        p_target = {k: math.exp(hp["target_alpha"] * r[k]) / z_target for k in support}
        if variant == "plain":
            loss = -sum(p_target[k] * math.log(p_model[k]) for k in real)
        elif variant.startswith("dynamic"):
            loss = -sum(p_target[k] * math.log(p_model[k]) for k in pos)
        else:
            top = first_top(real, r)
            c = p_target[top] if variant == "1vsall_weighted" else 1.0
            loss = -c * math.log(p_model[top])
        out.append(loss + hp["lam"] * sum(eos_terms))
    return out


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("variant", sorted(NCA_VARIANTS))
def test_refa_infonca_matches_direct(variant, length_normalize):
    policy, scores = edge_batch(seed=110, grad=True)
    hp = dict(
        beta=2.0 if length_normalize else 0.15,
        target_alpha=0.6,
        lam=0.1,
        length_normalize=length_normalize,
    )
    out = nca(variant, policy, scores, **hp)
    assert out.valid.tolist() == VALID_MEAN
    assert_close(out.losses, t(nca_direct(variant, policy, scores, **hp)), **TOL)
    assert_detached_metrics(out, 9)


@pytest.mark.parametrize("variant", sorted(NCA_VARIANTS))
def test_refa_infonca_gradients(variant):
    """dL/d(beta l_bar_i) = C p_i^model - c_i with C = sum_j c_j (App. A Eq. 16 generalised)."""
    policy, scores = edge_batch(seed=111)
    beta = 2.0
    unit = stats(policy.avg_logps, None, policy.eos_logps, policy.has_eos, policy.mask, grad=True)
    out = nca(variant, unit, scores, beta=beta, target_alpha=0.5)
    out.losses.sum().backward()
    grad = unit.logps.grad
    for b, (real, r, ell, _) in enumerate(groups(unit, scores)):
        if not out.valid[b]:
            assert (grad[b] == 0).all()
            continue
        # c_i from the direct loss's derivative structure, recomputed by hand.
        r_bar = sum(r.values()) / len(real)
        pos = [k for k in real if r[k] > r_bar]
        support = pos if variant == "dynamic_renorm" else real
        z_t = sum(math.exp(0.5 * r[k]) for k in support)
        p_t = {k: math.exp(0.5 * r[k]) / z_t for k in support}
        top = first_top(real, r)
        c = {k: 0.0 for k in real}
        if variant == "plain":
            c.update(p_t)
        elif variant.startswith("dynamic"):
            c.update({k: p_t[k] for k in pos})
        else:
            c[top] = p_t[top] if variant == "1vsall_weighted" else 1.0
        z_m = sum(math.exp(beta * ell[k]) for k in real)
        total = sum(c.values())
        for k in real:
            expected = beta * (total * math.exp(beta * ell[k]) / z_m - c[k])
            assert math.isclose(grad[b, k].item(), expected, rel_tol=1e-9, abs_tol=1e-12)
        # Responses outside the target sum are only pushed down (Fix 1 / Fix 2).
        assert all(grad[b, k] > 0 for k in real if c[k] == 0.0)
        if variant.startswith("1vsall"):
            assert grad[b, top] < 0
    assert (grad[~unit.mask] == 0).all()


def test_pairwise_infonca_readings():
    policy, _ = random_stats(5, 2, seed=112)
    scores = t([[7.0, 2.0], [5.0, 4.0], [0.0, 9.0], [10.0, 3.0], [6.0, 5.5]])
    beta, alpha = 2.0, 0.4
    plain, dyn, one, renorm, weighted = [], [], [], [], []
    for (a0, a1), (r0, r1_) in zip(policy.avg_logps.tolist(), scores.tolist(), strict=True):
        d_ell = beta * ((a0 - a1) if r0 > r1_ else (a1 - a0))
        eps = 1.0 / (1.0 + math.exp(alpha * abs(r0 - r1_)))  # sigma(-alpha (r_w - r_l))
        plain.append((1 - eps) * neg_log_sigmoid(d_ell) + eps * neg_log_sigmoid(-d_ell))
        dyn.append((1 - eps) * neg_log_sigmoid(d_ell))
        one.append(neg_log_sigmoid(d_ell))
        renorm.append(neg_log_sigmoid(d_ell))  # Y+ = {winner}: renormalised target is 1
        weighted.append((1 - eps) * neg_log_sigmoid(d_ell))
    kw = dict(beta=beta, target_alpha=alpha)
    for variant, expected in [
        ("plain", plain),
        ("dynamic", dyn),
        ("1vsall", one),
        ("dynamic_renorm", renorm),
        ("1vsall_weighted", weighted),
    ]:
        assert_close(nca(variant, policy, scores, **kw).losses, t(expected), **TOL)


@pytest.mark.parametrize("variant", ["plain", "dynamic", "dynamic_renorm", "1vsall_weighted"])
def test_infonca_target_alpha_limit(variant):
    """Unique top (gap >= 1): as target_alpha grows every reading tends to -log softmax_top."""
    policy, scores = random_stats(6, 4, seed=113)
    scores = t(
        [[9, 7.5, 7, 5], [1, 2, 3, 4], [10, 0, 0, 0], [3, 5, 4, 6], [6, 8, 2, 1], [0, 1, 2, 0.5]]
    )
    beta = 2.25
    expected = [
        -math.log(math.exp(beta * ell[top]) / sum(math.exp(beta * v) for v in ell.values()))
        for real, r, ell, _ in groups(policy, scores)
        for top in [first_top(real, r)]
    ]
    gaps = []
    for target_alpha in (1.0, 5.0, 60.0):
        out = nca(variant, policy, scores, beta=beta, target_alpha=target_alpha)
        gaps.append((out.losses - t(expected)).abs().max().item())
    assert gaps[2] < 1e-12 and gaps[1] < gaps[0]
    limit = nca("1vsall", policy, scores, beta=beta, target_alpha=0.0)
    assert_close(limit.losses, t(expected), **TOL)


# ----------------------------------------------------------------------------------------------
# Shared REFA properties: shift invariance, invalid groups, masks, reference ignored
# ----------------------------------------------------------------------------------------------

REFA_NEW = {
    "refa_1vsall": lambda pol, s, **kw: r1(pol, s, **({"lam": 0.1, "p": 1.0} | kw)),
    **{
        f"nca_{v}": (lambda pol, s, v=v, **kw: nca(v, pol, s, **({"lam": 0.1} | kw)))
        for v in NCA_VARIANTS
    },
}


@pytest.mark.parametrize("name", sorted(REFA_NEW))
def test_refa_variants_shift_invariance(name):
    loss = REFA_NEW[name]
    policy, scores = edge_batch(seed=120)
    base = loss(policy, scores)
    c = t([0.75, -1.25, 2.0, 0.125, -0.5, 3.0, -2.25, 0.5, 1.5])[:, None]  # dyadic: exact ties
    shifted = loss(policy._replace(logps=policy.logps + c * policy.lengths), scores)
    assert_close(shifted.losses, base.losses, rtol=1e-9, atol=1e-12)
    assert_close(loss(policy, scores + c).losses, base.losses, rtol=1e-9, atol=1e-12)
    unit = stats(policy.avg_logps, None, policy.eos_logps, policy.has_eos, policy.mask, grad=True)
    loss(unit, scores).losses.sum().backward()
    assert unit.logps.grad[base.valid].abs().max() > 1e-3
    assert_close(unit.logps.grad.sum(-1), torch.zeros(9, dtype=F64), rtol=0, atol=1e-12)


def swepo_default(policy, scores, **kw) -> LossOutput:
    ref = stats(policy.logps.detach() * 0.9 + 0.3, policy.lengths, mask=policy.mask)
    hp = dict(beta=0.5, mode="dynamic", weighting="power", p=1.0, alpha=1.0, beta_on_weights=False)
    return swepo_loss(policy, ref, scores, **(hp | kw))


ALL_NEW = REFA_NEW | {
    "swepo_power": swepo_default,
    "swepo_exp_1vsk": lambda pol, s: swepo_default(pol, s, weighting="exp", mode="1vsk", p=2.0),
}


@pytest.mark.parametrize("name", sorted(ALL_NEW))
def test_invalid_groups_zero_loss_finite_gradients(name):
    loss = ALL_NEW[name]
    policy, scores = edge_batch(seed=121)
    scores[0] = t([4.0, 4.0, 4.0, 4.0])
    scores[1, :3] = t([2.5, 2.5, 2.5])  # padded slot 3 holds 100
    policy = stats(*policy, grad=True)
    out = loss(policy, scores)
    assert out.valid.tolist()[:5] == [False, False, True, False, False]
    assert (out.losses[~out.valid] == 0).all() and torch.isfinite(out.losses).all()
    (out.losses[out.valid].sum() / out.valid.sum()).backward()
    for grad in (policy.logps.grad, policy.eos_logps.grad):
        if grad is None:  # SWEPO and lam-free losses never touch eos_logps
            continue
        assert torch.isfinite(grad).all()
        assert (grad[~out.valid] == 0).all() and (grad[~policy.mask] == 0).all()
    assert_detached_metrics(out, 9)
    # K = 2 with tied scores, and empty slots filled with -inf (a group with no response at all).
    ninf = float("-inf")
    pol = stats(
        [[-3.0, -6.0, ninf], [ninf] * 3, [-2.0, -2.0, ninf]],
        None,
        [[-0.5, -1.0, ninf], [ninf] * 3, [-0.3, -0.3, ninf]],
        None,
        [[True, True, False], [False] * 3, [True, True, False]],
        grad=True,
    )
    out = loss(pol, t([[5.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 0.0]]))
    assert out.valid.tolist() == [True, False, False]
    assert torch.isfinite(out.losses).all() and (out.losses[1:] == 0).all()
    out.losses.sum().backward()
    assert torch.isfinite(pol.logps.grad).all() and (pol.logps.grad[1:] == 0).all()


@pytest.mark.parametrize("name", sorted(ALL_NEW))
def test_masked_slots_equal_smaller_k(name):
    loss = ALL_NEW[name]
    policy, _ = random_stats(1, 4, seed=122)
    scores = t([[2.0, 7.0, 4.0, 50.0]])
    logps = policy.logps.clone()
    logps[0, 3] = 40.0  # garbage the mask must hide
    mask = t([[True, True, True, False]]).bool()
    padded = stats(logps, policy.lengths, policy.eos_logps, policy.has_eos, mask, grad=True)
    small = stats(
        logps[:, :3],
        policy.lengths[:, :3],
        policy.eos_logps[:, :3],
        policy.has_eos[:, :3],
        grad=True,
    )
    out4, out3 = loss(padded, scores), loss(small, scores[:, :3])
    assert_close(out4.losses, out3.losses, **TOL)
    out4.losses.sum().backward()
    out3.losses.sum().backward()
    assert_close(padded.logps.grad[:, :3], small.logps.grad, **TOL)
    assert padded.logps.grad[0, 3] == 0


def test_reference_free_variants_ignore_ref_and_registry_capabilities():
    policy, scores = edge_batch(seed=123)
    ref, _ = random_stats(9, 4, seed=124)
    for fn, options in [
        (refa_1vsall_loss, R1_DEFAULTS),
        *((f, NCA_DEFAULTS | o) for f, o in NCA_VARIANTS.values()),
    ]:
        a, b = fn(policy, None, scores, **options), fn(policy, ref, scores, **options)
        assert torch.equal(a.losses, b.losses) and torch.equal(a.valid, b.valid)
    for name in ("refa_1vsall", "refa_infonca", "refa_infonca_dynamic", "refa_infonca_1vsall"):
        assert not LOSSES[name].needs_reference and LOSSES[name].k is None
    assert LOSSES["swepo"].needs_reference and LOSSES["swepo"].k is None
    assert LOSSES["refa_infonca"].config_cls().target_alpha != 0  # separate from alpha (Eq. 8)


# ----------------------------------------------------------------------------------------------
# SWEPO
# ----------------------------------------------------------------------------------------------

SW = dict(beta=0.5, mode="dynamic", weighting="power", p=1.0, alpha=1.0, beta_on_weights=False)


def swepo_batch(seed: int, *, grad: bool = False):
    policy, scores = edge_batch(seed, grad=grad)
    ref, _ = random_stats(9, 4, seed=seed + 1000)
    ref = stats(torch.where(policy.mask, ref.logps, -30.0), policy.lengths, mask=policy.mask)
    return policy, ref, scores


def swepo(policy, ref, scores, **overrides) -> LossOutput:
    return swepo_loss(policy, ref, scores, **(SW | overrides))


def swepo_weight(dev: float, hp: dict) -> float:
    if hp["weighting"] == "power":
        return abs(dev) ** hp["p"]  # python: 0.0 ** 0 == 1
    return math.exp(hp["alpha"] * abs(dev) ** hp["p"])


def swepo_direct(policy, ref, scores, **overrides) -> list[float]:
    """Eq. 11: -log(sum_{Y+} w e^{beta h} / sum_all w e^{beta h}), h = logps - ref logps
    (beta2: w^beta e^{beta h}); 0 where the weighted sets are empty or scores all equal."""
    hp = SW | overrides
    h = (policy.logps - ref.logps).tolist()
    out = []
    for b, (real, r, _, _) in enumerate(groups(policy, scores)):
        if len(real) < 2 or max(r.values()) == min(r.values()):
            out.append(0.0)
            continue
        r_bar = sum(r.values()) / len(real)
        top = first_top(real, r)
        pos = [k for k in real if (r[k] > r_bar if hp["mode"] == "dynamic" else k == top)]
        w = {k: swepo_weight(r[k] - r_bar, hp) for k in real}
        if hp["beta_on_weights"]:
            w = {k: v ** hp["beta"] for k, v in w.items()}
        num = sum(w[k] * math.exp(hp["beta"] * h[b][k]) for k in pos)
        den = sum(w[k] * math.exp(hp["beta"] * h[b][k]) for k in real)
        out.append(-math.log(num / den) if 0 < num < den else 0.0)
    return out


@pytest.mark.parametrize("beta_on_weights", [False, True])
@pytest.mark.parametrize("mode", ["dynamic", "1vsk"])
@pytest.mark.parametrize(
    ("weighting", "p"),
    [("power", 0.0), ("power", 1.0), ("power", 2.0), ("exp", 0.0), ("exp", 1.0), ("exp", 2.0)],
)
def test_swepo_matches_direct(weighting, p, mode, beta_on_weights):
    policy, ref, scores = swepo_batch(seed=130, grad=True)
    hp = dict(
        beta=0.3, mode=mode, weighting=weighting, p=p, alpha=0.2, beta_on_weights=beta_on_weights
    )
    out = swepo(policy, ref, scores, **hp)
    assert out.valid.tolist() == VALID_MEAN
    assert_close(out.losses, t(swepo_direct(policy, ref, scores, **hp)), **TOL)
    assert_detached_metrics(out, 9)
    # The implicit reward metric is beta * (log pi - log pi_ref) of the best response.
    best = scores.masked_fill(~policy.mask, -1e9).argmax(-1)
    h = (policy.logps - ref.logps).detach()
    chosen = 0.3 * h.gather(-1, best[:, None])[:, 0]
    assert_close(out.metrics["rewards/chosen"], chosen.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta_on_weights", [False, True])
@pytest.mark.parametrize("weighting", ["power", "exp"])
@pytest.mark.parametrize("p", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 3.0])
def test_swepo_pairs_equal_dpo(p, alpha, weighting, beta_on_weights):
    """At K = 2 |dS| is equal for both responses, the weights cancel."""
    policy, _ = random_stats(6, 2, seed=131)
    ref, _ = random_stats(6, 2, seed=132)
    scores = t([[7.0, 2.0], [5.0, 4.0], [9.0, 0.0], [10.0, 3.0], [6.0, 5.5], [3.0, 1.0]])
    hp = dict(
        beta=0.1,
        mode="dynamic",
        weighting=weighting,
        p=p,
        alpha=alpha,
        beta_on_weights=beta_on_weights,
    )
    dpo = dpo_loss(policy, ref, scores, beta=0.1, label_smoothing=0.0)
    assert dpo.valid.all()
    for mode in ("dynamic", "1vsk"):
        out = swepo_loss(policy, ref, scores, **(hp | {"mode": mode}))
        assert_close(out.losses, dpo.losses, **TOL)
        # Column order does not matter for SWEPO: the winner is found from the scores.
        flip = GroupStats(*(x.flip(-1) for x in policy))
        rflip = GroupStats(*(x.flip(-1) for x in ref))
        swapped = swepo_loss(flip, rflip, scores.flip(-1), **(hp | {"mode": mode}))
        assert_close(swapped.losses, dpo.losses, **TOL)


@pytest.mark.parametrize("weighting", ["power", "exp"])
def test_swepo_1vsk_p0_equals_onehot_infonca(weighting):
    """1-vs-k with p = 0: -log softmax_top(beta h), softmax over the real responses."""
    policy, ref, scores = swepo_batch(seed=133)
    beta = 0.4
    out = swepo(policy, ref, scores, beta=beta, mode="1vsk", weighting=weighting, p=0.0)
    logits = (beta * (policy.logps - ref.logps)).masked_fill(~policy.mask, float("-inf"))
    log_p = torch.log_softmax(logits, dim=-1)
    best = scores.masked_fill(~policy.mask, float("-inf")).argmax(-1)
    infonca = -log_p.gather(-1, best[:, None])[:, 0]
    assert_close(out.losses, torch.where(out.valid, infonca, 0.0), **TOL)


def test_swepo_dynamic_single_positive_equals_1vsk():
    """Dynamic (p = 0) with |Y+| = 1 is 1-vs-k (p = 0)."""
    policy, ref, scores = swepo_batch(seed=134)
    dyn = swepo(policy, ref, scores, p=0.0, mode="dynamic")
    one = swepo(policy, ref, scores, p=0.0, mode="1vsk")
    single = dyn.metrics["swepo/positives"] == 1
    assert single.sum() >= 3
    assert_close(dyn.losses[single], one.losses[single], **TOL)
    assert (dyn.losses[~single & dyn.valid] != one.losses[~single & dyn.valid]).all()


@pytest.mark.parametrize(("weighting", "p"), [("power", 1.0), ("power", 2.0), ("exp", 1.0)])
def test_swepo_shift_and_scale_invariances(weighting, p):
    """Identities 2, 3 and 13: shifts of h; affine rewards (power only); exp rescales alpha."""
    policy, ref, scores = swepo_batch(seed=135)
    hp = dict(weighting=weighting, p=p, alpha=0.3)
    base = swepo(policy, ref, scores, **hp)
    c = t([0.75, -1.25, 2.0, 0.125, -0.5, 3.0, -2.25, 0.5, 1.5])[:, None]
    assert_close(
        swepo(policy._replace(logps=policy.logps + c), ref, scores, **hp).losses,
        base.losses,
        rtol=1e-9,
        atol=1e-12,
    )
    assert_close(
        swepo(policy, ref._replace(logps=ref.logps + c), scores, **hp).losses,
        base.losses,
        rtol=1e-9,
        atol=1e-12,
    )
    affine = swepo(policy, ref, 2.0 * scores + c, **hp)  # exact in float64 (dyadic)
    if weighting == "power":
        assert_close(affine.losses, base.losses, rtol=1e-9, atol=1e-12)
    else:
        assert (affine.losses - base.losses)[base.valid].abs().max() > 1e-3
        rescaled = swepo(policy, ref, scores, **(hp | {"alpha": 0.3 * 2.0**p}))
        assert_close(affine.losses, rescaled.losses, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("weighting", "p"), [("power", 0.0), ("power", 2.0), ("exp", 1.0)])
def test_swepo_gradient_formula_and_signs(weighting, p):
    """Gradient (the paper's Lemma 5.3): dL/ds_i = q_i - 1[i in Y+] p+_i, s = beta h; ref and
    weights get no gradient."""
    policy, ref, scores = swepo_batch(seed=136, grad=True)
    ref = stats(ref.logps, ref.lengths, mask=ref.mask, grad=True)
    beta, alpha = 0.5, 0.4
    hp = dict(beta=beta, weighting=weighting, p=p, alpha=alpha)
    out = swepo(policy, ref, scores, **hp)
    out.losses.sum().backward()
    assert ref.logps.grad is None or (ref.logps.grad == 0).all()
    grad = policy.logps.grad
    h = (policy.logps - ref.logps).tolist()
    for b, (real, r, _, _) in enumerate(groups(policy, scores)):
        if not out.valid[b]:
            assert (grad[b] == 0).all()
            continue
        r_bar = sum(r.values()) / len(real)
        e = {k: swepo_weight(r[k] - r_bar, SW | hp) * math.exp(beta * h[b][k]) for k in real}
        pos = [k for k in real if r[k] > r_bar]
        total, a_sum = sum(e.values()), sum(e[k] for k in pos)
        for k in real:
            expected = beta * (e[k] / total - (e[k] / a_sum if k in pos else 0.0))
            assert math.isclose(grad[b, k].item(), expected, rel_tol=1e-9, abs_tol=1e-13)
            if e[k] > 0:
                assert (grad[b, k] < 0) if k in pos else (grad[b, k] > 0)
    assert (grad[~policy.mask] == 0).all()


def test_swepo_zero_weight_at_mean_and_worked_example():
    """Power weights: for S = (8, 7, 7, 6) the 7s (at the mean) drop out; and hand-computed
    weights for S = (8.5, 7, 6, 3) at s = 0 (negatives' gradients are w_j / W)."""
    pol = stats([[-4.0, -2.0, -3.0, -5.0]], grad=True)
    ref = stats([[-4.5, -1.0, -2.0, -5.5]])
    out = swepo(pol, ref, t([[8.0, 7.0, 7.0, 6.0]]), beta=1.0, p=1.0)
    out.losses.sum().backward()
    assert pol.logps.grad[0, 1] == 0 and pol.logps.grad[0, 2] == 0
    assert out.metrics["swepo/zero_weight"].item() == 2.0
    # Only the 8 and the 6 remain, with equal weights: DPO on that pair.
    assert_close(out.losses[0].item(), neg_log_sigmoid(0.5 - 0.5), **TOL)
    zero = stats([[0.0] * 4], grad=True)
    cases = [
        ("power", 1.0, [2.375, 0.875, 0.125, 3.125]),
        ("power", 2.0, [5.640625, 0.765625, 0.015625, 9.765625]),
        ("exp", 1.0, [10.751, 2.399, 1.133, 22.760]),
    ]
    for weighting, p, w in cases:
        zero.logps.grad = None
        out = swepo(
            zero, stats([[0.0] * 4]), t([[8.5, 7.0, 6.0, 3.0]]), beta=1.0, weighting=weighting, p=p
        )
        out.losses.sum().backward()
        total = sum(w)
        expected = [
            w[0] / total - w[0] / (w[0] + w[1]),
            w[1] / total - w[1] / (w[0] + w[1]),
            w[2] / total,
            w[3] / total,
        ]
        assert_close(zero.logps.grad[0], t(expected), rtol=2e-4, atol=1e-5)


def test_swepo_bounds_and_sum_inside_log():
    """Identities 9 and 10: L >= 0, L -> 0 as negatives vanish; for p = 0,
    L <= -(1/n+) sum_{Y+} log softmax_i - log n+."""
    policy, ref, scores = swepo_batch(seed=137)
    out = swepo(policy, ref, scores, p=0.0, beta=1.0)
    assert (out.losses >= 0).all() and (out.losses[out.valid] > 0).all()
    r_bar = (scores * policy.mask).sum(-1, keepdim=True) / policy.mask.sum(-1, keepdim=True)
    is_pos = policy.mask & (scores > r_bar)
    log_p = torch.log_softmax((policy.logps - ref.logps).masked_fill(~policy.mask, -1e300), -1)
    n_pos = is_pos.sum(-1).clamp(min=1)
    bound = -(log_p * is_pos).sum(-1) / n_pos - n_pos.log()
    assert (out.losses[out.valid] <= bound[out.valid] + 1e-12).all()
    far = policy.logps - 1e3 * (policy.mask & ~is_pos)
    assert swepo(policy._replace(logps=far), ref, scores, p=0.0).losses.max() < 1e-12


def test_swepo_rejects_unknown_options():
    policy, ref, scores = swepo_batch(seed=138)
    for bad in ({"mode": "pairs"}, {"weighting": "exp_power"}, {"p": -1.0}):
        with pytest.raises(ValueError):
            swepo(policy, ref, scores, **bad)


def test_negative_gamma_is_rejected():
    from prefopt.losses.refa import set_contrast

    z = torch.zeros(1, 2)
    sets = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    with pytest.raises(ValueError, match="loss.gamma"):
        set_contrast(z, *sets, torch.tensor([True]), gamma=-0.5)
