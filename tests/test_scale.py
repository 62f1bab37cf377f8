# .venv/bin/pytest tests/test_scale.py -q
"""The 7-70B path on CPU: fp32 master weights under bf16 weights on disk, sharded loading from
the weight files, skipped steps that leave nothing behind, KTO's step-wide baseline."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from omegaconf import OmegaConf
from scale_checks import compose_cfg, full_grads, grad_memory_check, sharded_policy, skip_check

from prefopt.data.batching import Batching, batches
from prefopt.data.collate import views_at
from prefopt.losses import build_loss
from prefopt.model import parallel
from prefopt.model.load import load_model
from prefopt.train.extras import ExtraEnv, StepExtras, StepRows
from prefopt.train.passes import PassOptions
from prefopt.train.setup import prepare_data
from prefopt.train.step import LossContext, StepContext, step_micro_batches, train_step


def _world():
    return parallel.init_distributed("cpu")


def test_bf16_weights_train_as_fp32_master_weights(tmp_path):
    """A bf16 checkpoint trained one step at lr 5e-7 moves >= 99% of the master weights, which
    are fp32; the same update applied to bf16 storage would move few of them."""
    cfg = compose_cfg(tmp_path, "loss=simpo", "model.dtype=bfloat16", "trainer.precision=bf16")
    world = _world()
    precision = parallel.resolve_precision(world.device, "bf16", "float32")
    policy, tok = sharded_policy(cfg, world, precision)
    ref, _ = sharded_policy(cfg, world, precision, trainable=False)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in ref.parameters())
    before = [p.detach().full_tensor().clone() for p in policy.parameters()]
    assert all(torch.equal(b, b.bfloat16().float()) for b in before)  # the bf16 values, exactly
    spec, loss_fn = build_loss(cfg.loss)
    data = prepare_data(cfg, tok, spec)
    mbs = step_micro_batches(cfg.trainer, data, views_at(16, 0, 0, 4), world, tok.pad_token_id)
    ctx = StepContext(
        LossContext(spec, loss_fn, 64), torch.autocast("cpu", dtype=torch.bfloat16), 1.0
    )
    assert train_step(policy, None, mbs, ctx).applied
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-7, betas=(0.9, 0.95), weight_decay=0.0)
    opt.step()
    after = [p.detach().full_tensor() for p in policy.parameters()]
    n = sum(b.numel() for b in before)
    moved = sum(int((a != b).sum()) for a, b in zip(after, before, strict=True))
    assert moved / n >= 0.99, moved / n
    in_bf16 = sum(
        int((a.bfloat16() != b.bfloat16()).sum()) for a, b in zip(after, before, strict=True)
    )
    assert in_bf16 / n < 0.2, in_bf16 / n  # bf16 master weights would lose most of the update


def test_sharded_load_equals_the_whole_model(tmp_path):
    """Meta-device build + shards filled from the safetensors files give the model
    ``from_pretrained`` gives, in fp32 from bf16 files, tied output layer included."""
    cfg = compose_cfg(tmp_path, "loss=simpo")
    tok = __import__("prefopt.model.load", fromlist=["tiny_tokenizer"]).tiny_tokenizer()
    saved = tmp_path / "saved"
    whole = load_model(cfg.model, cfg.cache_dir, tok, seed=3).to(torch.bfloat16)
    whole.save_pretrained(saved)
    tok.save_pretrained(saved)
    hub = compose_cfg(tmp_path, "loss=simpo", "model=checkpoint", f"model.name_or_path={saved}")
    world = _world()
    precision = parallel.resolve_precision(world.device, "fp32", "float32")
    policy, _ = sharded_policy(hub, world, precision)
    assert policy.model.lm_head.weight is policy.model.model.embed_tokens.weight
    full = parallel.full_state_dict(policy)
    want = whole.state_dict()
    assert set(full) == set(want) - {"lm_head.weight"}
    for k, v in full.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, want[k].float(), rtol=0, atol=0)
    x = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad(), parallel.unsharded(policy):  # the root's own parameters, gathered
        torch.testing.assert_close(policy.model(x).logits, whole.float()(x).logits)


def test_skipped_step_leaves_no_gradient_behind(tmp_path):
    skip_check(tmp_path)


def _kto_grads(tmp_path, micro: int):
    overrides = ["loss=kto", "trainer.global_batch_groups=4", f"trainer.micro_batch_groups={micro}"]
    cfg = compose_cfg(tmp_path / f"m{micro}", *overrides)
    world = _world()
    precision = parallel.resolve_precision(world.device, "fp32", "float32")
    policy, tok = sharded_policy(cfg, world, precision)
    ref, _ = sharded_policy(cfg, world, precision, trainable=False)
    with torch.no_grad():  # a sharper reference: other responses are less likely under it
        ref.model.model.norm.weight.mul_(3.0)
    spec, loss_fn = build_loss(cfg.loss)
    data = prepare_data(cfg, tok, spec)
    views = views_at(len(data.train_views), 0, 0, 4)
    opts = PassOptions(2, tok.pad_token_id, 64, contextlib.nullcontext())
    extras = StepExtras.build(spec, cfg.loss, ExtraEnv(ref, opts, tok.eos_token_id))
    inputs = extras.inputs(policy, StepRows(data.train, data.train_views, views))
    mbs = list(
        batches(data.train, data.train_views, views, micro, Batching(pad_id=tok.pad_token_id))
    )
    ctx = StepContext(LossContext(spec, loss_fn, 64, inputs=inputs), contextlib.nullcontext(), 1e9)
    result = train_step(policy, ref, mbs, ctx)
    grads = full_grads(policy)
    policy.zero_grad(set_to_none=True)
    return result.metrics, grads


def test_kto_baseline_does_not_depend_on_the_micro_batch_size(tmp_path):
    torch.manual_seed(0)
    one, g_one = _kto_grads(tmp_path, 4)
    torch.manual_seed(0)
    acc, g_acc = _kto_grads(tmp_path, 1)  # one group per micro-batch
    assert one["kto/z0"] > 0  # the baseline is in play
    assert one["kto/z0"] == pytest.approx(acc["kto/z0"], rel=1e-12)
    assert one["loss"] == pytest.approx(acc["loss"], rel=1e-9)
    for a, b in zip(g_one, g_acc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)  # fp32 summation order


def test_zero_init_with_running_zscores_is_refused():
    from omegaconf import OmegaConf

    from prefopt.losses import get_spec

    for name in ("lmpo", "alpha_dpo"):
        spec = get_spec(name)
        cfg = OmegaConf.structured(spec.config_cls(stats_init="zero", zscore_stats="running"))
        with pytest.raises(ValueError, match="stats_init=zero with loss.zscore_stats=running"):
            spec.init_state(cfg)
        ok = OmegaConf.structured(
            spec.config_cls(stats_init="zero", zscore_stats="running_and_batch")
        )
        spec.init_state(ok)


def _one_sharded_step(world, dtype: torch.dtype, make_optimizer):
    """One step of ``make_optimizer`` on FSDP2-sharded Linear blocks (DTensor parameters):
    (parameters before, after, gradients) as full tensors, and the optimizer."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(3)]).to(dtype)
    for layer in model:
        fully_shard(layer, mesh=world.mesh)
    fully_shard(model, mesh=world.mesh)
    params = list(model.parameters())
    before = [p.detach().full_tensor().float().clone() for p in params]
    opt = make_optimizer(params)
    model(torch.randn(8, 256, dtype=dtype)).float().square().mean().backward()
    grads = [p.grad.full_tensor().float() for p in params]
    opt.step()
    after = [p.detach().full_tensor().float() for p in params]
    return before, after, grads, opt


