# Run: .venv/bin/pytest tests/test_losses.py -q
"""Tests for prefopt.losses: DPO, SimPO, REFA-dynamic (the paper's identities) and the registry.

Every expected value is computed independently of the loss code: by hand from explicit numbers,
or with python-float loops over responses (never the softplus / logsumexp form of the losses).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch
from loss_helpers import F64, TOL, assert_detached_metrics, neg_log_sigmoid, random_stats, stats, t
from omegaconf import OmegaConf
from torch.testing import assert_close

from prefopt.losses import LOSSES, build_loss, get_spec
from prefopt.losses.pairwise import dpo_loss, simpo_loss
from prefopt.losses.refa import eos_regularizer, refa_dynamic_loss, score_deviation
from prefopt.types import GroupStats, LossOutput

REFA_DEFAULTS = dict(
    beta=2.5, gamma=1.0, alpha=0.5, p=2.0, deviation="signed", lam=0.0, length_normalize=True
)


def refa(policy: GroupStats, scores: torch.Tensor, **overrides) -> LossOutput:
    return refa_dynamic_loss(policy, None, scores, **(REFA_DEFAULTS | overrides))


def refa_direct(policy: GroupStats, scores: torch.Tensor, **overrides) -> list[float]:
    """Eq. 34 literally, python loops: -log(A / (A + gamma B)) + lam sum P(EOS); 0 if invalid."""
    hp = REFA_DEFAULTS | overrides
    logps, lengths = policy.logps.tolist(), policy.lengths.tolist()
    eos, has_eos, mask = policy.eos_logps.tolist(), policy.has_eos.tolist(), policy.mask.tolist()
    out = []
    for b, row in enumerate(scores.tolist()):
        real = [k for k in range(len(row)) if mask[b][k]]
        r = {k: row[k] for k in real}
        if len(real) < 2 or max(r.values()) == min(r.values()):
            out.append(0.0)
            continue
        r_bar = sum(r.values()) / len(real)
        a_sum = b_sum = reg = 0.0
        for k in real:
            ell = logps[b][k] / lengths[b][k] if hp["length_normalize"] else logps[b][k]
            dev = r[k] - r_bar
            ds = dev ** hp["p"] if hp["deviation"] == "signed" else abs(dev) ** hp["p"]
            e = math.exp(hp["beta"] * (ell + hp["alpha"] * ds))
            if r[k] > r_bar:
                a_sum += e
            else:
                b_sum += e
            if has_eos[b][k]:
                reg += hp["lam"] * math.exp(eos[b][k])
        out.append(-math.log(a_sum / (a_sum + hp["gamma"] * b_sum)) + reg)
    return out


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------

# Groups: two ordered pairs, one tie (invalid), one reversed pair (invalid for pairwise losses).
DPO_POLICY = [[-10.0, -12.0], [-20.0, -15.0], [-5.0, -6.0], [-7.0, -9.0]]
DPO_REF = [[-11.0, -11.5], [-19.0, -17.0], [-5.5, -5.0], [-7.5, -8.0]]
PAIR_SCORES = [[8.0, 3.0], [0.9, 0.2], [5.0, 5.0], [1.0, 4.0]]
PAIR_VALID = [True, True, False, False]


def dpo_margins(beta: float) -> list[float]:
    return [
        beta * ((pw - rw) - (pl - rl))
        for (pw, pl), (rw, rl) in zip(DPO_POLICY, DPO_REF, strict=True)
    ]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_hand_value(label_smoothing):
    beta, eps = 0.1, label_smoothing
    # Group 0 by hand: 0.1 * ((-10 + 11) - (-12 + 11.5)) = 0.15.
    assert math.isclose(dpo_margins(beta)[0], 0.15)
    expected = [
        ((1 - eps) * neg_log_sigmoid(m) + eps * neg_log_sigmoid(-m)) if v else 0.0
        for m, v in zip(dpo_margins(beta), PAIR_VALID, strict=True)
    ]
    out = dpo_loss(
        stats(DPO_POLICY), stats(DPO_REF), t(PAIR_SCORES), beta=beta, label_smoothing=eps
    )
    assert out.valid.tolist() == PAIR_VALID
    assert_close(out.losses, t(expected), **TOL)
    # Implicit rewards beta * (log pi - log pi_ref) of the chosen / rejected responses.
    assert_close(out.metrics["rewards/chosen"][0].item(), 0.1 * 1.0, rtol=1e-6, atol=1e-7)
    assert_close(out.metrics["rewards/rejected"][0].item(), 0.1 * -0.5, rtol=1e-6, atol=1e-7)


def test_dpo_label_smoothing_changes_the_loss():
    kw = dict(beta=0.1)
    plain = dpo_loss(stats(DPO_POLICY), stats(DPO_REF), t(PAIR_SCORES), label_smoothing=0.0, **kw)
    smooth = dpo_loss(stats(DPO_POLICY), stats(DPO_REF), t(PAIR_SCORES), label_smoothing=0.3, **kw)
    assert (smooth.losses[:2] - plain.losses[:2]).abs().min() > 1e-3
    # eps = 0.5 makes the loss symmetric in the margin: log 2 + margin^2 / 8 + ..., minimum log 2.
    half = dpo_loss(stats(DPO_POLICY), stats(DPO_REF), t(PAIR_SCORES), label_smoothing=0.5, **kw)
    assert (half.losses[:2] >= math.log(2)).all()


def test_dpo_gradient_signs_and_invalid_groups():
    policy = stats(DPO_POLICY, grad=True)
    out = dpo_loss(policy, stats(DPO_REF), t(PAIR_SCORES), beta=0.1, label_smoothing=0.0)
    out.losses.sum().backward()
    grad = policy.logps.grad
    assert (grad[:2, 0] < 0).all() and (grad[:2, 1] > 0).all()
    # Tie and reversed pair: invalid, loss exactly 0, no gradient.
    assert_close(out.losses[2:], torch.zeros(2, dtype=F64), rtol=0, atol=0)
    assert_close(grad[2:], torch.zeros(2, 2, dtype=F64), rtol=0, atol=0)
    assert_detached_metrics(out, 4)


# ----------------------------------------------------------------------------------------------
# SimPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_hand_value(label_smoothing):
    logps = [[-6.0, -30.0], [-10.0, -4.0], [-3.0, -3.0], [-1.0, -9.0]]
    lengths = [[4, 10], [5, 8], [3, 3], [1, 3]]
    beta, gamma, eps = 2.0, 1.0, label_smoothing
    # Group 0 by hand: 2 * (-6/4 - (-30/10)) - 1 = 2 * 1.5 - 1 = 2.
    margins = [
        beta * (w / lw - lo / ll) - gamma for (w, lo), (lw, ll) in zip(logps, lengths, strict=True)
    ]
    assert math.isclose(margins[0], 2.0)
    expected = [
        ((1 - eps) * neg_log_sigmoid(m) + eps * neg_log_sigmoid(-m)) if v else 0.0
        for m, v in zip(margins, PAIR_VALID, strict=True)
    ]
    out = simpo_loss(
        stats(logps, lengths), None, t(PAIR_SCORES), beta=beta, gamma=gamma, label_smoothing=eps
    )
    assert out.valid.tolist() == PAIR_VALID
    assert_close(out.losses, t(expected), **TOL)


def test_simpo_ignores_reference():
    policy, _ = random_stats(6, 2, seed=1)
    ref, _ = random_stats(6, 2, seed=2)
    scores = t([[3.0, 1.0], [2.0, 2.0], [0.0, 5.0], [9.0, 8.0], [4.0, 0.0], [7.0, 6.0]])
    kw = dict(beta=2.0, gamma=0.5, label_smoothing=0.0)
    a = simpo_loss(policy, None, scores, **kw)
    b = simpo_loss(policy, ref, scores, **kw)
    assert_close(a.losses, b.losses, rtol=0, atol=0)
    assert torch.equal(a.valid, b.valid)
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert_close(a.metrics[key], b.metrics[key], rtol=0, atol=0)


def test_simpo_gradient_signs():
    policy, _ = random_stats(5, 2, seed=3, grad=True)
    scores = t([[3.0, 1.0]] * 5)
    out = simpo_loss(policy, None, scores, beta=2.0, gamma=1.0, label_smoothing=0.0)
    out.losses.sum().backward()
    assert (policy.logps.grad[:, 0] < 0).all() and (policy.logps.grad[:, 1] > 0).all()
    assert_detached_metrics(out, 5)


# ----------------------------------------------------------------------------------------------
# REFA-dynamic (Eq. 34)
# ----------------------------------------------------------------------------------------------


def refa_batch(seed: int) -> tuple[GroupStats, torch.Tensor]:
    """Random K = 4 batch plus edge groups: padded slots with garbage, ties with the mean,
    all-equal scores, a single real response, truncated responses."""
    policy, scores = random_stats(8, 4, seed=seed)
    logps, lengths, eos, has_eos, mask = (x.clone() for x in policy)
    scores[0] = t([9.0, 8.0, 4.0, 1.0])
    scores[1] = t([1.0, 2.0, 3.0, 0.0])  # mean 1.5 over the 3 real slots: 2, 3 positive
    mask[1, 3] = False
    scores[2] = t([1.0, 2.0, 3.0, 2.0])  # mean 2: the two 2s tie with the mean (negative)
    scores[3] = t([6.0, 6.0, 6.0, 6.0])  # all equal: invalid
    mask[4, 1:] = False  # one real response: invalid
    mask[5, 2:] = False  # K = 2 group
    scores[5, :2] = t([3.0, 7.0])
    has_eos[6] = t([False, True, False, True]).bool()
    # Garbage in padded slots must not leak into anything.
    logps = torch.where(mask, logps, torch.full_like(logps, 50.0))
    scores = torch.where(mask, scores, torch.full_like(scores, 100.0))
    eos = torch.where(mask, eos, torch.zeros_like(eos))
    has_eos = has_eos | ~mask
    lengths = torch.where(mask, lengths, torch.ones_like(lengths))
    return stats(logps, lengths, eos, has_eos, mask), scores


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize(("p", "deviation"), [(1.0, "signed"), (1.0, "abs"), (2.0, "signed")])
def test_refa_matches_direct_eq34(p, deviation, length_normalize):
    policy, scores = refa_batch(seed=10)
    policy = stats(*policy, grad=True)  # so that the metrics check below can fail
    hp = dict(
        beta=2.5 if length_normalize else 0.2,
        gamma=0.8,
        alpha=0.3,
        p=p,
        deviation=deviation,
        lam=0.1,
        length_normalize=length_normalize,
    )
    out = refa(policy, scores, **hp)
    assert out.valid.tolist()[:6] == [True, True, True, False, False, True]
    assert_close(out.losses, t(refa_direct(policy, scores, **hp)), **TOL)
    assert_detached_metrics(out, 8)


def test_refa_positive_count_metric():
    policy, scores = refa_batch(seed=11)
    out = refa(policy, scores)
    # Group 0: (9, 8, 4, 1) mean 5.5; group 1: (1, 2, 3) mean 2; group 2: (1, 2, 3, 2) mean 2.
    assert out.metrics["refa/positives"][:3].tolist() == [2.0, 1.0, 1.0]


def test_refa_simpo_limit():
    policy, _ = random_stats(6, 2, seed=20)
    scores = t([[7.0, 2.0], [5.0, 4.0], [1.0, 0.0], [10.0, 3.0], [6.0, 5.5], [3.0, 1.0]])
    beta = 2.5
    out = refa(policy, scores, alpha=0.0, gamma=1.0, lam=0.0, beta=beta)
    avg = policy.avg_logps.tolist()
    expected = [neg_log_sigmoid(beta * (w - lo)) for w, lo in avg]
    assert_close(out.losses, t(expected), **TOL)
    simpo = simpo_loss(policy, None, scores, beta=beta, gamma=0.0, label_smoothing=0.0)
    assert_close(out.losses, simpo.losses, **TOL)
    # The winner is chosen by score, not by column.
    swapped = refa(
        GroupStats(*(x.flip(-1) for x in policy)),
        scores.flip(-1),
        alpha=0.0,
        gamma=1.0,
        lam=0.0,
        beta=beta,
    )
    assert_close(swapped.losses, out.losses, **TOL)


@pytest.mark.parametrize("gamma", [0.7, 1.0, 1.4])
def test_refa_pairwise_p1(gamma):
    policy, _ = random_stats(5, 2, seed=21)
    scores = t([[7.0, 2.0], [5.0, 4.0], [0.0, 9.0], [10.0, 3.0], [6.0, 5.5]])
    beta, alpha = 2.0, 0.4
    out = refa(policy, scores, beta=beta, alpha=alpha, gamma=gamma, p=1.0, lam=0.0)
    expected = []
    for (a0, a1), (r0, r1) in zip(policy.avg_logps.tolist(), scores.tolist(), strict=True):
        (lw, rw), (ll, rl) = ((a0, r0), (a1, r1)) if r0 > r1 else ((a1, r1), (a0, r0))
        expected.append(
            neg_log_sigmoid(beta * (lw - ll) + alpha * beta * (rw - rl) - math.log(gamma))
        )
    assert_close(out.losses, t(expected), **TOL)


@pytest.mark.parametrize("gamma", [0.7, 1.0, 1.4])
def test_refa_pairwise_p2_weights_cancel(gamma):
    policy, _ = random_stats(5, 2, seed=22)
    scores = t([[7.0, 2.0], [5.0, 4.0], [9.0, 0.0], [10.0, 3.0], [6.0, 5.5]])
    beta = 2.0
    out = refa(policy, scores, beta=beta, alpha=0.9, gamma=gamma, p=2.0, lam=0.0)
    expected = [
        neg_log_sigmoid(beta * (w - lo) - math.log(gamma)) for w, lo in policy.avg_logps.tolist()
    ]
    assert_close(out.losses, t(expected), **TOL)
    simpo = simpo_loss(policy, None, scores, beta=beta, gamma=math.log(gamma), label_smoothing=0.0)
    assert_close(out.losses, simpo.losses, **TOL)


def test_refa_nonnegative_and_vanishes_without_negative_mass():
    policy, scores = refa_batch(seed=23)
    out = refa(policy, scores, lam=0.0, gamma=1.3)
    assert (out.losses >= 0).all()
    assert (out.losses[out.valid] > 0).all()
    r_bar = (scores * policy.mask).sum(-1, keepdim=True) / policy.mask.sum(-1, keepdim=True)
    neg = policy.mask & (scores <= r_bar)
    previous = out.losses[out.valid]
    for shift in (-2.0, -5.0, -20.0):
        logps = policy.logps + shift * policy.lengths * neg  # avg logp of negatives + shift
        current = refa(policy._replace(logps=logps), scores, lam=0.0, gamma=1.3).losses[out.valid]
        assert (current < previous).all()
        previous = current
    logps = policy.logps - 1e3 * policy.lengths * neg
    far = refa(policy._replace(logps=logps), scores, lam=0.0, gamma=1.3)
    assert far.losses.max() < 1e-12


def test_refa_gamma_zero():
    policy, scores = refa_batch(seed=24)
    policy = stats(*policy, grad=True)
    out = refa(policy, scores, gamma=0.0, lam=0.2)
    assert_close(out.metrics["refa/contrastive"], torch.zeros(8, dtype=F64), rtol=0, atol=0)
    assert_close(
        out.losses, torch.where(out.valid, eos_regularizer(policy, 0.2), 0.0), rtol=0, atol=1e-15
    )
    out.losses.sum().backward()
    assert_close(policy.logps.grad, torch.zeros(8, 4, dtype=F64), rtol=0, atol=0)


def test_refa_all_equal_scores_invalid_with_finite_gradients():
    policy, scores = refa_batch(seed=25)
    scores[0] = t([4.0, 4.0, 4.0, 4.0])
    scores[1, :3] = t([2.5, 2.5, 2.5])  # padded slot 3 holds 100
    policy = stats(*policy, grad=True)
    out = refa(policy, scores, lam=0.1)
    assert out.valid[:4].tolist() == [False, False, True, False]
    assert_close(
        out.losses[~out.valid], torch.zeros(int((~out.valid).sum()), dtype=F64), rtol=0, atol=0
    )
    assert torch.isfinite(out.losses).all()
    # The loop's batch mean over valid groups.
    (out.losses[out.valid].sum() / out.valid.sum()).backward()
    for grad in (policy.logps.grad, policy.eos_logps.grad):
        assert torch.isfinite(grad).all()
        assert_close(grad[~out.valid], torch.zeros_like(grad[~out.valid]), rtol=0, atol=0)
    # K = 2 with tied rewards is the same case.
    pair, _ = random_stats(2, 2, seed=26, grad=True)
    tied = refa(pair, t([[3.0, 3.0], [1.0, 1.0]]), lam=0.1)
    assert not tied.valid.any()
    tied.losses.sum().backward()
    assert torch.isfinite(pair.logps.grad).all() and torch.isfinite(pair.eos_logps.grad).all()


def test_padding_with_neg_inf_stays_finite():
    """Empty slots filled with -inf (instead of the 0 of prefopt/model/logprobs.py) leak neither
    into values nor gradients, even for a group with no real response at all."""
    ninf = float("-inf")
    logps = [[-3.0, -6.0, ninf], [ninf, ninf, ninf], [-2.0, -2.0, ninf]]
    eos = [[-0.5, -1.0, ninf], [ninf, ninf, ninf], [-0.3, -0.3, ninf]]
    mask = [[True, True, False], [False, False, False], [True, True, False]]
    policy = stats(logps, None, eos, None, mask, grad=True)
    scores = t([[5.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 0.0]])
    out = refa(policy, scores, lam=0.1)
    assert out.valid.tolist() == [True, False, False]
    direct = refa_direct(stats(logps[:1], None, eos[:1], None, mask[:1]), scores[:1], lam=0.1)
    assert_close(out.losses, t([direct[0], 0.0, 0.0]), **TOL)
    out.losses.sum().backward()
    assert torch.isfinite(policy.logps.grad).all() and torch.isfinite(policy.eos_logps.grad).all()


@pytest.mark.parametrize(("p", "deviation"), [(1.0, "signed"), (1.0, "abs"), (2.0, "signed")])
def test_refa_shift_invariance(p, deviation):
    policy, scores = refa_batch(seed=27)
    hp = dict(p=p, deviation=deviation, lam=0.1, gamma=0.9)
    base = refa(policy, scores, **hp)
    # One shift per group; dyadic so that shifted scores tie with the shifted mean exactly.
    c = t([0.75, -1.25, 2.0, 0.125, -0.5, 3.0, -2.25, 0.5])[:, None]
    shifted = refa(policy._replace(logps=policy.logps + c * policy.lengths), scores, **hp)
    assert_close(shifted.losses, base.losses, rtol=1e-9, atol=1e-12)
    moved = refa(policy, scores + c, **hp)
    assert_close(moved.losses, base.losses, rtol=1e-9, atol=1e-12)
    # Gradients w.r.t. the average logps sum to zero over each group.
    unit = stats(policy.avg_logps, None, policy.eos_logps, policy.has_eos, policy.mask, grad=True)
    refa(unit, scores, **hp).losses.sum().backward()
    assert unit.logps.grad[base.valid].abs().max() > 1e-3
    assert_close(unit.logps.grad.sum(-1), torch.zeros(8, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_refa_reward_scaling_rescales_alpha(p):
    policy, scores = refa_batch(seed=28)
    a = 3.0
    scaled = refa(policy, scores * a, p=p, alpha=0.2)
    rescaled = refa(policy, scores, p=p, alpha=0.2 * a**p)
    assert_close(scaled.losses, rescaled.losses, **TOL)


def test_refa_gradient_formula():
    policy, scores = refa_batch(seed=29)
    unit = stats(policy.avg_logps, None, policy.eos_logps, policy.has_eos, policy.mask, grad=True)
    beta, gamma, alpha, p = 2.0, 1.2, 0.4, 2.0
    out = refa(unit, scores, beta=beta, gamma=gamma, alpha=alpha, p=p, lam=0.0)
    out.losses.sum().backward()
    grad = unit.logps.grad
    expected = torch.zeros(8, 4, dtype=F64)
    ell, mask = unit.logps.tolist(), unit.mask.tolist()
    for b, row in enumerate(scores.tolist()):
        if not out.valid[b]:
            continue
        real = [k for k in range(4) if mask[b][k]]
        r_bar = sum(row[k] for k in real) / len(real)
        pos = {k: row[k] > r_bar for k in real}
        ez = {k: math.exp(beta * (ell[b][k] + alpha * (row[k] - r_bar) ** p)) for k in real}
        a_sum = sum(ez[k] for k in real if pos[k])
        b_sum = sum(ez[k] for k in real if not pos[k])
        for k in real:
            q = (1.0 if pos[k] else gamma) * ez[k] / (a_sum + gamma * b_sum)
            p_pos = ez[k] / a_sum if pos[k] else 0.0
            expected[b, k] = beta * (q - p_pos)
    assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    r_bar = (scores * unit.mask).sum(-1, keepdim=True) / unit.mask.sum(-1, keepdim=True)
    is_pos = unit.mask & (scores > r_bar) & out.valid[:, None]
    is_neg = unit.mask & (scores <= r_bar) & out.valid[:, None]
    assert (grad[is_pos] <= 0).all() and (grad[is_neg] >= 0).all()
    assert (grad[~unit.mask] == 0).all()


def test_refa_deviation_readings():
    policy, scores = refa_batch(seed=30)
    signed = refa(policy, scores, p=2.0, deviation="signed")
    absolute = refa(policy, scores, p=2.0, deviation="abs")
    assert_close(signed.losses, absolute.losses, **TOL)
    # r = (9, 8, 4, 1): negatives deviate by -1.5 and -4.5, so the p = 1 readings differ.
    group = stats([[-1.0, -1.5, -0.8, -1.2]])
    r = t([[9.0, 8.0, 4.0, 1.0]])
    s1 = refa(group, r, p=1.0, deviation="signed").losses
    a1 = refa(group, r, p=1.0, deviation="abs").losses
    assert (s1 - a1).abs().item() > 1e-2
    assert_close(
        score_deviation(r, torch.ones(1, 4, dtype=torch.bool), 1.0, "signed"),
        t([[3.5, 2.5, -1.5, -4.5]]),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="deviation"):
        score_deviation(r, torch.ones(1, 4, dtype=torch.bool), 1.0, "squared")
    # K = 2 and p = 1 with |.|: both deviations equal |dr| / 2, the weights cancel (as for p = 2).
    pair, _ = random_stats(4, 2, seed=31)
    pr = t([[7.0, 2.0], [0.0, 9.0], [5.0, 4.0], [6.0, 1.0]])
    out = refa(pair, pr, p=1.0, deviation="abs", alpha=0.7, gamma=1.2, beta=2.0)
    expected = [
        neg_log_sigmoid(2.0 * ((x0 - x1) if r0 > r1 else (x1 - x0)) - math.log(1.2))
        for (x0, x1), (r0, r1) in zip(pair.avg_logps.tolist(), pr.tolist(), strict=True)
    ]
    assert_close(out.losses, t(expected), **TOL)


def test_refa_eos_regularizer():
    eos = [[-0.1, -2.0, -5.0, -0.5], [-1.0, -0.2, -3.0, -0.7]]
    has_eos = [[True, True, False, True], [True, True, True, True]]
    mask = [[True, True, True, True], [True, True, True, False]]
    policy = stats([[-1.0] * 4] * 2, None, eos, has_eos, mask, grad=True)
    lam = 0.3
    reg = eos_regularizer(policy, lam)
    # Truncated (0, 2) and padded (1, 3) slots are excluded; no division by K.
    expected = [
        lam * (math.exp(-0.1) + math.exp(-2.0) + math.exp(-0.5)),
        lam * (math.exp(-1.0) + math.exp(-0.2) + math.exp(-3.0)),
    ]
    assert_close(reg, t(expected), **TOL)
    assert (reg >= 0).all()
    reg.sum().backward()
    keep = policy.mask & policy.has_eos
    expected_grad = torch.where(keep, lam * policy.eos_logps.detach().exp(), 0.0)
    assert_close(policy.eos_logps.grad, expected_grad, **TOL)


def test_refa_regularizer_in_loss_independent_of_rewards():
    policy, scores = refa_batch(seed=32)
    other = scores.clone()
    other[:3] = t([[1.0, 2.0, 9.0, 0.0], [9.0, 0.0, 4.0, 100.0], [3.0, 3.0, 0.0, 8.0]])
    lam = 0.25
    for s in (scores, other):
        with_r = refa(policy, s, lam=lam)
        without = refa(policy, s, lam=0.0)
        assert torch.equal(with_r.valid, without.valid)
        expected = torch.where(with_r.valid, t(refa_direct(policy, s, lam=lam)), 0.0)
        expected = expected - t(refa_direct(policy, s, lam=0.0))
        assert_close(with_r.losses - without.losses, expected, **TOL)
        assert_close(with_r.metrics["refa/eos_reg"], eos_regularizer(policy, lam), **TOL)
    # Group 6 has truncated responses: only slots 1 and 3 contribute.
    keep = [1, 3]
    hand = lam * sum(math.exp(policy.eos_logps[6, k].item()) for k in keep)
    assert_close(eos_regularizer(policy, lam)[6].item(), hand, **TOL)


@pytest.mark.parametrize(
    ("p", "expected", "atol"),
    [
        (1.0, [-0.00752, -0.00277, 0.0098, 0.00049], 1e-5),
        (2.0, [-1.994, -0.005, 0.0, 1.999], 1e-3),
    ],
)
def test_refa_gradient_worked_example(p, expected, atol):
    """dL/dl for r = (9, 8, 4, 1), equal log-probs, beta 2, alpha 0.5, gamma 1: under p = 1 the
    worst response (r = 1) is pushed down 20 times less than r = 4 (the literal (r - r_bar)^p)."""
    group = stats([[-1.0, -1.0, -1.0, -1.0]], grad=True)
    out = refa(group, t([[9.0, 8.0, 4.0, 1.0]]), beta=2.0, alpha=0.5, gamma=1.0, lam=0.0, p=p)
    out.losses.sum().backward()
    assert_close(group.logps.grad, t([expected]), rtol=0, atol=atol)


def test_masked_slots_equal_smaller_k():
    policy4, scores4 = random_stats(2, 4, seed=40, grad=False)
    scores4 = t([[9.0, 3.0, 5.0, 1.0], [2.0, 7.0, 4.0, 0.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    logps = policy4.logps.clone()
    logps[1, 3] = 40.0  # garbage the mask must hide
    scores4[1, 3] = 50.0
    padded = stats(logps, policy4.lengths, policy4.eos_logps, policy4.has_eos, mask, grad=True)
    padded.lengths[1, 3] = 1.0
    hp = dict(lam=0.15, p=1.0, gamma=1.1)
    out4 = refa(padded, scores4, **hp)
    small = stats(
        logps[1:, :3],
        policy4.lengths[1:, :3],
        policy4.eos_logps[1:, :3],
        policy4.has_eos[1:, :3],
        grad=True,
    )
    out3 = refa(small, scores4[1:, :3], **hp)
    full = stats(logps[:1], policy4.lengths[:1], policy4.eos_logps[:1], policy4.has_eos[:1])
    assert_close(out4.losses[1:], out3.losses, **TOL)
    assert_close(out4.losses[:1], refa(full, scores4[:1], **hp).losses, **TOL)
    out4.losses.sum().backward()
    out3.losses.sum().backward()
    assert_close(padded.logps.grad[1, :3], small.logps.grad[0], **TOL)
    assert_close(padded.eos_logps.grad[1, :3], small.eos_logps.grad[0], **TOL)
    assert padded.logps.grad[1, 3] == 0 and padded.eos_logps.grad[1, 3] == 0


def test_length_normalize_false_uses_summed_logps():
    policy, scores = refa_batch(seed=41)
    hp = dict(beta=0.3, lam=0.05, p=1.0)
    base = refa(policy, scores, length_normalize=False, **hp)
    # Same as length-normalised loss with every length 1 (REFABASE-dynamic, Eq. 21) ...
    unit = policy._replace(lengths=torch.ones_like(policy.lengths))
    assert_close(base.losses, refa(unit, scores, length_normalize=True, **hp).losses, **TOL)
    # ... and different from the length-normalised loss on real lengths.
    normalised = refa(policy, scores, length_normalize=True, **hp)
    assert (base.losses - normalised.losses)[base.valid].abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_core_losses_registered():
    assert {"dpo", "simpo", "refa_dynamic"} <= set(LOSSES)
    assert LOSSES["dpo"].needs_reference and LOSSES["dpo"].k == 2
    assert not LOSSES["simpo"].needs_reference and LOSSES["simpo"].k == 2
    assert not LOSSES["refa_dynamic"].needs_reference and LOSSES["refa_dynamic"].k is None


def test_get_spec_unknown_lists_registered_names():
    with pytest.raises(KeyError, match="nope") as info:
        get_spec("nope")
    for name in LOSSES:
        assert name in str(info.value)


def capability_inputs(spec, cfg, B: int) -> dict:
    """The extra keyword inputs the loop passes for a loss's capabilities."""
    extra = {}
    if spec.state is not None:
        extra["state"] = spec.init_state(cfg)
    if "mismatched_kl" in spec.extras:
        extra["kl_estimate"] = torch.zeros((), dtype=F64)
    return extra


