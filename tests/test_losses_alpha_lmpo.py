# Run: .venv/bin/pytest tests/test_losses_alpha_lmpo.py -q
"""alpha-DPO and LMPO: hand-computed values and their papers' identities.

Expected values are computed independently of the loss code: python-float loops over pairs
(``statistics`` for the z-score moments, the literal Eq. 10 / Eq. 12 forms), or the registered
SimPO loss. The running statistics (``prefopt/losses/running.py``) are checked against hand
numbers over two steps and end to end through a resumed training run.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import checkpoint_weights
from loss_helpers import F64, TOL, assert_detached_metrics, neg_log_sigmoid, stats, t
from test_train import _cfg
from torch.testing import assert_close

from prefopt.losses import get_spec
from prefopt.losses.alpha_dpo import alpha_dpo_loss, dpo_margin
from prefopt.losses.lmpo import length_normalized_prob, lmpo_loss, lmpo_margin
from prefopt.losses.pairwise import simpo_loss
from prefopt.losses.running import batch_sums, init_state, update_state, zscore
from prefopt.train.loop import run
from prefopt.types import LossOutput


def state(mean: float, std: float, initialized: bool = True) -> dict[str, torch.Tensor]:
    return {"mean": t(mean), "std": t(std), "initialized": t(float(initialized))}


UNINIT = state(0.0, 0.0, initialized=False)

# Four pairs: two ordered, one tie (invalid), one more ordered; lengths differ within pairs.
POLICY = [[-10.0, -12.0], [-20.0, -15.0], [-5.0, -5.0], [-7.0, -13.0]]
REF = [[-11.0, -11.0], [-19.0, -17.0], [-6.0, -4.0], [-7.5, -12.0]]
LENGTHS = [[4.0, 6.0], [5.0, 3.0], [2.0, 2.0], [7.0, 9.0]]
SCORES = [[2.0, 1.0], [3.0, 1.0], [1.0, 1.0], [0.9, 0.1]]
VALID = [True, True, False, True]


def moments_direct(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def zscore_params(values, st, zscore_stats, decay) -> tuple[float, float]:
    """(mean, std) that normalise the batch: the state, or the state folded with the batch."""
    bm, bs = moments_direct(values)
    mean, std, started = float(st["mean"]), float(st["std"]), float(st["initialized"]) > 0
    if not started:
        return bm, bs
    if zscore_stats == "running":
        return mean, std
    return decay * mean + (1 - decay) * bm, decay * std + (1 - decay) * bs


# ----------------------------------------------------------------------------------------------
# alpha-DPO
# ----------------------------------------------------------------------------------------------

ALPHA = dict(
    beta=2.5,
    gamma=1.5,
    alpha=0.2,
    convention="code",
    zscore=True,
    zscore_stats="running",
    momentum=0.9,
    eps=1e-6,
)


def alpha(policy, ref, scores, st, **overrides) -> LossOutput:
    return alpha_dpo_loss(policy, ref, scores, state=st, **(ALPHA | overrides))


def alpha_direct(st, policy=POLICY, ref=REF, lengths=LENGTHS, scores=SCORES, **overrides):
    """Eq. 12 with Eqs. 10-11, python floats: (losses, M, M*)."""
    hp = ALPHA | overrides
    beta, conv = hp["beta"], hp["convention"]
    valid = [s[0] > s[1] for s in scores]
    ms = []
    for (pw, pl), (rw, rl), (lw, ll) in zip(policy, ref, lengths, strict=True):
        if conv == "paper":
            ms.append(beta * ((pw - rw) - (pl - rl)))
        else:
            ms.append((pw / lw - rw / lw) - (pl / ll - rl / ll))
    vals = [m for m, v in zip(ms, valid, strict=True) if v]
    mu, sd = zscore_params(vals, st, hp["zscore_stats"], hp["momentum"])
    m_star = [(m - mu) / (sd + hp["eps"]) if hp["zscore"] else m for m in ms]
    scale = hp["alpha"] * beta if conv == "code" else hp["alpha"]
    losses = []
    for (pw, pl), (lw, ll), ms_i, v in zip(policy, lengths, m_star, valid, strict=True):
        u = beta * (pw / lw - pl / ll)
        losses.append(neg_log_sigmoid(u - (hp["gamma"] + scale * ms_i)) if v else 0.0)
    return losses, ms, m_star


def test_alpha_dpo_hand_value_code_convention():
    # Pair 0 by hand: M = (-10/4 + 11/4) - (-12/6 + 11/6) = 0.25 + 1/6; state (0.1, 0.5).
    st = state(0.1, 0.5)
    m0 = 0.25 + 1 / 6
    m_star0 = (m0 - 0.1) / (0.5 + 1e-6)
    u0 = 2.5 * (-10 / 4 + 12 / 6)
    loss0 = math.log(1 + math.exp(-(u0 - 1.5 - 0.2 * 2.5 * m_star0)))
    expected, ms, m_star = alpha_direct(st)
    assert math.isclose(expected[0], loss0, rel_tol=1e-12)
    out = alpha(stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES), st)
    assert out.valid.tolist() == VALID
    assert_close(out.losses, t(expected), **TOL)
    assert_close(out.metrics["alpha_dpo/m"], t(ms), **TOL)
    valid_star = [x if v else 0.0 for x, v in zip(m_star, VALID, strict=True)]
    assert_close(out.metrics["alpha_dpo/m_star"], t(valid_star), **TOL)
    assert_detached_metrics(out, 4)


@pytest.mark.parametrize("convention", ["code", "paper"])
@pytest.mark.parametrize("zscore_stats", ["running", "running_and_batch"])
@pytest.mark.parametrize("initialized", [True, False])
def test_alpha_dpo_matches_direct_computation(convention, zscore_stats, initialized):
    st = state(-0.3, 1.7, initialized)
    hp = dict(convention=convention, zscore_stats=zscore_stats, alpha=0.05, gamma=0.4)
    out = alpha(stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES), st, **hp)
    assert_close(out.losses, t(alpha_direct(st, **hp)[0]), **TOL)


def test_alpha_dpo_without_zscore_uses_raw_margin():
    hp = dict(zscore=False, convention="paper", alpha=0.1)
    out = alpha(stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES), state(5.0, 9.0), **hp)
    assert_close(out.losses, t(alpha_direct(state(5.0, 9.0), **hp)[0]), **TOL)


def test_alpha_dpo_stat_updates_are_sums_over_valid_pairs():
    out = alpha(stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES), UNINIT)
    ms = [m for m, v in zip(alpha_direct(UNINIT)[1], VALID, strict=True) if v]
    assert out.stat_updates.keys() == {"sum", "sq_sum", "count"}
    assert_close(out.stat_updates["sum"], t(sum(ms)), **TOL)
    assert_close(out.stat_updates["sq_sum"], t(sum(m * m for m in ms)), **TOL)
    assert float(out.stat_updates["count"]) == 3


def test_alpha_dpo_uninitialised_state_normalises_with_the_batch():
    """Before the first update, M* has mean 0 and (unbiased) std 1 over the valid pairs."""
    out = alpha(stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES), UNINIT, eps=0.0)
    m_star = out.metrics["alpha_dpo/m_star"][out.valid]
    assert_close(m_star.mean(), t(0.0), **TOL)
    assert_close(m_star.std(), t(1.0), **TOL)
    # The invalid (tied) pair is excluded from the statistics: changing it changes nothing.
    policy2 = [row[:] for row in POLICY]
    policy2[2] = [-50.0, -1.0]
    out2 = alpha(stats(policy2, LENGTHS), stats(REF, LENGTHS), t(SCORES), UNINIT, eps=0.0)
    assert_close(out2.losses, out.losses, **TOL)


def test_alpha_dpo_zscore_uses_the_state_passed_in():
    policy, ref, scores = stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES)
    a = alpha(policy, ref, scores, state(0.0, 1.0))
    b = alpha(policy, ref, scores, state(0.5, 1.0))
    c = alpha(policy, ref, scores, state(0.0, 2.0))
    for other in (b, c):
        assert not torch.allclose(a.losses[a.valid], other.losses[other.valid])
    m0 = float(a.metrics["alpha_dpo/m"][0])  # a state whose mean is M_0 gives M*_0 = 0
    centred = alpha(policy, ref, scores, state(m0, 3.0))
    assert float(centred.metrics["alpha_dpo/m_star"][0]) == 0.0


@pytest.mark.parametrize("convention", ["code", "paper"])
@pytest.mark.parametrize("st", [state(0.2, 0.7), UNINIT])
def test_alpha_dpo_with_alpha_zero_is_simpo(convention, st):
    """alpha = 0 gives SimPO(beta, gamma), value and gradient."""
    pa, pb = stats(POLICY, LENGTHS, grad=True), stats(POLICY, LENGTHS, grad=True)
    out = alpha(pa, stats(REF, LENGTHS), t(SCORES), st, alpha=0.0, convention=convention)
    ref_out = simpo_loss(pb, None, t(SCORES), beta=2.5, gamma=1.5, label_smoothing=0.0)
    assert_close(out.losses, ref_out.losses, **TOL)
    out.losses.sum().backward()
    ref_out.losses.sum().backward()
    assert_close(pa.logps.grad, pb.logps.grad, **TOL)


def test_alpha_dpo_margin_is_detached_and_gives_simpo_per_pair():
    """No gradient reaches the reference; the gradient is SimPO's with gamma_i fixed."""
    policy, ref = stats(POLICY, LENGTHS, grad=True), stats(REF, LENGTHS, grad=True)
    out = alpha(policy, ref, t(SCORES), state(0.1, 0.5), alpha=0.5)
    (g_ref,) = torch.autograd.grad(
        out.losses.sum(), ref.logps, allow_unused=True, retain_graph=True
    )
    assert g_ref is None or torch.count_nonzero(g_ref) == 0
    out.losses.sum().backward()
    targets = out.metrics["alpha_dpo/margin"].tolist()
    for b in range(4):
        row = stats([POLICY[b]], [LENGTHS[b]], grad=True)
        simpo = simpo_loss(
            row, None, t([SCORES[b]]), beta=2.5, gamma=targets[b], label_smoothing=0.0
        )
        assert_close(out.losses[b : b + 1], simpo.losses, **TOL)
        simpo.losses.sum().backward()
        assert_close(policy.logps.grad[b : b + 1], row.logps.grad, **TOL)