def _moved_and_signed_step(before, after, grads, lr: float) -> tuple[float, float]:
    """Share of weights that changed; mean step against the gradient's sign, in units of lr
    (Adam's first step is lr x sign(g) per weight)."""
    n = sum(b.numel() for b in before)
    moved = sum(int((a != b).sum()) for a, b in zip(after, before, strict=True)) / n
    signed = sum(
        float(((b - a) * g.sign()).sum()) for a, b, g in zip(after, before, grads, strict=True)
    )
    return moved, signed / (n * lr)


def test_low_memory_optimizers_step_fsdp2_shards_at_small_lr():
    """torchao's 8-bit AdamW keeps fp32 master weights with 8-bit moments; its bf16 AdamW with
    stochastic rounding moves bf16 weights by lr on average, where round-to-nearest loses it."""
    from omegaconf import OmegaConf
    from torchao.optim import AdamW8bit

    from prefopt.train.optim import build_optimizer

    world, lr = _world(), 5e-7
    before, after, grads, opt = _one_sharded_step(
        world, torch.float32, lambda ps: AdamW8bit(ps, lr=lr, weight_decay=0.0)
    )
    moved, signed = _moved_and_signed_step(before, after, grads, lr)
    assert moved >= 0.99 and signed == pytest.approx(1.0, abs=0.05)
    state = next(iter(opt.state.values()))["exp_avg"]
    assert type(state.to_local()).__name__ == "OptimState8bit"  # 8-bit moments, per shard
    sr_cfg = {"_target_": "prefopt.train.optim.adamw_bf16_sr", "_partial_": True, "lr": lr}
    sr = OmegaConf.create({**sr_cfg, "betas": [0.9, 0.95], "weight_decay": 0.0, "eps": 1e-8})
    before, after, grads, _ = _one_sharded_step(
        world, torch.bfloat16, lambda ps: build_optimizer(sr, ps)
    )
    _, signed = _moved_and_signed_step(before, after, grads, lr)
    assert signed == pytest.approx(1.0, abs=0.15)  # unbiased: lr per weight on average
    before, after, grads, _ = _one_sharded_step(
        world, torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0)
    )
    moved, signed = _moved_and_signed_step(before, after, grads, lr)
    assert moved < 0.05 and abs(signed) < 0.15  # round to nearest: the update is lost


