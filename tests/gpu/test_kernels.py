# pytest -m gpu tests/gpu/test_kernels.py -q      (skipped without CUDA)
"""The CUDA attention kernels of the registry (``prefopt.model.attention``) in bf16: each against
the dense reference, gradients, no recompilation across lengths, no host sync, peak memory at a
16K-token shared row, and the banner's choice for the recipe. A kernel that cannot run on this
machine (flash-attn not installed, an older GPU) is skipped with the registry's reason."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from prefopt.config import ModelConfig, TinyModelConfig
from prefopt.data.collate import collate
from prefopt.data.packing import collate_layout
from prefopt.data.tokenize import TokenizedGroup
from prefopt.model.attention import AUTO, KERNELS, Target, choose, kernel_description
from prefopt.model.blocks import compile_blocks
from prefopt.model.kernels import varlen
from prefopt.model.kernels.flex import block_mask, compiled_flex, flex_rows
from prefopt.model.kernels.masks import document_mask
from prefopt.model.load import model_config
from prefopt.model.logprobs import group_stats

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
CUDA_KERNELS = list(AUTO[:3])  # flash-attn varlen, torch varlen, FlexAttention
VARLEN_KERNELS = CUDA_KERNELS[:2]


def _runnable(name: str, layout: str = "shared") -> None:
    why = KERNELS[name].refusal(Target("cuda", layout, half=True))
    if why:
        pytest.skip(f"{name}: {why}")


def _groups(n: int, seed: int, prompt: int = 90, response: int = 175, k: int = 2):
    """n groups of k responses, lengths spread around the given means (UltraFeedback halved)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(prompt // 2, prompt * 2, (1,), generator=g))
        rs = torch.randint(response // 3, response * 2, (k,), generator=g).tolist()
        ids = [torch.randint(0, 250, (r,), generator=g).tolist() for r in (p, *rs)]
        scores = [float(k - j) for j in range(k)]
        out.append((TokenizedGroup(ids[0], ids[1:], [False] * k, scores), tuple(range(k))))
    return out


def _model(tok, attn: str, checkpointing: bool = False, **shape):
    """The tiny Llama with kernel ``attn`` as the registry prepares it for bf16 compute on CUDA
    (fp32 weights under bf16 autocast, as the tests run it); the same weights for every kernel."""
    tiny = TinyModelConfig(
        **{
            "hidden_size": 256,
            "num_layers": 4,
            "num_heads": 8,
            "num_kv_heads": 2,
            "intermediate_size": 512,
            "max_position_embeddings": 4096,
            **shape,
        }
    )
    cfg = ModelConfig(name_or_path="tiny", source="tiny", attn_implementation=attn, tiny=tiny)
    config = model_config(OmegaConf.structured(cfg), "/nonexistent", tok, Target("cuda", half=True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(CUDA)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("attn", CUDA_KERNELS)
def test_kernel_equals_padded_in_bf16(tok, attn, layout):
    """bf16 autocast (the recipe's compute) over fp32 weights: the kernel's statistics in this
    layout are as close to the fp32 padded SDPA reference as bf16 padded SDPA is (stated
    tolerance: within 2x its largest error + 0.1% of the largest log-prob), for K = 2 and 4."""
    _runnable(attn, layout)
    model, dense = _model(tok, attn), _model(tok, "sdpa")
    for k in (2, 4):
        grps = _groups(12, seed=k, k=k)
        padded = collate(grps, tok.pad_token_id).to(CUDA)
        batch = collate_layout(grps, tok.pad_token_id, layout).to(CUDA)
        with torch.no_grad():
            want = group_stats(dense, padded).logps  # fp32 reference
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16_padded = group_stats(dense, padded).logps
                got = group_stats(model, batch).logps
        padded_err = (bf16_padded - want).abs().max()
        assert (got - want).abs().max() <= 2 * padded_err + 1e-3 * want.abs().max(), (k, attn)


@pytest.mark.parametrize("attn", VARLEN_KERNELS)
def test_varlen_gradients_match_dense(tok, attn):
    """One attention call on a shared row (8 query, 2 K/V heads) in bf16: output and gradients
    of q, k, v no further from the fp32 dense-mask reference than bf16 dense SDPA is (2x + 1e-3):
    the gathered prompt keys receive the gradient of every response that reads them."""
    _runnable(attn)
    fn = {"prefopt_varlen_fa": varlen.flash_attn_segments}.get(attn, varlen.torch_segments)
    batch = collate_layout(_groups(16, seed=1), tok.pad_token_id, "shared").to(CUDA)
    L = batch.doc_ids.numel()
    g = torch.Generator(device=CUDA).manual_seed(0)
    leaves = [torch.randn(1, h, L, 64, generator=g, device=CUDA) for h in (8, 2, 2)]

    def run(how: str, dtype: torch.dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in leaves)
        if how == "kernel":
            out = varlen.varlen_attention(fn, q, k, v, batch.varlen, None, None).transpose(1, 2)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q,
                k.repeat_interleave(4, 1),
                v.repeat_interleave(4, 1),
                attn_mask=document_mask(batch),
            )
        w = torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)
        grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
        return [t.float() for t in (out, *grads)]

    want, bf16, got = (
        run("dense", torch.float32),
        run("dense", torch.bfloat16),
        run("kernel", torch.bfloat16),
    )
    for name, w, b, o in zip(("out", "dq", "dk", "dv"), want, bf16, got, strict=True):
        assert (o - w).abs().max() <= 2 * (b - w).abs().max() + 1e-3, name


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_flex_gradients_match_dense(tok, layout):
    batch = collate_layout(_groups(16, seed=1), tok.pad_token_id, layout).to(CUDA)
    L = batch.doc_ids.numel()
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (
        torch.randn(1, h, L, 64, generator=g, device=CUDA, requires_grad=True) for h in (8, 2, 2)
    )
    out = compiled_flex()(q, k, v, block_mask=block_mask(batch), enable_gqa=True)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=document_mask(batch)
    )
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_flex_does_not_recompile_across_lengths(tok):
    """After the first lengths (one graph per grad mode, one for single-block rows) new packed
    lengths reuse the compiled kernels: ``fail_on_recompile`` raises otherwise."""

    def run(n: int, seed: int, grad: bool) -> None:
        batch = collate_layout(_groups(n, seed), tok.pad_token_id, "shared").to(CUDA)
        L = batch.doc_ids.numel()
        q, k, v = (
            torch.randn(1, h, L, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=grad)
            for h in (8, 2, 2)
        )
        with torch.set_grad_enabled(grad):
            out = flex_rows(q, k, v, block_mask(batch), None, None)
            if grad:
                out.sum().backward()

    for grad in (True, False):  # warm-up: two multi-block lengths per grad mode
        run(6, 0, grad)
        run(9, 1, grad)
    with torch.compiler.set_stance("fail_on_recompile"):
        for n, seed in ((12, 2), (17, 3), (30, 4), (45, 5)):  # ~3K to ~23K tokens
            for grad in (True, False):
                run(n, seed, grad)


@pytest.mark.parametrize("attn", CUDA_KERNELS)
def test_compiled_blocks_do_not_recompile_across_lengths(tok, attn):
    """``trainer.compile=true``: each decoder block compiled for dynamic lengths, the kernel
    inside; after two warm-up lengths per grad mode, new row lengths (and new longest segments)
    run without recompiling."""
    _runnable(attn)
    model = compile_blocks(_model(tok, attn))

    def run(n: int, seed: int, grad: bool) -> None:
        batch = collate_layout(_groups(n, seed), tok.pad_token_id, "shared").to(CUDA)
        with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype=torch.bfloat16):
            stats = group_stats(model, batch)
        if grad:
            stats.logps.sum().backward()

    for grad in (True, False):
        run(6, 0, grad)
        run(9, 1, grad)
    with torch.compiler.set_stance("fail_on_recompile"):
        for n, seed in ((12, 2), (17, 3), (30, 4)):
            for grad in (True, False):
                run(n, seed, grad)


