# pytest tests/test_kernels.py -q
"""The attention kernel registry (``prefopt.model.attention``) and the varlen decomposition of the
shared layout: what ``auto`` picks per device, layout and model, availability from transformers'
and torch's checks, and the CPU reference's statistics and gradients against the padded layout."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import sys

import pytest
import torch
import transformers.utils.import_utils as import_utils
from conftest import compose_config
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Gemma2Config

from prefopt.config import ModelConfig
from prefopt.data.collate import collate
from prefopt.data.packing import collate_layout
from prefopt.data.tokenize import TokenizedGroup
from prefopt.errors import ConfigError
from prefopt.losses import build_loss
from prefopt.model import attention
from prefopt.model.attention import KERNELS, Target, choose, kernel_description
from prefopt.model.kernels import varlen
from prefopt.model.load import load_model
from prefopt.model.logprobs import StatsModel, group_stats
from prefopt.train.banner import attention_line
from prefopt.train.plan import plan_memory, shape_and_inputs
from prefopt.train.step import LossContext, forward_loss

CUDA_BF16 = dict(device="cuda", half=True)


def _groups(tok, k: int, seed: int = 0, reverse: bool = True):
    """Ragged prompts (3 to 17 tokens) and responses (1 to 12), K responses per group (scores
    falling, so a pair's first response is the chosen one), one group with a single response;
    ``reverse``: the second group's view in reverse order (K-1, ..., 0)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 250, (n,), generator=g).tolist()

    out = []
    for i, p in enumerate((3, 17, 8, 11)):
        lengths = torch.randint(1, 13, (k,), generator=g).tolist()
        responses = [ids(n) + [tok.eos_token_id] for n in lengths]
        scores = [float(k - j) for j in range(k)]
        group = TokenizedGroup([tok.bos_token_id, *ids(p)], responses, [True] * k, scores)
        view = tuple(reversed(range(k))) if i == 1 and reverse else tuple(range(k))
        out.append((group, view))
    out.append((TokenizedGroup([tok.bos_token_id, *ids(5)], [ids(4)], [False], [0.0]), (0,)))
    return out


@functools.cache
def _tiny(attn: str, dtype: torch.dtype = torch.float32):
    cfg = ModelConfig(name_or_path="tiny", source="tiny", attn_implementation=attn)
    return load_model(OmegaConf.structured(cfg), "/nonexistent", _tok(), seed=0).to(dtype)


@functools.cache
def _tok():
    from prefopt.model.load import tiny_tokenizer

    return tiny_tokenizer()


def _stats_and_grads(model, batch):
    model.zero_grad()
    stats = group_stats(model, batch, chunk_size=16)
    w = torch.linspace(-1, 1, stats.logps.numel()).view_as(stats.logps)
    (stats.logps * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return stats, grads


@pytest.mark.parametrize("k", [2, 4])
def test_shared_varlen_equals_padded_in_fp32(tok, k):
    """The shared layout through the varlen decomposition (prompt segments, [prompt; response]
    segments, gathered keys) on the CPU reference: the same log-probs, lengths, EOS log-probs and
    gradients as the padded layout through SDPA with its padding mask, in fp32."""
    grps = _groups(tok, k)
    want, want_grads = _stats_and_grads(_tiny("sdpa"), collate(grps, tok.pad_token_id))
    shared = collate_layout(grps, tok.pad_token_id, "shared")
    assert shared.varlen.kv_index is not None  # responses gather their prompt's keys
    got, got_grads = _stats_and_grads(_tiny("prefopt_varlen_ref"), shared)
    for name in ("logps", "lengths", "eos_logps", "mask"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    assert want.logps.abs().max() > 10  # sums over whole responses, not a vacuous comparison
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def faked(monkeypatch):
    """Set which kernels report themselves available (the CUDA checks cannot run here)."""

    def fake(*ready: str) -> None:
        for name in attention.AUTO:
            why = None if name in ready else "faked away"
            monkeypatch.setitem(
                KERNELS, name, dataclasses.replace(KERNELS[name], available=lambda w=why: w)
            )

    return fake


def test_auto_picks_per_device_layout_and_model(faked):
    faked("prefopt_varlen_fa", "prefopt_varlen_torch", "prefopt_flex", "prefopt_varlen_ref")
    for layout in ("padded", "packed", "shared", None):
        assert choose("auto", Target("cpu", layout)) == "prefopt_varlen_ref"
        assert choose("auto", Target(layout=layout, **CUDA_BF16)) == "prefopt_varlen_fa"
        gemma = Target(layout=layout, softcap=True, **CUDA_BF16)
        assert choose("auto", gemma) == "prefopt_varlen_fa"  # flash-attn applies the softcap
    faked("prefopt_varlen_torch", "prefopt_flex")  # no flash-attn installed
    assert choose("auto", Target(layout="shared", **CUDA_BF16)) == "prefopt_varlen_torch"
    gemma = Target(layout="shared", softcap=True, **CUDA_BF16)
    assert choose("auto", gemma) == "prefopt_flex"  # torch's varlen has no softcap
    assert choose("auto", Target("cuda", "shared", half=False)) == "prefopt_flex"  # fp32
    assert choose("prefopt_flex", Target(layout="shared", **CUDA_BF16)) == "prefopt_flex"
    faked("prefopt_varlen_ref")  # nothing compiled runs: the reference, which reads offsets
    assert choose("auto", Target(layout="shared", **CUDA_BF16)) == "prefopt_varlen_ref"


def test_prefopt_kernel_names_are_custom_to_transformers():
    """transformers treats a name containing "flash" as flash-attn (it imports flash-attn or a
    Hub kernel) and one containing "sdpa" as SDPA (refused for Gemma-2): prefopt's avoid both."""
    from transformers.utils.generic import is_flash_attention_requested

    ours = [name for name, k in KERNELS.items() if k.attend is not None]
    assert len(ours) == 4
    for name in ours:
        assert not is_flash_attention_requested(requested_attention_implementation=name)
        assert "sdpa" not in name and "flex_attention" not in name


def test_kernels_that_cannot_run_are_refused_with_the_reason(faked):
    faked("prefopt_varlen_ref")
    with pytest.raises(ConfigError, match="shared layout") as e:
        choose("flash_attention_2", Target(layout="shared", **CUDA_BF16))
    assert "attn_implementation=auto" in e.value.fix
    with pytest.raises(ConfigError, match="softcap"):
        choose("sdpa", Target("cpu", "shared", softcap=True))
    with pytest.raises(ConfigError, match="runs on cuda"):
        choose("prefopt_varlen_torch", Target("cpu", "shared"))
    with pytest.raises(ConfigError, match="not a known attention kernel"):
        choose("prefopt_docs", Target("cpu", "shared"))


def test_recipe_banner_names_a_flash_kernel_for_the_shared_layout_on_cuda(faked):
    """The done-when command, ``python -m prefopt.train loss=refa_dynamic model=mistral7b
    trainer.dry_run=true``, composed as the CLI does; the banner's choice for a CUDA device
    where torch's varlen flash kernel runs (flash-attn not installed)."""
    cfg = compose_config("train", "loss=refa_dynamic", "model=mistral7b", "trainer.dry_run=true")
    target = Target.of_trainer(cfg.trainer, "cuda")
    assert target == Target("cuda", "shared", half=True)
    faked("prefopt_varlen_torch", "prefopt_flex")
    name = choose(cfg.model.attn_implementation, target)
    line = kernel_description(name, cfg.trainer.layout, "cuda")
    assert name == "prefopt_varlen_torch"
    assert "FlashAttention" in line and "shared rows on cuda" in line, line
    faked("prefopt_varlen_fa", "prefopt_varlen_torch", "prefopt_flex")
    assert choose(cfg.model.attn_implementation, target) == "prefopt_varlen_fa"


def test_banner_line_reads_the_models_needs(tok, faked, monkeypatch):
    """The banner asks the registry with the model's config: a Gemma-2-style attention softcap
    moves the CUDA choice from torch's varlen kernel (no softcap) to FlexAttention."""
    from prefopt.model import load

    cfg = compose_config("train", "model=tiny", "trainer=gpu", "model.attn_implementation=auto")
    faked("prefopt_varlen_torch", "prefopt_flex")
    assert "prefopt_varlen_torch for shared rows on cuda" in attention_line(
        cfg.model, cfg.trainer, cfg.cache_dir, tok, "cuda"
    )
    original = load.tiny_llama_config

    def capped(t, tokenizer):
        config = original(t, tokenizer)
        config.attn_logit_softcapping = 50.0
        return config

    monkeypatch.setattr(load, "tiny_llama_config", capped)
    assert "prefopt_flex for shared rows on cuda" in attention_line(
        cfg.model, cfg.trainer, cfg.cache_dir, tok, "cuda"
    )


def _clear_availability_caches() -> None:
    for fn in (
        import_utils.is_flash_attn_2_available,
        import_utils.is_flash_attn_3_available,
        import_utils.is_flash_attn_4_available,
        import_utils.is_flash_attn_greater_or_equal,
        import_utils._package_distribution_mapping,
        varlen.flash_attn_engine,
    ):
        fn.cache_clear()


def _forget_flash_attn() -> None:
    """Drop what an earlier lookup imported or cached, so the next check looks again."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    _clear_availability_caches()


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A directory on sys.path to install fake packages into, on a machine that says it has a
    GPU to transformers' and prefopt's checks (the real GPU work is tests/gpu's)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(import_utils, "is_torch_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    _forget_flash_attn()
    yield tmp_path
    _forget_flash_attn()


def test_a_namespace_package_is_not_a_flash_attn_install(fake_site):
    """The flash-attn-4 wheel installs only the namespace ``flash_attn/cute``: a module-name
    lookup finds ``flash_attn`` (the old check picked flash-attn then), transformers' check does
    not, and neither does the registry. A real distribution (dist-info with a version) is found."""
    (fake_site / "flash_attn" / "cute").mkdir(parents=True)
    (fake_site / "flash_attn" / "cute" / "__init__.py").write_text("")
    assert importlib.util.find_spec("flash_attn") is not None  # what the old check trusted
    target = Target(layout="packed", **CUDA_BF16)
    assert KERNELS["prefopt_varlen_fa"].refusal(target) is not None
    assert KERNELS["flash_attention_2"].refusal(target) is not None
    with pytest.raises(ConfigError):
        choose("prefopt_varlen_fa", target)
    # the control: flash-attn 2.8.3 installed as a distribution is picked
    (fake_site / "flash_attn" / "__init__.py").write_text(
        "__version__ = '2.8.3'\n\ndef flash_attn_varlen_func(*a, **k):\n    raise RuntimeError\n"
    )
    dist = fake_site / "flash_attn-2.8.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.8.3\n")
    (dist / "top_level.txt").write_text("flash_attn\n")
    _forget_flash_attn()
    assert KERNELS["prefopt_varlen_fa"].refusal(target) is None
    assert choose("auto", target) == "prefopt_varlen_fa"


def _groups_with_reference(tok, grps):
    """The groups with reference log-probs from the padded layout through eager attention: the
    ``trainer.reference=precompute`` path, with the reference's weights equal to the policy's."""
    with torch.no_grad():
        ref = group_stats(_tiny("eager"), collate(grps, tok.pad_token_id))
    out = []
    for b, (g, view) in enumerate(grps):
        logps, eos = [0.0] * len(g.response_ids), [0.0] * len(g.response_ids)
        for slot, r in enumerate(view):
            logps[r], eos[r] = float(ref.logps[b, slot]), float(ref.eos_logps[b, slot])
        out.append((dataclasses.replace(g, ref_logps=logps, ref_eos_logps=eos), view))
    return out


CPU_KERNELS = [name for name, k in KERNELS.items() if "cpu" in k.devices]


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_first_dpo_step_is_ln2_in_every_layout_and_kernel(tok, layout):
    """With the reference equal to the policy, DPO's first loss is ln 2 for every group: the
    step's forward (``forward_loss``) in this layout and kernel, the reference precomputed in the
    padded layout with eager attention. A kernel or layout that disagrees moves it."""
    grps = _groups_with_reference(tok, _groups(tok, 2, seed=3, reverse=False))
    spec, loss_fn = build_loss(compose_config("train", "loss=dpo").loss)
    batch = collate_layout(grps, tok.pad_token_id, layout)
    assert set(CPU_KERNELS) == {"prefopt_varlen_ref", "sdpa", "eager"}
    for name in CPU_KERNELS:
        with torch.no_grad():  # the loss's value
            out = forward_loss(StatsModel(_tiny(name)), None, batch, LossContext(spec, loss_fn, 16))
        valid = out.losses[out.valid]
        assert len(valid) == 4, name  # the single-response group has no pair
        torch.testing.assert_close(valid, torch.full_like(valid, math.log(2)), rtol=0, atol=1e-5)


def _gemma(attn: str):
    """A tiny Gemma-2 built in code: attention softcap 0.5 (it changes every score here) and a
    final-logit softcap."""
    config = Gemma2Config(
        vocab_size=len(_tok()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=30.0,
        sliding_window=64,
        attention_dropout=0.0,
        pad_token_id=_tok().pad_token_id,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # scores of order 1 (at init they are ~1e-3, where tanh is linear)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    return model


def test_gemma2_softcap_in_the_shared_layout_equals_eager_padded(tok):
    """Gemma-2's attention-logit softcap through the varlen reference's explicit-score path: the
    shared layout's statistics equal transformers' eager padded reference; without the cap they
    would not (the control), and SDPA, which cannot cap, is refused for this model."""
    grps = _groups(tok, 4, seed=1)
    padded = collate(grps, tok.pad_token_id)
    shared = collate_layout(grps, tok.pad_token_id, "shared")
    with torch.no_grad():
        want = group_stats(_gemma("eager"), padded)
        got = group_stats(_gemma("prefopt_varlen_ref"), shared)
        uncapped = _gemma("prefopt_varlen_ref")
        uncapped.config.attn_logit_softcapping = None
        for layer in uncapped.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        control = group_stats(uncapped, shared)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.eos_logps, want.eos_logps, rtol=1e-5, atol=1e-5)
    assert (control.logps - want.logps).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="softcap"):
        choose(
            "sdpa", Target("cpu", "shared", softcap=attention.softcap_of(_gemma("eager").config))
        )


def test_the_plan_counts_a_dense_kernels_scores(tmp_path):
    """eager over a 16K-token shared row: the plan has a row for the (L, L) mask and one layer's
    scores (heads x L^2 x (4 + 2 x 2) bytes); auto's kernels add none."""
    args = ("model=tiny", "trainer=gpu", "trainer.micro_batch_tokens=16384")
    eager = compose_config("train", *args, "model.attn_implementation=eager")
    plan = plan_memory(*shape_and_inputs(eager, 1, "cuda"))
    heads, L = eager.model.tiny.num_heads, 16384
    assert plan.rows["attention (dense (L, L) mask, scores)"] == L * L * 2 + heads * L * L * 8
    auto = compose_config("train", *args, "model.attn_implementation=auto")
    assert not any(
        "attention" in row for row in plan_memory(*shape_and_inputs(auto, 1, "cuda")).rows
    )


def test_cuda_kernels_call_their_libraries_as_documented(tok, monkeypatch):
    """The CUDA kernels' calls, checked on CPU: each library function is replaced by its
    documented semantics (the CPU reference, causal aligned at the bottom right), after binding
    the call to the real signature (torch's ``varlen_attn``; flash-attn's keywords). Both equal
    the reference on a shared row with grouped K/V heads."""
    import inspect

    torch_varlen = varlen.torch_varlen

    batch = collate_layout(_groups(tok, 4), tok.pad_token_id, "shared")
    L = batch.input_ids.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, 8, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    want = varlen.varlen_attention(varlen.sdpa_segments, q, k, v, batch.varlen, 0.3, None)
    real = inspect.signature(torch_varlen.varlen_attn)

    def documented_torch(q_, k_, v_, cu_q, cu_k, max_q, max_k, **kw):
        real.bind(q_, k_, v_, cu_q, cu_k, max_q, max_k, **kw)
        assert kw["window_size"] == (-1, 0) and kw["enable_gqa"]  # causal; 4 query, 2 K/V heads
        assert (cu_q, cu_k, max_q, max_k) == tuple(batch.varlen[:2]) + tuple(batch.varlen[3:])
        index = batch.varlen._replace(kv_index=None)  # keys arrive gathered
        return varlen.sdpa_segments(q_, k_, v_, index, kw["scale"], None)

    monkeypatch.setattr(torch_varlen, "varlen_attn", documented_torch)
    got = varlen.varlen_attention(varlen.torch_segments, q, k, v, batch.varlen, 0.3, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    def documented_flash(q_, k_, v_, cu_q, cu_k, max_q, max_k, *, softmax_scale, causal, **kw):
        assert causal and set(kw) <= {"softcap"}
        index = batch.varlen._replace(kv_index=None)
        return varlen.sdpa_segments(q_, k_, v_, index, softmax_scale, kw.get("softcap"))

    monkeypatch.setattr(varlen, "_flash_fn", documented_flash)
    got = varlen.varlen_attention(varlen.flash_attn_segments, q, k, v, batch.varlen, 0.3, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="softcap|cap"):
        varlen.varlen_attention(varlen.torch_segments, q, k, v, batch.varlen, 0.3, 50.0)


@pytest.mark.parametrize("choice", ["model=gemma2_9b_it", "experiment=alpha_dpo_gemma2_9b_it"])
def test_gemma2_recipes_run_a_softcap_kernel_not_eager(faked, choice):
    """The Gemma-2 recipes leave the kernel to the registry (they pinned eager: an (L, L) mask and
    scores per layer over 16K-token shared rows): on CUDA without flash-attn that is FlexAttention,
    which applies the softcap; the plan counts no dense workspace for them."""
    cfg = compose_config("train", choice)
    assert cfg.trainer.layout == "shared" and cfg.model.attn_implementation == "auto"
    faked("prefopt_varlen_torch", "prefopt_flex")
    target = Target.of_trainer(cfg.trainer, "cuda")._replace(softcap=True)
    assert choose(cfg.model.attn_implementation, target) == "prefopt_flex"
    heads, tokens = 16, cfg.trainer.micro_batch_tokens  # Gemma-2-9B: 16 query heads
    width = cfg.dataset.max_length
    assert attention.workspace_bytes("auto", "shared", tokens, width, heads, 2) == 0
    eager = attention.workspace_bytes("eager", "shared", tokens, width, heads, 2)
    assert eager > 16 * tokens**2 * 4  # what the pinned eager kernel would have held