CONF_LOSS = Path(__file__).resolve().parents[1] / "conf" / "loss"
CAPABILITY_INPUTS = {"state", "kl_estimate"}  # passed by the loop, never from the config
# Config fields the loss function does not take: read by its extra (SPO's on_policy_kl) or by
# its state's init (alpha-DPO's and LMPO's stats_init).
READ_OUTSIDE_THE_FUNCTION = {
    "spo": {"kl_weight", "kl_every", "kl_num_samples", "kl_max_new_tokens"},
    "alpha_dpo": {"stats_init"},
    "lmpo": {"stats_init"},
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registry_yaml_dataclass_and_signature_agree(name):
    """conf/loss/<name>.yaml repeats its dataclass's defaults, and build_loss binds exactly the
    function's keyword-only hyperparameters with those values; the other fields are read by the
    loop (``name``), an extra (SPO's ``kl_*``) or the state (``stats_init``), and capability
    inputs match the registered capabilities."""
    spec = get_spec(name)
    defaults = {f.name: f.default for f in dataclasses.fields(spec.config_cls)}
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_LOSS / f"{name}.yaml"))
    assert yaml.pop("defaults") == [f"_schema_{name}"]
    assert yaml == defaults and defaults["name"] == name
    params = inspect.signature(spec.fn).parameters
    assert list(params)[:3] == ["policy", "ref", "scores"]
    keyword_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    hparams = keyword_only - CAPABILITY_INPUTS
    built, fn = build_loss(OmegaConf.structured(spec.config_cls))
    assert built is spec and fn.func is spec.fn and fn.args == ()
    assert fn.keywords == {k: defaults[k] for k in hparams}
    read_elsewhere = READ_OUTSIDE_THE_FUNCTION.get(name, set())
    assert set(defaults) - hparams == {"name"} | read_elsewhere
    assert ("state" in keyword_only) == (spec.state is not None)
    assert ("kl_estimate" in keyword_only) == ("mismatched_kl" in spec.extras)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_on_random_pairs(name):
    spec = get_spec(name)
    k = spec.k or 2
    B = 6
    _, fn = build_loss(OmegaConf.structured(spec.config_cls()))
    policy, _ = random_stats(B, k, seed=60, grad=True)
    ref = random_stats(B, k, seed=61)[0].detach() if spec.needs_reference else None
    scores = torch.arange(k, 0, -1, dtype=F64).repeat(B, 1)
    scores[1] = 2.0  # all tied: never a preference
    out = fn(policy, ref, scores, **capability_inputs(spec, spec.config_cls(), B))
    assert out.losses.shape == (B,) and out.valid.shape == (B,)
    assert out.valid.dtype == torch.bool
    assert torch.isfinite(out.losses).all()
    assert not out.valid[1] and out.valid[0]
    assert out.losses.requires_grad
    assert_detached_metrics(out, B)
    out.losses[out.valid].sum().backward()
    assert torch.isfinite(policy.logps.grad).all()
    assert policy.logps.grad[out.valid].abs().max() > 0
