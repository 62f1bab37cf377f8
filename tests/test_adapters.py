# OMP_NUM_THREADS=1 python -m pytest tests/test_adapters.py -q   (+ -m distributed / slow / gpu)
"""LoRA / QLoRA (prefopt/model/adapters.py): only adapters train, the reference is the base model
(adapters off), adapter-only checkpoints resume exactly, 2 ranks = 1 process, the merged export
reproduces the adapted model, and QLoRA fails clearly without CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_train import _cfg as train_cfg

from prefopt.checks import validate
from prefopt.config import LoraConfig
from prefopt.data.loading import group_at
from prefopt.data.packing import collate_layout
from prefopt.errors import ConfigError
from prefopt.losses import LOSSES, build_loss
from prefopt.model import adapters, parallel
from prefopt.model.load import load_model, load_tokenizer
from prefopt.model.logprobs import group_stats
from prefopt.train.loop import run
from prefopt.train.optim import build_optimizer
from prefopt.train.passes import PassOptions
from prefopt.train.setup import build_models, prepare_data
from prefopt.train.step import LossContext, StepContext, step_micro_batches, train_step

LORA = ("+model/lora=default", "model.lora.rank=4", "model.lora.alpha=8")


def _cfg(run_dir: Path, data: tuple[Path, Path], *overrides: str):
    return train_cfg(run_dir, data, "trainer.device=cpu", *overrides)


def _train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["train/loss"] for m in map(json.loads, lines) if "train/loss" in m]


def _full(policy) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize(("loss", "checkpointing"), [("dpo", True), ("refa_dynamic", False)])
def test_lora_trains_only_adapters_and_its_reference_is_the_base(
    tmp_path, tiny_data, loss, checkpointing
):
    cfg = _cfg(
        tmp_path / "run",
        tiny_data,
        *LORA,
        f"loss={loss}",
        "optimizer.lr=1e-2",
        f"model.gradient_checkpointing={checkpointing}",
        "model.lora.dropout=0.1",
    )
    world = parallel.init_distributed("cpu")
    spec, loss_fn = build_loss(cfg.loss)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    data = prepare_data(cfg, tok, spec)
    fp32 = parallel.resolve_precision(world.device, "fp32", "float32")
    passes = PassOptions(2, tok.pad_token_id, 1024, nullcontext())
    policy, ref, data = build_models(cfg, spec, tok, data, world, fp32, passes)
    assert (ref is not None) == spec.needs_reference  # never a second model
    if ref is not None:
        assert isinstance(ref, adapters.AdaptersOff) and ref.policy is policy
    info = adapters.summary(policy)
    # rank 4 on q, k, v, o (64x64, 32x64 k/v: 2 KV heads of 16) and gate, up, down (64 <-> 128),
    # 2 layers: r * (in + out) summed = 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 2
    assert info.trainable == 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 2 == 8192
    assert info.reference == "adapters off" and "8,192 trainable" in info.line()
    params = [p for p in policy.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == info.trainable
    optimizer = build_optimizer(cfg.optimizer, params)
    before = _full(policy)
    views = list(range(len(data.train_views)))
    for step in range(3):
        order = views[4 * step : 4 * step + 4]
        mbs = step_micro_batches(cfg.trainer, data, order, world, tok.pad_token_id)
        ctx = StepContext(
            LossContext(spec, loss_fn, 1024), nullcontext(), cfg.trainer.max_grad_norm
        )
        result = train_step(policy, ref, mbs, ctx)
        assert result.applied and result.metrics["grad_norm"] > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = _full(policy)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_B" in n or "lora_A" in n for n in moved)
    assert any("lora_B" in n for n in moved)  # B starts at 0: the policy has left the base

    # The reference (adapters off) is the untouched base model, in every layout and chunking.
    base = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed).eval()
    off = adapters.AdaptersOff(policy)
    policy.eval()
    groups = [(group_at(data.eval, row), idx) for row, idx in data.eval_views[:4]]
    for layout in ("padded", "packed", "shared"):
        batch = collate_layout(groups, tok.pad_token_id, layout)
        with torch.no_grad():
            want = group_stats(base, batch, chunk_size=3)
            got = off(batch, 3)
            adapted = policy(batch, 3)
        torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.eos_logps, want.eos_logps, rtol=1e-5, atol=1e-5)
        assert (adapted.logps - want.logps).abs().max() > 1e-3  # the adapters do change it
    assert all(p.requires_grad for p in params)  # switching adapters off left them trainable


def test_bf16_keeps_the_frozen_base_in_bf16_and_fp32_adapters(tmp_path, tiny_data):
    """One FSDP2 group per block holds both dtypes; bf16 compute, fp32 adapter gradients."""
    from prefopt.train.setup import make_autocast

    cfg = _cfg(tmp_path / "run", tiny_data, *LORA, "loss=dpo", "trainer.precision=bf16")
    world = parallel.init_distributed("cpu")
    spec, loss_fn = build_loss(cfg.loss)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    data = prepare_data(cfg, tok, spec)
    bf16 = parallel.resolve_precision(world.device, "bf16", "float32")
    autocast = make_autocast(bf16, world.device)
    passes = PassOptions(2, tok.pad_token_id, 1024, autocast)
    policy, ref, data = build_models(cfg, spec, tok, data, world, bf16, passes)
    dtypes = {(p.requires_grad, p.dtype) for p in policy.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    mbs = step_micro_batches(cfg.trainer, data, [0, 1, 2, 3], world, tok.pad_token_id)
    ctx = StepContext(LossContext(spec, loss_fn, 1024), autocast, cfg.trainer.max_grad_norm)
    result = train_step(policy, ref, mbs, ctx)
    assert result.applied and 0 < result.metrics["grad_norm"] < float("inf")
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_adapters_on_a_meta_model_are_initialised_after_sharding(tiny_data, tmp_path, tok):
    """The meta-device build path: adapters wrap the meta model, shard, allocate, then init."""
    cfg = _cfg(tmp_path / "run", tiny_data, *LORA)
    world = parallel.init_distributed("cpu")
    with torch.device("meta"):
        hf = adapters.apply_adapters(load_model(cfg.model, cfg.cache_dir, tok, 0), cfg.model, False)
    policy = parallel.shard(hf, world, parallel.resolve_precision(world.device, "fp32", "float32"))
    torch.manual_seed(0)
    adapters.reset_adapters(policy)
    full = _full(policy)
    a = [v for n, v in full.items() if "lora_A" in n]
    b = [v for n, v in full.items() if "lora_B" in n]
    assert len(a) == len(b) == 14
    assert all(torch.equal(v, torch.zeros_like(v)) for v in b)  # policy = base at step 0
    bound = 1 / a[0].shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), +)
    assert all(0 < v.abs().max() <= bound for v in a)


def test_spo_kl_and_precomputed_reference_with_lora(tmp_path, tiny_data):
    """SPO's KL reads the base through the adapters-off view; trainer.reference=precompute
    caches the base's log-probs. Both train."""
    spo = run(
        _cfg(
            tmp_path / "spo",
            tiny_data,
            *LORA,
            "loss=spo",
            "loss.kl_num_samples=2",
            "loss.kl_max_new_tokens=4",
            "loss.kl_every=1",
            "trainer.max_steps=2",
            "optimizer.lr=1e-2",
        )
    )
    lines = (tmp_path / "spo" / "metrics.jsonl").read_text().splitlines()
    kl = [m["train/regularizer"] for m in map(json.loads, lines) if "train/regularizer" in m]
    assert kl[0] == pytest.approx(0, abs=1e-6) and kl[1] > 0  # policy = base at step 1
    pre = run(
        _cfg(
            tmp_path / "pre",
            tiny_data,
            *LORA,
            "loss=dpo",
            "trainer.reference=precompute",
            "optimizer.lr=1e-2",
        )
    )
    live = run(_cfg(tmp_path / "live", tiny_data, *LORA, "loss=dpo", "optimizer.lr=1e-2"))
    assert spo["valid_groups"] == 8
    assert pre["loss"] == pytest.approx(live["loss"], rel=1e-5)  # same reference either way


