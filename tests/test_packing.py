# .venv/bin/pytest tests/test_packing.py -q
"""Packed and prompt-shared layouts against the padded layout and a naive full-logits forward."""

from __future__ import annotations

import copy
import functools

import datasets
import pytest
import torch
from conftest import naive_stats
from omegaconf import OmegaConf
from torch.nn.attention.flex_attention import flex_attention
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.models.llama import modeling_llama

from prefopt.config import ModelConfig
from prefopt.data.batching import (
    Batching,
    ViewSize,
    budget_batches,
    plan_micro_batches,
    view_size,
)
from prefopt.data.collate import collate
from prefopt.data.packing import PackedBatch, collate_layout, doc_blocks
from prefopt.data.tokenize import TokenizedGroup
from prefopt.losses import get_spec
from prefopt.model.attention import decoder_inputs
from prefopt.model.kernels.flex import block_mask
from prefopt.model.kernels.masks import document_mask, document_mask_mod
from prefopt.model.kernels.varlen import sdpa_segments, varlen_attention
from prefopt.model.load import load_model, tiny_tokenizer
from prefopt.model.logprobs import group_stats, sequence_kl

LAYOUTS = ["packed", "shared"]
ATTN = ["eager", "sdpa", "prefopt_varlen_ref"]  # dense reference masks, and the varlen CPU kernel
TOL = dict(rtol=1e-12, atol=1e-12)


def _rms_norm(self, h: torch.Tensor) -> torch.Tensor:
    return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    scores = query @ key.transpose(2, 3) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