def test_bf16_master_weights_need_the_stochastic_rounding_optimizer():
    from omegaconf import OmegaConf

    from prefopt.errors import ConfigError
    from prefopt.train.optim import build_optimizer

    cfg = OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-6})
    with pytest.raises(ConfigError, match="master_dtype=bfloat16"):
        build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])


def _llama3_8b_dir(tmp_path):
    """Llama-3-8B's architecture (its config.json numbers), no weights: what the plan reads."""
    from transformers import LlamaConfig

    path = tmp_path / "llama3_8b"
    LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ).save_pretrained(path)
    return path


def test_memory_plan_by_hand_for_8b_on_1_and_8_gpus(tmp_path):
    """Parameters, gradients and AdamW state of 8.03 B fp32 master weights, sharded over 8."""
    from prefopt.train.plan import GIB, format_plan, plan_memory, shape_and_inputs

    path = _llama3_8b_dir(tmp_path)
    args = ("model=llama3_8b_instruct", f"model.name_or_path={path}", "trainer=gpu")
    cfg = compose_cfg(tmp_path / "c", *args, "loss=dpo")
    shape, inputs = shape_and_inputs(cfg, 8, "cuda")
    assert shape.params == 8_030_261_248  # Llama-3-8B's parameter count
    assert shape.block_params == 218_112_000 and shape.layers == 32
    assert inputs.reference == "model" and inputs.compute_bytes == 2 and inputs.master_bytes == 4
    plan = plan_memory(shape, inputs)
    assert plan.rows["parameters (sharded)"] == shape.params * 4 // 8
    assert plan.rows["optimizer state (sharded)"] == shape.params * 8 // 8
    assert plan.rows["reference (sharded)"] == shape.params * 2 // 8
    assert 30 * GIB < plan.total < 40 * GIB  # fits an 80 GB H100 with room for the allocator
    assert "total per GPU" in format_plan(plan)
    one = plan_memory(*shape_and_inputs(cfg, 1, "cuda"))
    assert one.total > 140 * GIB  # full fine-tune DPO of 8B on one GPU cannot fit
    lora = compose_cfg(tmp_path / "l", *args, "loss=dpo", "+model/lora=default")
    shape_l, inputs_l = shape_and_inputs(lora, 1, "cuda")
    assert inputs_l.trainable_params == 41_943_040 and inputs_l.reference == "none"
    assert plan_memory(shape_l, inputs_l).total < 32 * GIB  # LoRA: 8B on one 80 GB GPU


