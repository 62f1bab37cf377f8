"""Attention kernels for each batch layout, and which one ``auto`` picks.

The packed layouts (``prefopt.data.packing``) put many documents in one row; attention must stay
inside each document (and, with shared prompts, inside each response). A dense (L, L) mask
computes every tile of the row, although with ~500-token documents in a 16K row about 2% of the
tiles hold allowed pairs. The kernels here skip the rest, exactly:

- ``flash_attention_2``: flash-attn's varlen kernel over ``cu_seqlens`` (``packed`` only: it
  cannot express a shared prompt), when flash-attn is installed.
- ``prefopt_docs`` (registered with transformers' ``AttentionInterface``): on CUDA, FlexAttention
  with a ``BlockMask`` built from the document boundaries at collate time
  (``packing.doc_blocks``), compiled once for dynamic lengths; on CPU, where FlexAttention has no
  backward (torch 2.13), one SDPA call per document span (``PackedBatch.spans``). Other inputs
  (padded rows, generation) go to transformers' SDPA unchanged.
- ``sdpa`` / ``eager`` with the dense ``document_mask``: the reference path of the tests.

``kernel_description`` says in one line what a run uses (for the run banner).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prefopt.data.packing import FLEX_BLOCK, PackedBatch, Span, document_mask_mod

DOCS = "prefopt_docs"
FLASH = "flash_attention_2"


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_kernel(requested: str, layout: str | None = None) -> str:
    """The attention implementation for ``trainer.layout``: ``requested`` unless it is ``auto``.

    ``auto``: flash-attn varlen where installed and the layout is known to allow it (padded or
    packed), otherwise ``prefopt_docs`` (tile-skipping for packed rows, SDPA for padded ones),
    which serves every layout: the choice when the caller does not say which.
    """
    if requested != "auto":
        return requested
    return FLASH if flash_attn_installed() and layout in ("padded", "packed") else DOCS


def kernel_description(impl: str, layout: str, device: torch.device | str) -> str:
    """One line for the run banner: the kernel that runs this layout's attention."""
    dev = torch.device(device).type
    if layout == "padded":
        what = {FLASH: "flash-attn (unpadded)", DOCS: "SDPA with a padding mask"}.get(impl, impl)
    elif impl == FLASH:
        what = "flash-attn varlen over document boundaries"
    elif impl == DOCS:
        what = (
            "FlexAttention, BlockMask from document boundaries (compiled, dynamic lengths)"
            if dev == "cuda"
            else "SDPA per document span (FlexAttention has no CPU backward)"
        )
    elif impl in ("sdpa", "eager"):
        what = f"{impl} with a dense (L, L) document mask (reference path: computes every tile)"
    else:
        what = impl
    return f"attention: {impl} for {layout} rows on {dev}: {what}"


# ---- CUDA: FlexAttention over a BlockMask built from document boundaries ----

_compiled_flex: Callable[..., Tensor] | None = None
_block_masks: list[tuple[Tensor, BlockMask]] = []  # the last few micro-batches' masks


def compiled_flex() -> Callable[..., Tensor]:
    """FlexAttention compiled once, for symbolic lengths (a new row length does not recompile).

    ``fullgraph=True`` turns what would silently run the unfused (L, L) eager fallback (a graph
    break, or dynamo's ``recompile_limit``, 8 per code object) into an error
    (``FailOnRecompileLimitHit``): at 16K tokens that fallback runs out of memory. A run needs
    about four graphs: grad on (policy) and off (reference, eval), each also specialised for
    single-block rows. transformers' own ``flex_attention`` (5.x ``WrappedFlexAttention``)
    compiles with automatic dynamic shapes (a static graph first, then a dynamic one), always
    passes a ``score_mod``, repeats K/V for head counts that are not powers of two (SmolLM2's 9),
    and past the limit warns and runs eager.
    """
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True, fullgraph=True)
    return _compiled_flex


def block_mask(batch: PackedBatch) -> BlockMask:
    """The batch's BlockMask, made once per micro-batch from the collated ``blocks`` and shared by
    every forward over it (policy, reference, KTO's extra rows): a cache keyed by the batch's own
    ``doc_ids`` tensor, so a new micro-batch never hits an old entry."""
    for doc_ids, mask in _block_masks:
        if doc_ids is batch.doc_ids:
            return mask
    if batch.blocks is None:
        raise ValueError("PackedBatch.blocks is missing: collate with packing.collate_packed")
    L = batch.doc_ids.numel()
    mask = BlockMask.from_kv_blocks(
        *batch.blocks, BLOCK_SIZE=FLEX_BLOCK, mask_mod=document_mask_mod(batch), seq_lengths=(L, L)
    )
    _block_masks[:] = [*_block_masks[-3:], (batch.doc_ids, mask)]
    return mask


# ---- CPU: one SDPA call per document span ----


def span_attention(
    query: Tensor, key: Tensor, value: Tensor, spans: tuple[Span, ...], scale: float | None
) -> Tensor:
    """(1, H, L, D) attention over (1, H_kv, L, D) keys, one span at a time: queries
    [qs, qe) see keys [cs, ce) whole and [qs, qe) causally. Work and memory follow the
    documents (sum of span x (span + context)), not L^2."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # CPU SDPA takes its fused path without enable_gqa
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = []
    for qs, qe, cs, ce in spans:
        q, k, v = query[:, :, qs:qe], key[:, :, qs:qe], value[:, :, qs:qe]
        if cs == ce:
            out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
            continue
        k = torch.cat([key[:, :, cs:ce], k], 2)
        v = torch.cat([value[:, :, cs:ce], v], 2)
        mask = torch.ones(qe - qs, ce - cs + qe - qs, dtype=torch.bool, device=q.device)
        out.append(
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask.tril_(ce - cs), scale=scale)
        )
    return torch.cat(out, 2)


def document_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | BlockMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function of ``prefopt_docs``: (1, L, H, D) output.

    A packed row arrives with its BlockMask (``attention_inputs``); on CPU also with its spans.
    """
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError("prefopt_docs attention has no dropout; set attention_dropout=0")
    spans = kwargs.get("prefopt_spans")
    if spans is not None:
        out = span_attention(query, key, value, spans, scaling)
    else:
        flex = flex_attention if torch.compiler.is_dynamo_compiling() else compiled_flex()
        out = flex(
            query,
            key,
            value,
            block_mask=attention_mask,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DOCS, document_attention)
AttentionMaskInterface.register(DOCS, sdpa_mask)  # padded rows and generation: SDPA's masks


def attention_inputs(impl: str, batch: PackedBatch) -> dict[str, Any]:
    """The mask keyword arguments of a packed row for ``prefopt_docs`` (or transformers' own
    ``flex_attention``, which accepts the same BlockMask)."""
    kwargs: dict[str, Any] = {"attention_mask": block_mask(batch)}
    if impl == DOCS and batch.input_ids.device.type != "cuda":
        kwargs["prefopt_spans"] = batch.spans
    return kwargs
