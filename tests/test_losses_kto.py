# .venv/bin/pytest tests/test_losses_kto.py -q
"""KTO: hand-computed values, the KL baseline, labels from scores, mismatched pairs."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import sigmoid, stats

from prefopt.losses.kto import kto_loss
from prefopt.train.extras import StepRows
from prefopt.train.extras.mismatched_kl import mismatched_pairs

KW = dict(beta=0.5, lambda_d=1.0, lambda_u=2.0, labels="best_worst")


def test_value_by_hand_best_worst():
    pol, ref = stats([[-3.0, -5.0, -4.0]], grad=True), stats([[-4.0, -4.0, -4.0]])
    scores = torch.tensor([[9.0, 1.0, 5.0]])
    mism = torch.tensor(0.6, dtype=torch.float64)  # the step's mean log-ratio -> z0 = 0.6
    out = kto_loss(pol, ref, scores, kl_estimate=mism, **KW)
    r_d, r_u, z0 = 1.0, -1.0, 0.6  # rewards of best (slot 0) and worst (slot 1)
    by_hand = (
        (1.0 - 1.0 * sigmoid(0.5 * (r_d - z0))) + (2.0 - 2.0 * sigmoid(0.5 * (z0 - r_u)))
    ) / 2
    assert out.losses.item() == pytest.approx(by_hand, rel=1e-12)
    assert out.metrics["kto/z0"].item() == pytest.approx(0.6)
    out.losses.sum().backward()
    g = pol.logps.grad[0]
    assert g[0] < 0 and g[1] > 0 and g[2] == 0  # desirable up, undesirable down, middle unused


def test_kl_baseline_is_clamped_at_zero_and_detached():
    pol, ref = stats([[-3.0, -5.0]], grad=True), stats([[-4.0, -4.0]])
    mism = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    out = kto_loss(pol, ref, torch.tensor([[1.0, 0.0]]), kl_estimate=mism, **KW)
    assert out.metrics["kto/z0"].item() == 0.0
    out.losses.sum().backward()
    assert mism.grad is None or torch.all(mism.grad == 0)


def test_mean_split_labels_and_tied_group_is_invalid():
    pol = stats([[-3.0, -5.0, -4.0, -1.0], [-1.0, -1.0, -1.0, -1.0]], grad=True)
    ref = stats([[-4.0] * 4] * 2)
    scores = torch.tensor([[9.0, 1.0, 5.0, 6.0], [3.0, 3.0, 3.0, 3.0]])
    mism = torch.zeros((), dtype=torch.float64)
    out = kto_loss(pol, ref, scores, kl_estimate=mism, **{**KW, "labels": "mean_split"})
    assert out.valid.tolist() == [True, False] and out.losses[1] == 0
    # mean 5.25: slots 0 and 3 desirable, 1 and 2 undesirable
    rs = [1.0, -1.0, 0.0, 3.0]
    terms = [
        1 - sigmoid(0.5 * rs[0]),
        2 - 2 * sigmoid(-0.5 * rs[1]),
        2 - 2 * sigmoid(-0.5 * rs[2]),
        1 - sigmoid(0.5 * rs[3]),
    ]
    assert out.losses[0].item() == pytest.approx(sum(terms) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="labels"):
        kto_loss(pol, ref, scores, kl_estimate=mism, **{**KW, "labels": "x"})


def test_mismatched_pairs_take_the_next_view_of_the_step_cyclically():
    import datasets

    rows = [
        {
            "prompt_ids": [1, 10],
            "response_ids": [[20, 3], [21, 3]],
            "has_eos": [True, True],
            "scores": [1.0, 0.0],
        },
        {
            "prompt_ids": [1, 11, 12],
            "response_ids": [[22, 23, 3], [24, 3]],
            "has_eos": [True, True],
            "scores": [0.0, 1.0],
        },
        {
            "prompt_ids": [1, 13],
            "response_ids": [[25, 3], [26]],
            "has_eos": [True, False],
            "scores": [1.0, 0.0],
        },
    ]
    data = datasets.Dataset.from_list(rows)
    views = [(0, (0, 1)), (1, (1, 0)), (2, (1, 0))]
    pairs = mismatched_pairs(StepRows(data, views, [2, 0, 1]))  # the step's order: views 2, 0, 1
    got = [(g.prompt_ids, g.response_ids[0], g.has_eos[0]) for g, _ in pairs]
    assert got == [([1, 13], [20, 3], True), ([1, 10], [24, 3], True), ([1, 11, 12], [26], False)]
    assert [idx for _, idx in pairs] == [(0,), (0,), (0,)]