@pytest.mark.parametrize("attn", CUDA_KERNELS)
def test_group_stats_has_no_host_sync(tok, attn):
    """The shared forward and backward never wait for the GPU (``set_sync_debug_mode`` raises
    on a synchronizing call): collated indices replace boolean gathers, host ints the lengths."""
    _runnable(attn)
    model = _model(tok, attn)
    batch = collate_layout(_groups(8, seed=2), tok.pad_token_id, "shared").to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # compile and look-ups outside the check
        stats = group_stats(model, batch)
    stats.logps.sum().backward()
    model.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            stats = group_stats(model, batch)
        stats.logps.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


PEAK_CEILING_GIB = 24.0


def _peak_at_16k(tok, attn: str) -> float:
    """GiB at a 16,384-token shared row: a SmolLM2-135M-shaped model (vocab 260 here, 30 layers,
    576 wide, 9/3 heads), bf16 autocast, activation checkpointing (the recipe's), forward and
    backward. Estimate: weights and gradients ~0.3 GiB, checkpoints 30 x 16K x 576 x 4 bytes
    ~1.1 GiB, one block recomputed ~1 GiB. A dense path would add (9, 16K, 16K) scores."""
    model = _model(
        tok,
        attn,
        checkpointing=True,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
    )
    grps, total, seed = [], 0, 3
    while total < 16384 - 1500:  # fill the budget with whole groups
        (g, idx), seed = _groups(1, seed)[0], seed + 1
        total += len(g.prompt_ids) + sum(map(len, g.response_ids))
        grps.append((g, idx))
    batch = collate_layout(grps, tok.pad_token_id, "shared").to(CUDA)
    assert batch.input_ids.shape[1] > 14000
    with torch.autocast("cuda", dtype=torch.bfloat16):  # warm-up: compile outside the count
        group_stats(model, batch, chunk_size=4096).logps.sum().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stats = group_stats(model, batch, chunk_size=4096)
    stats.logps.sum().backward()
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{attn}: peak {peak:.2f} GiB at {batch.input_ids.shape[1]} tokens")
    del model, stats
    torch.cuda.empty_cache()
    return peak