def test_alpha_dpo_policy_equal_to_reference_is_simpo_without_nan():
    """pi_theta = pi_ref gives M = 0, M* = 0 (eps-guarded), the SimPO loss, finite grads."""
    policy = stats(POLICY, LENGTHS, grad=True)
    out = alpha(policy, stats(POLICY, LENGTHS), t(SCORES), UNINIT)
    assert torch.count_nonzero(out.metrics["alpha_dpo/m_star"]) == 0
    simpo = simpo_loss(
        stats(POLICY, LENGTHS), None, t(SCORES), beta=2.5, gamma=1.5, label_smoothing=0.0
    )
    assert_close(out.losses, simpo.losses, **TOL)
    out.losses.sum().backward()
    assert torch.isfinite(policy.logps.grad).all()


def test_alpha_dpo_margin_antisymmetry():
    """Swapping chosen and rejected flips M."""
    swap = [[r[1], r[0]] for r in POLICY], [[r[1], r[0]] for r in REF]
    lengths = [[r[1], r[0]] for r in LENGTHS]
    for convention in ("code", "paper"):
        m = dpo_margin(stats(POLICY, LENGTHS), stats(REF, LENGTHS), 2.5, convention)
        m_swap = dpo_margin(stats(swap[0], lengths), stats(swap[1], lengths), 2.5, convention)
        assert_close(m_swap, -m, **TOL)


