# .venv/bin/pytest tests/test_losses_kto.py -q
"""KTO: hand-computed values, the KL baseline, labels from scores, mismatched rows."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import sigmoid, stats

from prefopt.data.collate import collate
from prefopt.data.tokenize import TokenizedGroup
from prefopt.losses.kto import kto_loss

KW = dict(beta=0.5, lambda_d=1.0, lambda_u=2.0, labels="best_worst")


def test_value_by_hand_best_worst():
    pol, ref = stats([[-3.0, -5.0, -4.0]], grad=True), stats([[-4.0, -4.0, -4.0]])
    scores = torch.tensor([[9.0, 1.0, 5.0]])
    mism = torch.tensor([[0.4], [0.8]], dtype=torch.float64)  # mean 0.6 -> z0 = 0.6
    out = kto_loss(pol, ref, scores, mismatched_log_ratio=mism, **KW)
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
    mism = torch.tensor([[-2.0]], dtype=torch.float64, requires_grad=True)
    out = kto_loss(pol, ref, torch.tensor([[1.0, 0.0]]), mismatched_log_ratio=mism, **KW)
    assert out.metrics["kto/z0"].item() == 0.0
    out.losses.sum().backward()
    assert mism.grad is None or torch.all(mism.grad == 0)


def test_mean_split_labels_and_tied_group_is_invalid():
    pol = stats([[-3.0, -5.0, -4.0, -1.0], [-1.0, -1.0, -1.0, -1.0]], grad=True)
    ref = stats([[-4.0] * 4] * 2)
    scores = torch.tensor([[9.0, 1.0, 5.0, 6.0], [3.0, 3.0, 3.0, 3.0]])
    mism = torch.zeros(2, 1, dtype=torch.float64)
    out = kto_loss(pol, ref, scores, mismatched_log_ratio=mism, **{**KW, "labels": "mean_split"})
    assert out.valid.tolist() == [True, False] and out.losses[1] == 0
    # mean 5.25: slots 0 and 3 desirable, 1 and 2 undesirable
    rs = [1.0, -1.0, 0.0, 3.0]
    terms = [1 - sigmoid(0.5 * rs[0]), 2 - 2 * sigmoid(-0.5 * rs[1]), 2 - 2 * sigmoid(-0.5 * rs[2]),
             1 - sigmoid(0.5 * rs[3])]  # fmt: skip
    assert out.losses[0].item() == pytest.approx(sum(terms) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="labels"):
        kto_loss(pol, ref, scores, mismatched_log_ratio=mism, **{**KW, "labels": "x"})


def test_collate_builds_mismatched_rows_from_the_next_group():
    g1 = TokenizedGroup([1, 10], [[20, 3], [21, 3]], [True, True], [1.0, 0.0])
    g2 = TokenizedGroup([1, 11, 12], [[22, 23, 3], [24, 3]], [True, True], [0.0, 1.0])
    b = collate([(g1, (0, 1)), (g2, (1, 0))], pad_id=0, mismatched=True)
    m = b.mismatched
    assert m.input_ids[0, :5].tolist() == [1, 10, 24, 3, 0]  # prompt 1 + first view slot of g2
    assert m.input_ids[1].tolist() == [1, 11, 12, 20, 3]  # prompt 2 + first view slot of g1
    assert m.mask.tolist() == [[True], [True]]
