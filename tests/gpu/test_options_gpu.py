# pytest -m gpu tests/gpu/test_options_gpu.py -q      (skipped without CUDA)
"""QLoRA through the entry point: ``model.quantize`` (bitsandbytes 4-bit NF4 and 8-bit, CUDA only)
under LoRA adapters trains 3 steps of ``python -m prefopt.train`` (in-process), and the adapters
move. The CPU options are covered in tests/test_options.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checkpoint_weights
from doc_commands import run_module
from omegaconf import OmegaConf

from prefopt.config import ModelConfig
from prefopt.model.load import load_model, tiny_tokenizer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_through_the_entry_point(tmp_path, tiny_data, monkeypatch, bits):
    saved = tmp_path / "tiny"  # quantization happens in from_pretrained: a saved model
    tok = tiny_tokenizer()
    cfg = OmegaConf.structured(ModelConfig(name_or_path="tiny", source="tiny"))
    load_model(cfg, "", tok, seed=0).to(torch.bfloat16).save_pretrained(saved)
    tok.save_pretrained(saved)
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    args = [
        "model=checkpoint",
        f"model.name_or_path={saved}",
        "+model/lora=default",
        f"model.quantize={bits}",
        "trainer=debug",
        "loss=dpo",
        "optimizer.lr=1e-3",
        f"dataset.path={tiny_data[0]}",
        f"dataset.eval_path={tiny_data[1]}",
    ]
    result = run_module("prefopt.train", args, tmp_path)
    assert result.code == 0, result.out[-3000:]
    run_dir = next((tmp_path / "outputs").rglob("summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    b = [v for k, v in checkpoint_weights(run_dir, 3).items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)