def test_alpha_dpo_convention_bridge_with_equal_lengths():
    """Convention bridge (z-scores ignore scale): with equal lengths, code(alpha_c) equals
    paper(alpha = beta * alpha_c)."""
    lengths = [[6.0, 6.0]] * 4
    policy, ref, scores = stats(POLICY, lengths), stats(REF, lengths), t(SCORES)
    code = alpha(policy, ref, scores, UNINIT, convention="code", alpha=0.2, eps=0.0)
    paper = alpha(policy, ref, scores, UNINIT, convention="paper", alpha=0.2 * 2.5, eps=0.0)
    assert_close(code.losses, paper.losses, **TOL)


def test_alpha_dpo_all_invalid_is_zero_and_finite():
    policy = stats(POLICY, LENGTHS, grad=True)
    scores = t([[1.0, 1.0], [0.0, 2.0], [3.0, 3.0], [1.0, 1.0]])  # ties and a reversed pair
    for st in (UNINIT, state(0.0, 0.0)):
        out = alpha(policy, stats(REF, LENGTHS), scores, st)
        assert not out.valid.any() and torch.count_nonzero(out.losses) == 0
        assert float(out.stat_updates["count"]) == 0
        out.losses.sum().backward()
        assert torch.isfinite(policy.logps.grad).all()


