# pytest -m gpu tests/gpu/test_fsdp_bf16.py -q      (skipped without CUDA)
"""A bf16 FSDP2 step on one GPU updates fp32 master weights.

The contract of the scale recipe: the trainable weights are sharded in fp32 (the optimizer's
copy) whatever ``model.dtype`` says on disk, compute runs in bf16 through
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``. At lr 5e-7 an Adam step moves
every weight with a gradient by ~5e-7, far below bf16's resolution (~1e-4 at 0.02): a bf16
master would leave nearly all of them unchanged.
"""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.config import ModelConfig, TinyModelConfig
from prefopt.data.packing import collate_layout
from prefopt.losses import get_spec
from prefopt.model import parallel
from prefopt.model.load import load_model
from prefopt.train.step import LossContext, forward_loss

from .test_kernels import _groups

pytestmark = pytest.mark.gpu


def _changed_fraction(tok, make_optimizer, master: str = "float32") -> float:
    """Fraction of the sharded master weights one bf16 SimPO step at lr 5e-7 changes."""
    world = parallel.init_distributed("cuda")
    tiny = TinyModelConfig(
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=512,
        max_position_embeddings=4096,
    )
    cfg = ModelConfig(
        name_or_path="tiny",
        source="tiny",
        dtype="bfloat16",
        attn_implementation="auto",  # the recipe's: a FlashAttention varlen kernel on CUDA
        tiny=tiny,
    )
    hf = load_model(OmegaConf.structured(cfg), "/nonexistent", tok, seed=0)
    precision = parallel.resolve_precision(world.device, "bf16", master)
    policy = parallel.shard(hf, world, precision)
    params = list(policy.parameters())
    want = torch.float32 if master == "float32" else torch.bfloat16
    assert all(p.dtype == want for p in params), {p.dtype for p in params}
    before = [p.detach().clone() for p in params]
    spec = get_spec("simpo")
    loss_fn = functools.partial(spec.fn, **spec.hparams(spec.config_cls()))
    batch = collate_layout(_groups(8, seed=0), tok.pad_token_id, "shared").to(world.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = forward_loss(policy, None, batch, LossContext(spec, loss_fn, 1024))
    out.losses[out.valid].mean().backward()
    make_optimizer(params).step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before, strict=True))
    parallel.destroy()
    return changed / sum(p.numel() for p in params)


def test_bf16_step_moves_fp32_master_weights(tok):
    moved = _changed_fraction(tok, lambda ps: torch.optim.AdamW(ps, lr=5e-7, weight_decay=0.0))
    assert moved >= 0.99, f"{moved:.2%} of the weights moved"


def test_low_memory_optimizer_steps(tok):
    """conf/optimizer/adamw8bit.yaml (torchao's 8-bit AdamW, compiled on CUDA) on the sharded
    fp32 weights."""
    pytest.importorskip("torchao")
    from hydra.utils import instantiate

    cfg = OmegaConf.create(
        {
            "_target_": "torchao.optim.AdamW8bit",
            "_partial_": True,
            "lr": 5e-7,
            "betas": [0.9, 0.95],
            "weight_decay": 0.0,
        }
    )
    moved = _changed_fraction(tok, instantiate(cfg))
    assert moved >= 0.99, f"{moved:.2%} of the weights moved"


def test_bf16_stochastic_rounding_optimizer_steps_bf16_master_weights(tok):
    """conf/optimizer/adamw_bf16_sr.yaml on bf16 shards: unbiased rounding moves some weights
    every step (round-to-nearest would move almost none at lr 5e-7)."""
    pytest.importorskip("torchao")
    from prefopt.train.optim import adamw_bf16_sr

    def make(ps):
        return adamw_bf16_sr(ps, lr=5e-7, betas=[0.9, 0.95], weight_decay=0.0, eps=1e-8)

    moved = _changed_fraction(tok, make, master="bfloat16")
    assert 0.0 < moved < 0.5, f"{moved:.2%} of the weights moved"