@pytest.mark.parametrize(
    "loss", sorted(n for n, s in LOSSES.items() if s.needs_reference or "mismatched_kl" in s.extras)
)
def test_every_reference_based_loss_trains_with_lora(tmp_path, tiny_data, loss):
    final = run(_cfg(tmp_path / "run", tiny_data, *LORA, f"loss={loss}", "trainer.max_steps=2"))
    assert final["valid_groups"] == 8 and math.isfinite(final["loss"])
    assert all(map(math.isfinite, _train_losses(tmp_path / "run")))


def test_adapter_checkpoint_resumes_bit_for_bit(tmp_path, tiny_data):
    common = (
        *LORA,
        "loss=dpo",
        "trainer.max_steps=4",
        "optimizer.lr=1e-2",
        "model.lora.dropout=0.1",
        "trainer.export_final=true",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_cfg(straight, tiny_data, *common))
    assert run(_cfg(resumed, tiny_data, *common, "trainer.stop_at_step=2")) == {}
    ckpt = resumed / "checkpoints" / "step_000002"
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)  # no frozen base weights
    assert len(model_keys) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    run(_cfg(resumed, tiny_data, *common))
    assert _train_losses(straight) == _train_losses(resumed)
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same keys, bit-identical values


def test_merged_export_reproduces_the_adapted_model(tmp_path, tiny_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    cfg = _cfg(
        run_dir,
        tiny_data,
        *LORA,
        "loss=dpo",
        "optimizer.lr=1e-2",
        "trainer.export_final=true",
        "model.lora.export_merged=true",
    )
    run(cfg)
    tok = load_tokenizer(cfg.model, cfg.cache_dir)
    base = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed)
    plain = load_model(cfg.model, cfg.cache_dir, tok, cfg.seed).eval()
    adapted = PeftModel.from_pretrained(base, run_dir / "final").eval()  # the PEFT export
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final_merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    spec, _ = build_loss(cfg.loss)
    data = prepare_data(cfg, tok, spec)
    groups = [(group_at(data.eval, row), idx) for row, idx in data.eval_views[:4]]
    batch = collate_layout(groups, tok.pad_token_id, "padded")
    with torch.no_grad():
        want, got = group_stats(adapted, batch), group_stats(merged, batch)
        start = group_stats(plain, batch)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-4)
    assert (got.logps - start.logps).abs().max() > 1e-3  # the merge carried the training