def test_alpha_dpo_registration():
    spec = get_spec("alpha_dpo")
    assert spec.needs_reference and spec.k == 2 and spec.state is not None
    st = spec.init_state(spec.config_cls())
    assert st.keys() == {"mean", "std", "initialized"}
    assert all(v.dtype == F64 and v.shape == () for v in st.values())
    with pytest.raises(ValueError, match="convention"):
        spec.init_state(spec.config_cls(convention="nope"))
    with pytest.raises(ValueError, match="zscore_stats"):
        alpha(stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES), UNINIT, zscore_stats="x")


# ----------------------------------------------------------------------------------------------
# Running statistics (shared)
# ----------------------------------------------------------------------------------------------


def test_state_update_two_steps_by_hand():
    x1, x2 = [1.0, 2.0, 4.0], [0.0, 3.0]
    valid1, valid2 = torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    s0 = init_state("batch")
    s1 = update_state(s0, batch_sums(t(x1), valid1), 0.9)
    assert float(s1["initialized"]) == 1.0
    assert math.isclose(float(s1["mean"]), 7 / 3, rel_tol=1e-12)
    assert math.isclose(float(s1["std"]), math.sqrt(7 / 3), rel_tol=1e-12)  # stdev of x1
    s2 = update_state(s1, batch_sums(t(x2), valid2), 0.9)
    assert math.isclose(float(s2["mean"]), 0.9 * 7 / 3 + 0.1 * 1.5, rel_tol=1e-12)
    assert math.isclose(
        float(s2["std"]), 0.9 * math.sqrt(7 / 3) + 0.1 * math.sqrt(4.5), rel_tol=1e-12
    )
    # Sums add over micro-batches: two halves of a batch give the batch's update.
    halves = [batch_sums(t(x1[:1]), valid1[:1]), batch_sums(t(x1[1:]), valid1[1:])]
    summed = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    assert_close(update_state(s0, summed, 0.9), s1, **TOL)


def test_state_zero_init_is_the_code_ema():
    """Zero-initialised EMA of a constant batch mean mu gives (1 - decay^t) * mu."""
    s = init_state("zero")
    x = t([2.0, 4.0])  # mean 3, stdev sqrt(2)
    for step in range(1, 4):
        s = update_state(s, batch_sums(x, torch.ones(2, dtype=torch.bool)), 0.9)
        assert math.isclose(float(s["mean"]), (1 - 0.9**step) * 3.0, rel_tol=1e-12)
        assert math.isclose(float(s["std"]), (1 - 0.9**step) * math.sqrt(2), rel_tol=1e-12)


