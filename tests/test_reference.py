# .venv/bin/pytest tests/test_reference.py -q
"""trainer.reference=precompute gives the same training as a frozen reference model in the loop."""

from __future__ import annotations

import json

import torch
from conftest import checkpoint_weights
from test_train import _cfg, _metrics

from prefopt.train.loop import run


def test_precomputed_reference_equals_reference_model(tmp_path, tiny_data):
    common = ("loss=dpo", "trainer.max_steps=3", "optimizer.lr=1e-3")
    run(_cfg(tmp_path / "model", tiny_data, *common))
    run(_cfg(tmp_path / "pre", tiny_data, *common, "trainer.reference=precompute"))
    a, b = checkpoint_weights(tmp_path / "model", 3), checkpoint_weights(tmp_path / "pre", 3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    la = [m["train/loss"] for m in _metrics(tmp_path / "model") if "train/loss" in m]
    lb = [m["train/loss"] for m in _metrics(tmp_path / "pre") if "train/loss" in m]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)
    entries = list((tmp_path / "cache" / "reference").iterdir())
    assert len(entries) == 2  # train and eval splits


def test_reference_cache_is_keyed_by_model_and_data(tmp_path, tiny_data):
    pre = ("loss=dpo", "trainer.max_steps=1", "trainer.reference=precompute")
    run(_cfg(tmp_path / "a", tiny_data, *pre))
    run(_cfg(tmp_path / "b", tiny_data, *pre))  # same model + data: reused
    root = tmp_path / "cache" / "reference"
    assert len(list(root.iterdir())) == 2
    run(_cfg(tmp_path / "c", tiny_data, *pre, "seed=1"))  # other starting weights
    assert len(list(root.iterdir())) == 4
    rows = [json.loads(x) for x in tiny_data[0].read_text().splitlines()]
    rows[0]["responses"][0] = "changed"
    tiny_data[0].write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(_cfg(tmp_path / "d", tiny_data, *pre))  # other data: the train split is recomputed
    assert len(list(root.iterdir())) == 5