def test_memory_plan_counts_only_the_top_blocks_when_the_rest_is_frozen(tmp_path):
    """trainer.train_top_blocks=2 on Llama-3-8B: the optimizer holds two blocks and the final
    norm; the frozen rest sits in bf16; only the two top blocks keep activations."""
    from prefopt.train.plan import plan_memory, shape_and_inputs

    path = _llama3_8b_dir(tmp_path)
    args = ("model=llama3_8b_instruct", f"model.name_or_path={path}", "trainer=gpu", "loss=simpo")
    args = (*args, "model.gradient_checkpointing=false")  # every kept block keeps all of it
    full = plan_memory(*shape_and_inputs(compose_cfg(tmp_path / "f", *args), 8, "cuda"))
    shape, inputs = shape_and_inputs(
        compose_cfg(tmp_path / "t", *args, "trainer.train_top_blocks=2"), 8, "cuda"
    )
    trained = 2 * 218_112_000 + 4096  # two decoder blocks + the final RMSNorm
    assert inputs.trainable_params == trained and inputs.activation_blocks == 2
    plan = plan_memory(shape, inputs)
    assert plan.trainable == trained
    assert plan.rows["gradients (sharded)"] == trained * 4 // 8
    assert plan.rows["optimizer state (sharded)"] == trained * 8 // 8
    frozen = 8_030_261_248 - trained
    assert plan.rows["parameters (sharded)"] == trained * 4 // 8 + frozen * 2 // 8
    assert plan.rows["activations"] * 16 == full.rows["activations"]  # 2 of 32 blocks


def test_plan_refuses_what_cannot_fit_and_says_what_to_change(tmp_path):
    from prefopt.errors import PlanError
    from prefopt.train.plan import GIB, check_fits, plan_memory, shape_and_inputs

    path = _llama3_8b_dir(tmp_path)
    cfg = compose_cfg(
        tmp_path / "c",
        "model=llama3_8b_instruct",
        f"model.name_or_path={path}",
        "trainer=gpu",
        "loss=simpo",
    )
    plan = plan_memory(*shape_and_inputs(cfg, 1, "cuda"))
    with pytest.raises(
        PlanError, match="needs 1[0-9][0-9].[0-9] GiB per GPU but H100 has 80.0"
    ) as e:
        check_fits(plan, 80 * GIB, "H100")
    assert "more GPUs" in e.value.fix and "gradient_checkpointing" in e.value.fix
    check_fits(plan_memory(*shape_and_inputs(cfg, 8, "cuda")), 80 * GIB, "H100")


def test_plan_cli_exits_by_fit(tmp_path, capsys):
    from prefopt.train.plan import main

    path = _llama3_8b_dir(tmp_path)
    args = ["model=llama3_8b_instruct", f"model.name_or_path={path}", "trainer=gpu", "loss=simpo"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--world-size", "8", "--gpu-memory-gib", "80"])
    assert e.value.code == 0 and "fits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--world-size", "1", "--gpu-memory-gib", "80"])
    assert e.value.code == 1 and "does NOT fit" in capsys.readouterr().out


def test_plan_counts_the_reference_model_the_loop_builds(tmp_path):
    """Precomputed reference log-probs need no reference model, except where the loss needs
    forwards on rows no cache holds (KTO's mismatched pairs, SPO's on-policy KL)."""
    from prefopt.train.plan import inputs_from_config

    def reference(*overrides: str) -> str:
        cfg = compose_cfg(tmp_path / "c", *overrides)
        return inputs_from_config(cfg, 1, "cpu").reference

    assert reference("loss=dpo") == "model"
    assert reference("loss=dpo", "trainer.reference=precompute") == "none"
    assert reference("loss=kto", "trainer.reference=precompute") == "model"
    assert reference("loss=spo", "trainer.reference=precompute") == "model"
    assert reference("loss=spo", "loss.kl_weight=0") == "none"
    assert reference("loss=simpo") == "none"


def test_plan_gradient_rows_equal_what_fsdp2_holds(tmp_path):
    """Tensor accounting on 1 rank (2 gloo ranks: tests/test_parallel.py)."""
    grad_memory_check(tmp_path)