def test_state_update_is_pure():
    s = state(0.5, 2.0)
    before = {k: v.clone() for k, v in s.items()}
    new = update_state(s, batch_sums(t([1.0, 3.0]), torch.ones(2, dtype=torch.bool)), 0.9)
    assert new is not s and all(new[k] is not s[k] for k in s)
    assert_close(s, before, rtol=0, atol=0)
    empty = update_state(s, batch_sums(t([1.0]), torch.zeros(1, dtype=torch.bool)), 0.9)
    assert empty is not s
    assert_close(empty, before, rtol=0, atol=0)  # no valid group: unchanged


@pytest.mark.parametrize("zscore_stats", ["running", "running_and_batch"])
def test_zscore_gradient_flows_through_x_only(zscore_stats):
    """Eqs. 24-25: the statistics carry no gradient, so d z / d x = 1 / (std + eps)."""
    x = t([0.3, 0.5, 0.9, 0.1]).requires_grad_(True)
    valid = torch.tensor([True, True, True, False])
    st = state(0.4, 0.2)
    z = zscore(x, valid, st, decay=0.9, eps=1e-6, zscore_stats=zscore_stats)
    (g,) = torch.autograd.grad(z.sum(), x)
    _, std = zscore_params([0.3, 0.5, 0.9], st, zscore_stats, 0.9)
    assert_close(g, t([1 / (std + 1e-6)] * 3 + [0.0]), **TOL)


def test_zscore_batch_statistics_are_affine_invariant():
    """With batch statistics, z(a * x + c) = z(x) for a > 0, mean 0 and std 1."""
    x = t([0.3, 0.5, 0.9, 0.2])
    valid = torch.ones(4, dtype=torch.bool)
    kw = dict(decay=0.9, eps=0.0, zscore_stats="running")
    z = zscore(x, valid, UNINIT, **kw)
    assert_close(zscore(0.5 * x + 3.0, valid, UNINIT, **kw), z, **TOL)
    assert_close(z.mean(), t(0.0), **TOL)
    assert_close(z.std(), t(1.0), **TOL)


# ----------------------------------------------------------------------------------------------
# LMPO
# ----------------------------------------------------------------------------------------------

LMPO = dict(
    beta=2.5,
    log_h=1.4,
    lam=0.2,
    detach=False,
    power=5,
    length_factor=True,
    zscore=True,
    zscore_stats="running",
    ema_decay=0.9,
    eps=1e-6,
)


def lmpo(policy, scores, st, **overrides) -> LossOutput:
    return lmpo_loss(policy, None, scores, state=st, **(LMPO | overrides))


def lmpo_direct(st, policy=POLICY, lengths=LENGTHS, scores=SCORES, **overrides):
    """Eq. 10 literally, -log(1 / (1 + h exp(-d))), with Eqs. 7-9 and 11: (losses, m, m_bar)."""
    hp = LMPO | overrides
    valid = [s[0] > s[1] for s in scores]
    ms = []
    for (sw, sl), (lw, ll) in zip(policy, lengths, strict=True):
        lbar = (lw + ll) / 2
        fw, fl = (lbar / lw, lbar / ll) if hp["length_factor"] else (1.0, 1.0)
        p_w, p_l = math.exp(sw / lw * fw), math.exp(sl / ll * fl)
        ms.append((1 - p_w) * (1 - (p_w - p_l) ** hp["power"]))
    vals = [m for m, v in zip(ms, valid, strict=True) if v]
    a, b = zscore_params(vals, st, hp["zscore_stats"], hp["ema_decay"])
    m_bar = [(m - a) / (b + hp["eps"]) if hp["zscore"] else m for m in ms]
    h = math.exp(hp["log_h"])
    losses = []
    for (sw, sl), (lw, ll), mb, v in zip(policy, lengths, m_bar, valid, strict=True):
        d = hp["beta"] * sw / lw - hp["beta"] * sl / ll - hp["lam"] * mb
        losses.append(-math.log(1 / (1 + h * math.exp(-d))) if v else 0.0)
    return losses, ms, m_bar