@pytest.fixture(autouse=True, scope="module")
def full_precision_llama():
    """transformers' Llama rounds RMSNorm and the eager softmax through fp32 even in an fp64
    model, which turns 1e-16 reordering differences into 1e-8 gradient noise; the layouts are
    compared in true fp64 instead (same math, input dtype kept)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm)
        mp.setattr(modeling_llama, "eager_attention_forward", _eager_attention)
        yield


@functools.cache
def _model(attn: str):
    cfg = OmegaConf.structured(
        ModelConfig(name_or_path="tiny", source="tiny", attn_implementation=attn)
    )
    return load_model(cfg, "/nonexistent", tiny_tokenizer(), seed=0).double()


@pytest.fixture(params=ATTN)
def model(request):
    return _model(request.param)


def groups(tok) -> list[tuple[TokenizedGroup, tuple[int, ...]]]:
    """K = 3 with a truncated response, K = 2 in view order (2, 0), K = 1, cached ref fields."""
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 250, (n,), generator=g).tolist()

    eos, bos = tok.eos_token_id, tok.bos_token_id
    a = TokenizedGroup(
        [bos, *ids(5)],
        [ids(3) + [eos], ids(7) + [eos], ids(2)],
        [True, True, False],
        [1.0, 2.0, 0.0],
        ref_logps=[-1.0, -2.0, -3.0],
        ref_eos_logps=[-0.1, -0.2, -0.3],
    )
    b = TokenizedGroup(
        [bos, *ids(9)],
        [ids(1) + [eos], ids(4) + [eos], ids(6) + [eos]],
        [True, True, True],
        [3.0, 1.0, 2.0],
        ref_logps=[-4.0, -5.0, -6.0],
        ref_eos_logps=[-0.4, -0.5, -0.6],
    )
    c = TokenizedGroup(
        [bos, *ids(3)], [ids(4)], [False], [0.5], ref_logps=[-7.0], ref_eos_logps=[-0.7]
    )
    return [(a, (0, 1, 2)), (b, (2, 0)), (c, (0,))]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_stats_field_equals_padded_and_naive(model, tok, layout):
    grps = groups(tok)
    padded = collate(grps, tok.pad_token_id)
    batch = collate_layout(grps, tok.pad_token_id, layout)
    assert isinstance(batch, PackedBatch)
    for name in ("scores", "mask", "has_eos", "ref_logps", "ref_eos_logps"):  # (B, K) fields
        assert torch.equal(getattr(batch, name), getattr(padded, name)), name
    with torch.no_grad():
        ref, got = group_stats(model, padded, chunk_size=4), group_stats(model, batch, chunk_size=3)
        logps, lengths, last = naive_stats(model, grps)
    m = padded.mask
    assert m.tolist() == [[True] * 3, [True, True, False], [True, False, False]]
    for name in ("logps", "lengths", "eos_logps"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), **TOL)
    torch.testing.assert_close(got.logps[m], logps[m], **TOL)
    torch.testing.assert_close(got.eos_logps[m], last[m], **TOL)
    torch.testing.assert_close(got.lengths, lengths)
    assert torch.equal(got.has_eos, ref.has_eos) and torch.equal(got.mask, ref.mask)
    assert got.has_eos.tolist() == [[True, True, False], [True, True, False], [False] * 3]
    assert got.logps[1, 2] == 0 and got.lengths[1, 2] == 1  # empty slot: finite filler


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_equal_padded(model, tok, layout):
    grps = groups(tok)
    w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(batch) -> list[torch.Tensor]:
        model.zero_grad()
        stats = group_stats(model, batch, chunk_size=5)
        (stats.logps * w + stats.eos_logps.exp() * w.flip(0)).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads(collate(grps, tok.pad_token_id))
    got = grads(collate_layout(grps, tok.pad_token_id, layout))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_loss_end_to_end(tok, layout):
    """refa_dynamic (K-way, EOS regularizer) gives the same losses and gradients."""
    model = _model("sdpa")
    spec = get_spec("refa_dynamic")
    loss_fn = functools.partial(spec.fn, **spec.hparams(spec.config_cls()))
    grps = groups(tok)[:2]

    def run(batch):
        model.zero_grad()
        out = loss_fn(group_stats(model, batch), None, batch.scores)
        out.losses[out.valid].sum().backward()
        return out.losses.detach(), [p.grad.clone() for p in model.parameters()]

    ref_losses, ref_grads = run(collate(grps, tok.pad_token_id))
    losses, got_grads = run(collate_layout(grps, tok.pad_token_id, layout))
    torch.testing.assert_close(losses, ref_losses, **TOL)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_kl_in_every_layout(tok, layout):
    model = _model("sdpa")
    grps = groups(tok)
    padded = collate(grps, tok.pad_token_id)
    batch = collate_layout(grps, tok.pad_token_id, layout)
    other = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        kl = sequence_kl(model, other, batch, chunk_size=3)
        torch.testing.assert_close(kl, sequence_kl(model, other, padded), **TOL)


def test_positions_restart_and_token_counts(tok):
    p, r0, r1 = [1, 10, 11], [20, 21, 3], [30, 3]
    grps = [
        (TokenizedGroup(p, [r0, r1], [True, True], [1.0, 0.0]), (0, 1)),
        (TokenizedGroup([1, 12], [[40, 3]], [True], [0.0]), (0,)),
    ]
    packed = collate_layout(grps, tok.pad_token_id, "packed")
    shared = collate_layout(grps, tok.pad_token_id, "shared")
    assert packed.input_ids[0].tolist() == [*p, *r0, *p, *r1, 1, 12, 40, 3]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packed.cu_seqlens.tolist() == [0, 6, 11, 15] and packed.max_seqlen == 6
    assert shared.input_ids[0].tolist() == [*p, *r0, *r1, 1, 12, 40, 3]
    # response 1 continues from the prompt's end (3), not from response 0's end
    assert shared.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 2, 3]
    assert shared.branch_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 0, 0, 1, 1]
    # the first token of every response is predicted from its prompt's last position
    assert shared.target_index.tolist() == [2, 3, 4, 2, 6, 9, 10]
    assert shared.targets.tolist() == [*r0, *r1, 40, 3]
    padded = collate(grps, tok.pad_token_id)
    assert packed.num_tokens == shared.num_tokens == padded.num_tokens == 15
    assert (packed.forward_tokens, shared.forward_tokens, padded.forward_tokens) == (15, 12, 18)


def test_mask_forbids_cross_document_and_cross_response(tok):
    grps = groups(tok)
    for layout in LAYOUTS:
        batch = collate_layout(grps, tok.pad_token_id, layout)
        mask = document_mask(batch)
        doc, branch = batch.doc_ids.tolist(), batch.branch_ids.tolist()
        L = len(doc)
        for i in range(L):
            for j in range(L):
                ok = j <= i and doc[i] == doc[j] and branch[j] in (0, branch[i])
                assert bool(mask[i, j]) == ok, (layout, i, j)
        assert mask.diagonal().all()  # every token sees itself: no empty softmax row
        if layout == "shared":  # spot checks: the second response never sees the first
            r0 = (batch.doc_ids == 0) & (batch.branch_ids == 1)
            r1 = (batch.doc_ids == 0) & (batch.branch_ids == 2)
            prompt = (batch.doc_ids == 0) & (batch.branch_ids == 0)
            assert not mask[r1][:, r0].any() and not mask[r0][:, r1].any()
            assert mask[r1][:, prompt].all() and mask[r0][:, prompt].all()
        assert not mask[batch.doc_ids == 1][:, batch.doc_ids == 0].any()
        # FlexAttention's mask_mod states the same rule, also on the block padding past L
        from torch.nn.attention.flex_attention import create_mask

        pad = 128 - L % 128
        flex = create_mask(document_mask_mod(batch), 1, 1, L + pad, L + pad, device="cpu")[0, 0]
        assert torch.equal(flex[:L, :L], mask) and not flex[L:, :L].any()


def test_flash_inputs_are_varlen_and_refuse_shared(tok):
    """transformers' own flash_attention_2 reads whole documents (cu_seqlens), so the registry
    builds those inputs for packed rows and refuses shared ones."""
    packed = collate_layout(groups(tok), tok.pad_token_id, "packed")
    kw = decoder_inputs("flash_attention_2", packed, torch.float32)
    assert kw["attention_mask"] is None and kw["cu_seq_lens_q"] is packed.cu_seqlens
    assert kw["max_length_k"] == packed.max_seqlen and "position_ids" in kw
    shared = collate_layout(groups(tok), tok.pad_token_id, "shared")
    with pytest.raises(ValueError, match="shared"):
        decoder_inputs("flash_attention_2", shared, torch.float32)


def _check_plan(plan, sizes, budget, layout, splits=1):
    assert sorted(i for mb in plan for i in mb) == list(range(len(sizes)))  # each exactly once
    assert len(plan) % splits == 0
    for mb in plan:
        rows, width = sum(sizes[i].rows for i in mb), max(sizes[i].width for i in mb)
        cost = rows * width if layout == "padded" else sum(sizes[i].tokens for i in mb)
        assert cost <= budget or len(mb) == 1, (mb, cost)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_token_budget_plan_is_deterministic_and_exhaustive(layout):
    g = torch.Generator().manual_seed(0)
    sizes = [
        ViewSize(int(t), int(r), int(w))
        for t, r, w in zip(
            torch.randint(50, 900, (64,), generator=g),
            torch.randint(1, 5, (64,), generator=g),
            torch.randint(20, 300, (64,), generator=g),
            strict=True,
        )
    ]
    sizes[5] = ViewSize(5000, 4, 1500)  # over the budget: a micro-batch of its own
    plan = plan_micro_batches(sizes, 2048, layout)
    assert plan == plan_micro_batches(list(sizes), 2048, layout)  # same input, same plan
    _check_plan(plan, sizes, 2048, layout)
    assert [5] in plan
    for splits in (2, 3, 8):
        _check_plan(plan_micro_batches(sizes, 2048, layout, splits), sizes, 2048, layout, splits)
    if layout != "padded":  # first-fit decreasing: at most one micro-batch less than half full
        loads = [sum(sizes[i].tokens for i in mb) for mb in plan]
        assert sum(load <= 1024 for load in loads) <= 1
    with pytest.raises(ValueError):
        plan_micro_batches(sizes[:3], 1, layout, num_splits=4)


def test_budget_batches_split_a_step_across_ranks(tok):
    grps = [(g, idx) for g, idx in groups(tok)] * 3
    data = datasets.Dataset.from_dict(
        {
            k: [getattr(g, k) for g, _ in grps]
            for k in ("prompt_ids", "response_ids", "has_eos", "scores", "id")
        }
    )
    views = [(i, idx) for i, (_, idx) in enumerate(grps)]
    order = [4, 0, 7, 2, 8, 1, 3, 6, 5]
    sizes = [view_size(grps[i][0], grps[i][1], "shared") for i in order]
    assert sizes[0] == ViewSize(10 + 2 + 7, 2, 17)  # view 4: prompt 10, responses (3)->7, (0)->2
    seen = []
    for rank in (0, 1):
        how = Batching("shared", tok.pad_token_id, "cpu", rank=rank, world_size=2)
        for mb in budget_batches(data, views, order, 30, how):
            assert mb.forward_tokens <= 30 or mb.num_groups == 1
            bounds = mb.cu_seqlens.tolist()  # one document per group in the shared layout
            seen += [
                tuple(mb.input_ids[0, a:b].tolist())
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
    expected = [
        tuple(grps[i][0].prompt_ids + sum((grps[i][0].response_ids[r] for r in grps[i][1]), []))
        for i in order
    ]
    assert sorted(seen) == sorted(expected)  # every view of the step once, over both ranks


def _blocks_of(dense: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nb, nb) blocks of a dense (L, L) mask holding any / only allowed pairs (real rows)."""
    L = dense.shape[0]
    nb = -(-L // block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.int8)
    padded[:L, :L] = dense
    tiles = padded.view(nb, block, nb, block).transpose(1, 2)  # (nb, nb, block, block)
    real = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    real[:L, :L] = True
    real = real.view(nb, block, nb, block).transpose(1, 2)
    return tiles.amax((2, 3)) > 0, ((tiles > 0) | ~real).all(-1).all(-1)


def _selected(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    nb = counts.shape[-1]
    sel = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        sel[i, indices[0, 0, i, : counts[0, 0, i]].long()] = True
    return sel


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block", [2, 4, 8])
def test_doc_blocks_are_exact_at_block_granularity(tok, layout, block):
    """Skipped key blocks hold no allowed pair, full blocks only allowed pairs, against the dense
    mask; at block 4 the counts are the hand-countable ones of this row."""
    batch = collate_layout(groups(tok), tok.pad_token_id, layout)
    b = doc_blocks(batch.doc_ids, batch.branch_ids, block)
    partial, full = _selected(*b[:2]), _selected(*b[2:])
    any_allowed, all_allowed = _blocks_of(document_mask(batch), block)
    assert not (partial & full).any()
    assert torch.equal(any_allowed & ~(partial | full), torch.zeros_like(any_allowed))  # exact
    assert not (full & ~all_allowed).any()  # a full block needs no mask
    # and tight here: every computed block holds an allowed pair
    assert torch.equal(partial | full, any_allowed)
    if block == 4:  # 69 (packed) / 47 (shared) tokens: 18 / 12 blocks, 171 / 78 causal pairs
        computed, nb = int((partial | full).sum()), len(partial)
        assert (nb, computed) == {"packed": (18, 47), "shared": (12, 35)}[layout]
        assert computed < nb * (nb + 1) / 2 / 2  # under half the causal tiles run


def test_doc_blocks_skip_a_sibling_response(tok):
    """Shared prompt, two long responses: response 2's blocks skip response 1's whole blocks."""
    g = TokenizedGroup(
        [1, 2, 3, 4], [list(range(10, 22)), list(range(30, 42))], [False] * 2, [1.0, 0.0]
    )
    batch = collate_layout([(g, (0, 1))], tok.pad_token_id, "shared")  # 4 + 12 + 12 tokens
    b = doc_blocks(batch.doc_ids, batch.branch_ids, 4)
    partial, full = _selected(*b[:2]), _selected(*b[2:])
    # blocks: 0 prompt, 1-3 response 1, 4-6 response 2
    assert (partial | full)[4:, 1:4].sum() == 0
    assert full[5, 4] and full[6, 4] and full[2, 1] and full[4:, 0].all()
    assert partial.diagonal().all() and not full.diagonal().any()


def test_block_mask_is_built_once_per_micro_batch(tok):
    batch = collate_layout(groups(tok), tok.pad_token_id, "shared")
    assert block_mask(batch) is block_mask(batch)  # policy and reference forwards share it
    other = collate_layout(groups(tok), tok.pad_token_id, "shared")
    assert block_mask(other) is not block_mask(batch)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_varlen_segments_equal_dense_mask(tok, layout):
    """The varlen plumbing (segment offsets, the gathered [prompt; response] keys) through the
    CPU reference equals one dense-masked SDPA over the row, GQA included."""
    batch = collate_layout(groups(tok), tok.pad_token_id, layout)
    L = batch.doc_ids.numel()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    got = varlen_attention(sdpa_segments, q, k, v, batch.varlen, 0.3, None).transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(
        q,
        k.repeat_interleave(2, 1),
        v.repeat_interleave(2, 1),
        attn_mask=document_mask(batch),
        scale=0.3,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert int(batch.varlen.cu_q[-1]) == L  # the segments cover the row
    assert (batch.varlen.kv_index is None) == (layout == "packed")  # packed: no gather


def test_flex_block_mask_equals_dense_mask(tok):
    """The FlexAttention kernel (the CUDA path) over the collated BlockMask, on CPU: forward only,
    fp32 (CPU flex has no backward), a shared row of 5 blocks with partial, full and skipped ones.
    Compiled statically here: inductor's CPU flex template fails to build for symbolic lengths
    (torch 2.13); the dynamic CUDA compile is tests/gpu's."""
    g = torch.Generator().manual_seed(0)
    long = TokenizedGroup(
        torch.randint(0, 250, (300,), generator=g).tolist(),
        [list(range(150)), list(range(140))],
        [False] * 2,
        [1.0, 0.0],
    )
    batch = collate_layout([(long, (0, 1)), *groups(tok)], tok.pad_token_id, "shared")
    L = batch.doc_ids.numel()  # 637: 5 blocks
    assert int(batch.blocks.full_kv_num_blocks.sum()) > 0
    q, k, v = (torch.randn(1, h, L, 16, generator=g) for h in (4, 2, 2))
    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    got = flex(q, k, v, block_mask=block_mask(batch), scale=0.25, enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q,
        k.repeat_interleave(2, 1),
        v.repeat_interleave(2, 1),
        attn_mask=document_mask(batch),
        scale=0.25,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flex_attention_block_mask_matches_padded(tok):
    """transformers' FlexAttention implementation reads the same BlockMask: statistics of a
    tiny model on CPU (forward, fp32) equal the padded layout's."""
    cfg = ModelConfig(name_or_path="tiny", source="tiny", attn_implementation="sdpa")
    ref = load_model(OmegaConf.structured(cfg), "/nonexistent", tok, seed=0)
    flex = copy.deepcopy(ref)  # the registry serves flex_attention on CUDA only (no CPU backward)
    flex.config._attn_implementation = "flex_attention"
    grps = groups(tok)
    with torch.no_grad():
        want = group_stats(ref, collate(grps, tok.pad_token_id))
        for layout in LAYOUTS:
            got = group_stats(flex, collate_layout(grps, tok.pad_token_id, layout))
            torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-5)


class _Watch(TorchDispatchMode):
    """Records the largest tensor any op returns and the ops that wait for the device (a
    scalar read, a data-dependent output size, a boolean-mask index)."""

    SYNCS = (
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten.repeat_interleave.Tensor",
    )

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_flatten(args)[0]
        )
        if bool_index or name.startswith(self.SYNCS):
            self.syncs.append(name)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _training_row(tok, layout: str):
    """Eight groups at the CPU benchmark's lengths (prompts ~90, responses ~175): ~4K tokens."""
    g = torch.Generator().manual_seed(0)
    grps = []
    for i in range(8):
        p, r0, r1 = 60 + 9 * i, 120 + 17 * i, 200 - 11 * i
        prompt = torch.randint(0, 250, (p,), generator=g).tolist()
        responses = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (r0, r1)]
        grps.append((TokenizedGroup(prompt, responses, [False] * 2, [1.0, 0.0]), (0, 1)))
    return collate_layout(grps, tok.pad_token_id, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_dense_mask_or_host_sync_at_training_length(tok, layout):
    """The varlen CPU kernel at a 4K-token row: no tensor of even L^2 / 16 elements is created in
    forward or backward, no op syncs with the host; the dense sdpa control makes (L, L)."""
    batch = _training_row(tok, layout)
    L = batch.input_ids.shape[1]
    assert L > 3000
    for attn, dense in (("prefopt_varlen_ref", False), ("sdpa", True)):
        cfg = ModelConfig(name_or_path="tiny", source="tiny", attn_implementation=attn)
        model = load_model(OmegaConf.structured(cfg), "/nonexistent", tok, seed=0)
        with _Watch() as watch:
            stats = group_stats(model, batch, chunk_size=1024)
            stats.logps.sum().backward()
        assert (watch.largest >= L * L) == dense, (attn, watch.largest, L * L)
        if not dense:
            assert watch.largest < L * L / 16
            assert watch.syncs == [], sorted(set(watch.syncs))