def _hint_options(fix: str) -> list[str]:
    """The ``key=value`` and ``group=option`` settings a plan's fix names."""
    return re.findall(r"\+?[a-z_]+(?:[./][a-z_]+)*=[A-Za-z0-9_.]+", fix)


def test_plan_refusal_names_only_options_that_exist(tmp_path):
    """Each setting the refusal suggests composes and passes the config checks (an
    ``optimizer=adamw8bit_torchao`` that does not exist would fail here)."""
    from prefopt.checks import validate_config
    from prefopt.errors import PlanError
    from prefopt.train.plan import GIB, check_fits, plan_memory, shape_and_inputs

    cfg = compose_cfg(tmp_path / "c", "model=mistral7b", "trainer.grad_sync=last")
    with pytest.raises(PlanError) as e:
        check_fits(plan_memory(*shape_and_inputs(cfg, 1, "cuda")), 80 * GIB, "H100")
    settings = _hint_options(e.value.fix)
    assert "optimizer=adamw8bit" in settings and "trainer.grad_sync=every" in settings
    assert len(settings) >= 6, settings
    for setting in settings:
        validate_config(compose_cfg(tmp_path / "s", "model=mistral7b", setting))
    for word in ("trainer.micro_batch_tokens", "trainer.logps_chunk_size"):  # named, no value
        assert word in e.value.fix and OmegaConf.select(cfg, word) is not None


def test_memory_plan_by_hand_for_mistral_7b_on_1_and_8_gpus(tmp_path):
    """REFA's Mistral-7B recipe (bf16 compute, fp32 master weights, AdamW, gradient checkpointing,
    16384-token micro-batches, 4096-token log-prob chunks, no reference) from the shipped shapes;
    with ``trainer.grad_sync=last`` every rank also holds the whole model's fp32 gradient."""
    from prefopt.train.plan import ACCUMULATORS, plan_memory, shape_and_inputs

    P, B, R = 7_241_732_096, 218_112_000, 262_148_096  # model, one block, root (embed, head, norm)
    L, H, I, V, T, C = 32, 4096, 14336, 32000, 16384, 4096  # noqa: E741
    assert 32 * B + R == P
    gathered = (2 * B + R) * 2  # the running and the prefetched block + the root, bf16
    one_block = 4 * B  # its fp32 gradient on the way to the reduce-scatter
    activations = L * T * H * 2 + T * 2 * (8 * H + 3 * I)  # checkpointed inputs + one block
    logits = 3 * C * V * 4
    for world in (1, 8):
        sharded = P * 4 // world + P * 4 // world + P * 8 // world  # weights, grads, AdamW
        want = sharded + gathered + one_block + activations + logits
        for sync, extra in (("every", 0), ("last", 4 * P)):
            args = ("model=mistral7b", "trainer=gpu", f"trainer.grad_sync={sync}")
            cfg = compose_cfg(tmp_path / sync, *args)
            shape, inputs = shape_and_inputs(cfg, world, "cuda")
            assert (shape.params, shape.block_params, shape.root_params) == (P, B, R)
            plan = plan_memory(shape, inputs)
            assert plan.total == want + extra, (world, sync, plan.rows)
            assert plan.rows.get(ACCUMULATORS, 0) == extra
    # 8 GPUs: 23.38 GiB per GPU syncing every micro-batch, 50.36 GiB syncing only the last
    assert round((want + 0) / 2**30, 2) == 23.38 and round((want + 4 * P) / 2**30, 2) == 50.36


def test_the_plan_refuses_before_the_data_is_tokenized(tmp_path, monkeypatch):
    """A run whose plan exceeds the device stops before the dataset is read or tokenized."""
    from prefopt.errors import PlanError
    from prefopt.train import loop, plan

    monkeypatch.setattr(plan, "device_capacity", lambda device: (1024, "a 1 KiB test device"))

    def no_data(*args, **kwargs):
        raise AssertionError("the data was prepared before the plan refused")

    monkeypatch.setattr(loop, "prepare_data", no_data)
    with pytest.raises(PlanError, match="but a 1 KiB test device has"):
        loop.run(compose_cfg(tmp_path, "loss=simpo"))