# Log-probs near 0 so that p is far from 0 and the power-5 term matters (for typical log-probs
# it is about 1e-5).
NEAR = [[-0.4, -3.0], [-1.0, -0.8], [-0.5, -0.5], [-0.2, -4.0]]


def test_lmpo_hand_value():
    # Pair 0 by hand: L_bar = 5, p_w = exp(-0.4/4 * 5/4), p_l = exp(-3/6 * 5/6).
    st = state(0.4, 0.3)
    p_w, p_l = math.exp(-0.125), math.exp(-5 / 12)
    m0 = (1 - p_w) * (1 - (p_w - p_l) ** 5)
    d0 = 2.5 * (-0.1) - 2.5 * (-0.5) - 0.2 * (m0 - 0.4) / (0.3 + 1e-6)
    loss0 = math.log(1 + math.exp(1.4) * math.exp(-d0))
    expected, ms, m_bar = lmpo_direct(st, policy=NEAR)
    assert math.isclose(expected[0], loss0, rel_tol=1e-12)
    for detach in (False, True):  # the flag changes gradients, never values
        out = lmpo(stats(NEAR, LENGTHS), t(SCORES), st, detach=detach)
        assert out.valid.tolist() == VALID
        assert_close(out.losses, t(expected), **TOL)
        assert_close(out.metrics["lmpo/margin"], t(ms), **TOL)
        assert_close(out.metrics["lmpo/m_bar"][out.valid], t(m_bar)[out.valid], **TOL)
        assert_detached_metrics(out, 4)
    vals = [m for m, v in zip(ms, VALID, strict=True) if v]
    assert_close(out.stat_updates["sum"], t(sum(vals)), **TOL)
    assert_close(out.stat_updates["sq_sum"], t(sum(m * m for m in vals)), **TOL)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"zscore_stats": "running_and_batch"},
        {"zscore": False},
        {"length_factor": False},
        {"power": 3},
        {"log_h": 0.25, "lam": 1.0, "beta": 2.0},
    ],
)
@pytest.mark.parametrize("initialized", [True, False])
def test_lmpo_matches_direct_computation(overrides, initialized):
    st = state(0.3, 0.1, initialized)
    out = lmpo(stats(NEAR, LENGTHS), t(SCORES), st, **overrides)
    assert_close(out.losses, t(lmpo_direct(st, policy=NEAR, **overrides)[0]), **TOL)


@pytest.mark.parametrize(
    ("beta", "log_h"), [(2.0, 1.6), (2.5, 0.25), (2.0, 1.0), (2.5, 1.4), (2.0, 0.0)]
)
def test_lmpo_lambda_zero_is_simpo_with_gamma_log_h(beta, log_h):
    """LMPO(beta, h, lam = 0) == SimPO(beta, gamma = log h), value and gradient."""
    pa, pb = stats(POLICY, LENGTHS, grad=True), stats(POLICY, LENGTHS, grad=True)
    out = lmpo(pa, t(SCORES), state(0.3, 0.1), beta=beta, log_h=log_h, lam=0.0)
    ref = simpo_loss(pb, None, t(SCORES), beta=beta, gamma=log_h, label_smoothing=0.0)
    assert_close(out.losses, ref.losses, **TOL)
    out.losses.sum().backward()
    ref.losses.sum().backward()
    assert_close(pa.logps.grad, pb.logps.grad, **TOL)


