"""transformers' side of the kernels: a batch as decoder keyword arguments for each kernel
family, and attention for inputs that carry no prefopt index (generation, left padding).

prefopt's kernels get the row's ``VarlenIndex`` as ``prefopt_varlen`` (and FlexAttention its
BlockMask as the mask); padded rows become causal segments of the row width. transformers'
own implementations get their masks: the padding mask, or a packed row's dense (L, L) mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from prefopt.data.collate import Batch
from prefopt.data.packing import PackedBatch, VarlenIndex
from prefopt.model.kernels import flex
from prefopt.model.kernels.masks import document_mask
from prefopt.model.kernels.varlen import segment_attention


def _rows(batch: Batch | PackedBatch) -> dict[str, Any]:
    if isinstance(batch, PackedBatch):
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    return {"input_ids": batch.input_ids}


def _index(batch: Batch | PackedBatch) -> VarlenIndex:
    if isinstance(batch, PackedBatch):
        if batch.varlen is None:
            raise ValueError("PackedBatch.varlen is missing: collate with packing.collate_packed")
        return batch.varlen
    N, T = batch.input_ids.shape
    return VarlenIndex.of_rows(N, T, batch.input_ids.device)


def _prepared(device: torch.device) -> Tensor:
    """An empty 4D mask: transformers takes a 4D mask as prepared and builds none (no (L, L)
    mask, no host sync to detect packed positions); prefopt's kernels read their index."""
    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


def varlen_inputs(batch: Batch | PackedBatch, dtype: torch.dtype) -> dict[str, Any]:
    mask = _prepared(batch.input_ids.device)
    return _rows(batch) | {"attention_mask": mask, "prefopt_varlen": _index(batch)}


def flex_inputs(batch: Batch | PackedBatch, dtype: torch.dtype) -> dict[str, Any]:
    if isinstance(batch, PackedBatch):
        mask = flex.block_mask(batch)
    else:
        mask = flex.causal_mask(batch.input_ids.shape[1], batch.input_ids.device)
    return _rows(batch) | {"attention_mask": mask, "prefopt_varlen": _index(batch)}


def dense_inputs(batch: Batch | PackedBatch, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' masks: the padding mask, or a packed row's dense (1, 1, L, L) mask (bool
    for SDPA, additive in the model's dtype for eager)."""
    if not isinstance(batch, PackedBatch):
        return _rows(batch) | {"attention_mask": batch.attention_mask}
    allowed = document_mask(batch)[None, None]
    if dtype == torch.bool:
        return _rows(batch) | {"attention_mask": allowed}
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return _rows(batch) | {"attention_mask": mask.masked_fill_(~allowed, torch.finfo(dtype).min)}


def sdpa_inputs(batch: Batch | PackedBatch, dtype: torch.dtype) -> dict[str, Any]:
    return dense_inputs(batch, torch.bool)


def hf_flash_inputs(batch: Batch | PackedBatch, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' flash-attn: whole documents by their boundaries (``cu_seqlens``)."""
    if not isinstance(batch, PackedBatch):
        return _rows(batch) | {"attention_mask": batch.attention_mask}
    if batch.shared:
        raise ValueError("flash_attention_2 separates documents only: not the shared layout")
    length = batch.max_seqlen  # given, so flash-attn does not sync to infer it
    return _rows(batch) | {
        "attention_mask": None,
        "cu_seq_lens_q": batch.cu_seqlens,
        "cu_seq_lens_k": batch.cu_seqlens,
        "max_length_q": length,
        "max_length_k": length,
    }


def hf_flex_inputs(batch: Batch | PackedBatch, dtype: torch.dtype) -> dict[str, Any]:
    if not isinstance(batch, PackedBatch):
        return _rows(batch) | {"attention_mask": batch.attention_mask}
    return _rows(batch) | {"attention_mask": flex.block_mask(batch)}


def dense_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    dropout: float,
    softcap: float | None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Inputs without prefopt's index (generation, left padding): SDPA with transformers' mask;
    with a softcap explicit scores, as transformers' eager Gemma-2 attention."""
    if not softcap:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if attention_mask is None:
        out = segment_attention(query, key, value, scaling, softcap)
    else:
        scores = query @ key.transpose(-1, -2) * scaling
        scores = softcap * torch.tanh(scores / softcap)
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
        out = scores.softmax(-1, dtype=torch.float32).to(query.dtype) @ value
    return out.transpose(1, 2).contiguous(), None
