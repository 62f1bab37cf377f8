"""FlexAttention over a ``BlockMask`` built from document boundaries (CUDA).

The whole row in one call: collation writes the block sparsity (``packing.doc_blocks``), so the
kernel skips every 128 x 128 tile no query of it may see and evaluates the mask only on tiles that
are partly visible. A logit softcap (Gemma-2) is a ``score_mod``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from prefopt.data.packing import FLEX_BLOCK, PackedBatch
from prefopt.model.kernels.masks import document_mask_mod

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


def _causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    return kv <= q


@functools.lru_cache(maxsize=8)
def causal_mask(width: int, device: torch.device) -> BlockMask:
    """Causal rows of ``width`` (the padded layout: right padding, so causal attention keeps it
    out of every real position), one mask broadcast over the rows."""
    return create_block_mask(_causal, None, None, width, width, device=device)


@functools.cache
def softcap_mod(cap: float) -> Callable[..., Tensor]:
    """Gemma-2's attention-logit softcap as a ``score_mod`` (one function per value, so the
    compiled kernel is reused)."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return cap * torch.tanh(score / cap)

    return score_mod


def flex_rows(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: BlockMask,
    scale: float | None,
    softcap: float | None,
) -> Tensor:
    """(B, H, L, D) attention under ``mask``; the (B, L, H, D) output transformers expects."""
    flex = flex_attention if torch.compiler.is_dynamo_compiling() else compiled_flex()
    out = flex(
        query,
        key,
        value,
        score_mod=softcap_mod(float(softcap)) if softcap else None,
        block_mask=mask,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)