def test_lmpo_loss_at_d_equal_log_h_is_log_2_and_gradient():
    """Loss(d = log h) = log 2; d L / d logps_w = (sigmoid(d - log h) - 1) beta / |y_w|."""
    policy = stats([[-2.0, (-2.0 - 1.4 / 2.5) * 3]], [[1.0, 3.0]], grad=True)  # beta * d_avg = 1.4
    out = lmpo(policy, t([[1.0, 0.0]]), UNINIT, lam=0.0)
    assert math.isclose(float(out.losses.detach()[0]), math.log(2), rel_tol=1e-12)
    out.losses.sum().backward()
    assert_close(policy.logps.grad, t([[-0.5 * 2.5 / 1.0, 0.5 * 2.5 / 3.0]]), **TOL)


def test_lmpo_length_normalized_prob():
    """log p = sum * L_bar / |y|^2; equal lengths give exp(avg); p in (0, 1]."""
    p = length_normalized_prob(stats(POLICY, LENGTHS), True)
    for b, ((sw, sl), (lw, ll)) in enumerate(zip(POLICY, LENGTHS, strict=True)):
        lbar = (lw + ll) / 2
        assert math.isclose(math.log(float(p[b, 0])), sw * lbar / lw**2, rel_tol=1e-12)
        assert math.isclose(math.log(float(p[b, 1])), sl * lbar / ll**2, rel_tol=1e-12)
    equal = stats(POLICY, [[4.0, 4.0]] * 4)
    assert_close(length_normalized_prob(equal, True), equal.avg_logps.exp(), **TOL)
    assert ((p > 0) & (p <= 1)).all()


def test_lmpo_margin_bounds():
    """m(1, .) = 0, m(p, p) = 1 - p, m(0, 1) = 2, m in [0, 2]; the power-5 path."""
    assert float(lmpo_margin(t(1.0), t(0.3), 5)) == 0.0
    assert math.isclose(float(lmpo_margin(t(0.4), t(0.4), 5)), 0.6, rel_tol=1e-12)
    assert float(lmpo_margin(t(0.0), t(1.0), 5)) == 2.0
    assert math.isclose(float(lmpo_margin(t(0.9), t(0.1), 5)), 0.1 * (1 - 0.8**5), rel_tol=1e-12)
    grid = torch.linspace(0, 1, 21, dtype=F64)
    m = lmpo_margin(grid[:, None], grid[None, :], 5)
    assert (m >= 0).all() and (m <= 2).all()


def test_lmpo_margin_partials():
    """dm/dp_w = -(1 - D^5) - 5 (1 - p_w) D^4 <= 0 and dm/dp_l = 5 (1 - p_w) D^4 >= 0."""
    grid = torch.linspace(0.0, 1.0, 11, dtype=F64)
    p_w = grid[:, None].expand(11, 11).clone().requires_grad_(True)
    p_l = grid[None, :].expand(11, 11).clone().requires_grad_(True)
    g_w, g_l = torch.autograd.grad(lmpo_margin(p_w, p_l, 5).sum(), (p_w, p_l))
    delta = (p_w - p_l).detach()
    assert_close(g_w, -(1 - delta**5) - 5 * (1 - p_w.detach()) * delta**4, **TOL)
    assert_close(g_l, 5 * (1 - p_w.detach()) * delta**4, **TOL)
    assert (g_w <= 0).all() and (g_l >= 0).all()


def test_lmpo_detach_flag_toggles_the_margin_gradient():
    """detach=True is SimPO with gamma_i = log h + lam m_bar_i; detach=False is not,
    and its extra margin gradient pushes chosen up and rejected down harder."""
    st = state(0.3, 0.1)
    grads = {}
    for detach in (True, False):
        policy = stats(NEAR, LENGTHS, grad=True)
        out = lmpo(policy, t(SCORES), st, detach=detach)
        out.losses.sum().backward()
        grads[detach] = policy.logps.grad
    margins = (1.4 + 0.2 * out.metrics["lmpo/m_bar"]).tolist()
    for b in range(4):
        row = stats([NEAR[b]], [LENGTHS[b]], grad=True)
        simpo = simpo_loss(
            row, None, t([SCORES[b]]), beta=2.5, gamma=margins[b], label_smoothing=0.0
        )
        simpo.losses.sum().backward()
        assert_close(grads[True][b : b + 1], row.logps.grad, **TOL)
    on, off = grads[False][out.valid], grads[True][out.valid]
    assert not torch.allclose(on, off)
    assert (on[:, 0] < 0).all() and (on[:, 1] > 0).all()
    assert (on[:, 0].abs() >= off[:, 0].abs()).all() and (on[:, 1] >= off[:, 1]).all()