@pytest.mark.parametrize("attn", VARLEN_KERNELS)
def test_flash_peak_memory_at_16k_is_below_flex(tok, attn):
    """The FlashAttention path at a 16K-token shared micro-batch holds less than FlexAttention's
    (the prompt's K/V copies included), and both stay under 24 GiB."""
    _runnable(attn)
    flex_peak = _peak_at_16k(tok, "prefopt_flex")
    flash_peak = _peak_at_16k(tok, attn)
    assert flex_peak < PEAK_CEILING_GIB
    assert flash_peak < flex_peak, (flash_peak, flex_peak)


def test_recipe_banner_names_a_flash_kernel_on_this_gpu():
    """The done-when command's kernel on this machine: ``python -m prefopt.train
    loss=refa_dynamic model=mistral7b trainer.dry_run=true`` composes the shared layout in bf16;
    the registry's choice (the banner's line, without reading Mistral's config.json, which this
    machine cannot download) is a FlashAttention kernel: flash-attn's, or torch's built-in."""
    cfg = compose_config("train", "loss=refa_dynamic", "model=mistral7b", "trainer.dry_run=true")
    name = choose(cfg.model.attn_implementation, Target.of_trainer(cfg.trainer, "cuda"))
    line = kernel_description(name, cfg.trainer.layout, "cuda")
    print(line)
    assert name in VARLEN_KERNELS and "FlashAttention" in line, line