def test_adapter_count_for_a_plan_matches_the_built_model(tok):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
    )
    trainable, base = adapters.count_adapter_parameters(config, LoraConfig(rank=8))
    per_layer = 8 * (128 + 96 + 96 + 128 + 3 * (64 + 96))  # r (in + out) of q k v o gate up down
    assert trainable == 3 * per_layer
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96 + 2 * 64  # projections + 2 norms
    assert base == 300 * 64 * 2 + 3 * layer + 64  # untied embeddings and head, final norm


def test_quantize_without_cuda_is_a_clear_error(tmp_path, tiny_data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is visible: the GPU test covers model.quantize")
    cfg = _cfg(tmp_path / "run", tiny_data, *LORA, "model.quantize=4bit")
    with pytest.raises(ConfigError, match=r"model\.quantize=4bit .*CUDA"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"model\.quantize=8bit .*needs adapters") as e:
        validate(_cfg(tmp_path / "run", tiny_data, "model.quantize=8bit"))
    assert e.value.fix == "add +model/lora=default"
    with pytest.raises(ValueError, match=r"model\.quantize='3bit': expected one of"):
        validate(_cfg(tmp_path / "run", tiny_data, *LORA, "model.quantize=3bit"))


@pytest.mark.gpu
def test_qlora_trains_on_a_4bit_base(tmp_path, tiny_data, tok):
    pytest.importorskip("bitsandbytes")
    model_dir = tmp_path / "tiny_model"
    cfg = _cfg(tmp_path / "x", tiny_data)
    load_model(cfg.model, cfg.cache_dir, tok, 0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    run_dir = tmp_path / "run"
    final = run(
        _cfg(
            run_dir,
            tiny_data,
            *LORA,
            "loss=dpo",
            "model.source=hub",
            f"model.name_or_path={model_dir}",
            "model.quantize=4bit",
            "trainer.device=cuda",
            "optimizer.lr=1e-2",
            "trainer.export_final=true",
        )
    )
    losses = _train_losses(run_dir)
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert final["valid_groups"] == 8
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.distributed
def test_two_ranks_train_lora_like_one_process(tmp_path, tiny_data):
    def launch(run_dir: Path, nproc: int, port: int) -> None:
        env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
        entry = [
            "-m",
            "prefopt.train",
            "model=tiny",
            "trainer=debug",
            "loss=dpo",
            *LORA,
            f"dataset.path={tiny_data[0]}",
            f"dataset.eval_path={tiny_data[1]}",
            f"hydra.run.dir={run_dir}",
            "trainer.export_final=true",
            "optimizer.lr=1e-2",
            "trainer.max_steps=4",
        ]
        launcher = (
            ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
            if nproc > 1
            else []
        )
        for stop in ("trainer.stop_at_step=2", "trainer.stop_at_step=0"):  # stop, then resume
            proc = subprocess.run(
                [sys.executable, *launcher, *entry, stop],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    one, two = tmp_path / "one", tmp_path / "two"
    launch(one, 1, 0)
    launch(two, 2, 29651)
    torch.testing.assert_close(
        torch.tensor(_train_losses(one)), torch.tensor(_train_losses(two)), rtol=1e-4, atol=1e-5
    )
    assert len(_train_losses(two)) == 4
    a = load_file(one / "final" / "adapter_model.safetensors")
    b = load_file(two / "final" / "adapter_model.safetensors")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # same keys, close values


@pytest.mark.slow
def test_lora_dpo_peak_rss_is_below_full_fine_tuning(capsys):
    """SmolLM2-135M DPO on CPU, each run its own process (experiments/lora_memory.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lora_memory", REPO / "experiments" / "lora_memory.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peaks = bench.measure()
    with capsys.disabled():
        print(
            f"\npeak RSS, SmolLM2-135M DPO on CPU: full {peaks['full']:.0f} MiB, "
            f"LoRA {peaks['lora']:.0f} MiB"
        )
    # full: policy + grads + 2 Adam moments + reference (~5 x 540 MB fp32); LoRA: ~1 x, plus
    # the same ~0.5 GB of libraries and the same activations in both
    assert peaks["lora"] < 0.8 * peaks["full"]