def test_lmpo_small_lambda_is_close_to_simpo():
    """The loss difference to SimPO(gamma = log h) is linear in lam for small lam."""
    policy, scores, st = stats(NEAR, LENGTHS), t(SCORES), state(0.3, 0.1)
    base = lmpo(policy, scores, st, lam=0.0).losses
    d1 = lmpo(policy, scores, st, lam=1e-4).losses - base
    d2 = lmpo(policy, scores, st, lam=2e-4).losses - base
    assert_close(d2, 2 * d1, rtol=1e-3, atol=1e-12)


def test_lmpo_all_invalid_is_zero_and_finite():
    policy = stats(NEAR, LENGTHS, grad=True)
    scores = t([[1.0, 1.0], [0.0, 2.0], [3.0, 3.0], [1.0, 1.0]])
    out = lmpo(policy, scores, UNINIT)
    assert not out.valid.any() and torch.count_nonzero(out.losses) == 0
    out.losses.sum().backward()
    assert torch.isfinite(policy.logps.grad).all()


def test_lmpo_registration_is_reference_free():
    """No reference model; the loss runs with ref=None."""
    spec = get_spec("lmpo")
    assert not spec.needs_reference and spec.k == 2 and spec.state is not None
    st = spec.init_state(spec.config_cls())
    assert float(st["initialized"]) == 0.0


def test_no_state_is_the_uninitialised_state():
    """Called without ``state`` (outside the loop), both losses use the batch's statistics."""
    policy, ref, scores = stats(POLICY, LENGTHS), stats(REF, LENGTHS), t(SCORES)
    no_state = alpha_dpo_loss(policy, ref, scores, **ALPHA)
    assert_close(no_state.losses, alpha(policy, ref, scores, UNINIT).losses, **TOL)
    no_state = lmpo_loss(policy, None, scores, **LMPO)
    assert_close(no_state.losses, lmpo(policy, scores, UNINIT).losses, **TOL)


# ----------------------------------------------------------------------------------------------
# End to end: the loss state survives an interrupted run
# ----------------------------------------------------------------------------------------------


def _loss_state(run_dir, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{step:06d}" / "train_state.pt"
    return torch.load(path, weights_only=False)["loss_state"]


def test_alpha_dpo_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, tiny_data):
    common = ("loss=alpha_dpo", "trainer.max_steps=4", "optimizer.lr=1e-3")
    straight = tmp_path / "straight"
    run(_cfg(straight, tiny_data, *common))
    resumed = tmp_path / "resumed"
    assert run(_cfg(resumed, tiny_data, *common, "trainer.stop_at_step=2")) == {}
    mid = _loss_state(resumed, 2)
    assert float(mid["initialized"]) == 1.0 and float(mid["std"]) > 0
    run(_cfg(resumed, tiny_data, *common))  # resume=auto picks up step 2
    a, b = checkpoint_weights(straight, 4), checkpoint_weights(resumed, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same keys, bit-identical values
    sa, sb = _loss_state(straight, 4), _loss_state(resumed, 4)
    assert sa.keys() == sb.keys() == {"mean", "std", "initialized"}
    for k in sa:
        assert sa[k].dtype == F64 and sa[k].shape == ()
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert not torch.equal(sa["mean"], mid["mean"])  # the resumed half did update the state
