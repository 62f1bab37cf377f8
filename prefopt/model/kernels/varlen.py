"""Variable-length kernels: one call over a row's segments (``packing.VarlenIndex``).

Every kernel here takes the same inputs, built by the same plumbing (``varlen_attention``):
queries (Tq, H, D) in row order, keys and values (Tk, H_kv, D) gathered by the index (a shared
prompt's keys and values are copied once per response, never recomputed), the segment offsets
``cu_q`` and ``cu_k`` and the longest segment's lengths; causal aligned at the bottom right. So
the CPU reference, which runs SDPA segment by segment, checks the index that the CUDA kernels
read:

- ``sdpa_segments``: the reference (CPU; on CUDA it reads the offsets on the host); applies a
  logit softcap through explicit scores;
- ``flash_attn_segments``: flash-attn's ``flash_attn_varlen_func`` (FlashAttention-3's interface
  on Hopper where installed, else flash-attn 2.x); applies the softcap;
- ``torch_segments``: torch's own ``torch.nn.attention.varlen.varlen_attn`` (its built-in
  FlashAttention-2, or FlashAttention-3/4 once ``activate_flash_attention_impl`` swapped them in);
  no softcap.

Availability is asked of transformers and torch (installed distributions and versions, the GPU),
never of a module name: the flash-attn-4 wheel installs only the namespace ``flash_attn/cute``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.data.packing import VarlenIndex

try:  # torch >= 2.10
    from torch.nn.attention import varlen as torch_varlen
except ImportError:  # pragma: no cover  (torch_varlen_ready says why the kernel is absent)
    torch_varlen = None

log = logging.getLogger(__name__)

# (q (Tq, H, D), k (Tk, H_kv, D), v, index, scale, softcap) -> (Tq, H, D)
SegmentsFn = Callable[[Tensor, Tensor, Tensor, VarlenIndex, float | None, float | None], Tensor]


def varlen_attention(
    fn: SegmentsFn,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    index: VarlenIndex,
    scale: float | None,
    softcap: float | None,
) -> Tensor:
    """transformers' (B, H, T, D) tensors (B = 1 for a packed row, the rows for padded ones)
    through ``fn``: the (B, T, H, D) output transformers expects back."""
    B, H, T, D = query.shape
    q = query.transpose(1, 2).reshape(B * T, H, D)
    k = key.transpose(1, 2).reshape(B * T, -1, D)
    v = value.transpose(1, 2).reshape(B * T, -1, D)
    if index.kv_index is not None:  # [prompt; response] keys: a gather, no host sync
        k, v = k.index_select(0, index.kv_index), v.index_select(0, index.kv_index)
    return fn(q, k, v, index, scale, softcap).view(B, T, H, D)


# ---- the reference: SDPA per segment ----


def sdpa_segments(
    q: Tensor, k: Tensor, v: Tensor, index: VarlenIndex, scale: float | None, softcap: float | None
) -> Tensor:
    """One attention per segment, read from the offsets on the host (a CPU kernel). Work and
    memory follow the segments (sum of queries x keys), never the row's L^2."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # CPU SDPA takes its fused path without enable_gqa
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    cu_q, cu_k = index.cu_q.tolist(), index.cu_k.tolist()
    S, (T, H, D) = len(cu_q) - 1, q.shape
    if index.kv_index is None and S * index.max_q == T:  # equal segments (padded rows): batched
        q, k, v = (t.view(S, index.max_q, H, D).transpose(1, 2) for t in (q, k, v))
        return segment_attention(q, k, v, scale, softcap).transpose(1, 2).reshape(T, H, D)
    out = []
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s] : cu_q[s + 1]].transpose(0, 1)  # (H, Rq, D)
        ks = k[cu_k[s] : cu_k[s + 1]].transpose(0, 1)  # (H, Rk, D), Rk >= Rq
        vs = v[cu_k[s] : cu_k[s + 1]].transpose(0, 1)
        out.append(segment_attention(qs, ks, vs, scale, softcap).transpose(0, 1))
    return torch.cat(out)


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, softcap: float | None
) -> Tensor:
    """(..., Rq, D) queries over (..., Rk, D) keys, causal at the bottom right: query i sees
    keys j <= i + Rk - Rq. With a softcap (Gemma-2: cap * tanh(score / cap) before the
    softmax), explicit scores, as transformers' eager Gemma-2 attention computes them."""
    Rq, Rk = q.shape[-2], k.shape[-2]
    if not softcap and Rq == Rk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    visible = torch.ones(Rq, Rk, dtype=torch.bool, device=q.device).tril_(Rk - Rq)
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


# ---- CUDA: flash-attn and torch's varlen_attn ----


def half_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """FlashAttention computes in bf16/fp16. Under autocast, RoPE can hand fp32 queries over
    (fp32 cos/sin): cast them to the autocast dtype, as transformers' flash path does."""
    if tensors[0].dtype in (torch.bfloat16, torch.float16):
        return tensors
    if not torch.is_autocast_enabled("cuda"):
        raise ValueError(
            f"FlashAttention needs bf16 or fp16 inputs, got {tensors[0].dtype}: "
            "train with trainer.precision=bf16, or pick a kernel that runs fp32 "
            "(model.attn_implementation=prefopt_flex)"
        )
    dtype = torch.get_autocast_dtype("cuda")
    return tuple(t.to(dtype) for t in tensors)


@functools.cache
def flash_attn_engine() -> tuple[str, Callable] | None:
    """(name, ``flash_attn_varlen_func``) of the installed flash-attn that serves this GPU:
    FlashAttention-3 (``flash_attn_interface``) on Hopper, else flash-attn >= 2.6 (the first
    with softcap; bottom-right causal since 2.1). None without one. Availability as
    transformers reports it (distributions and versions), so a namespace package is not one."""
    from transformers.utils import (
        is_flash_attn_2_available,
        is_flash_attn_3_available,
        is_flash_attn_greater_or_equal,
    )

    if not torch.cuda.is_available():
        return None
    if is_flash_attn_3_available() and torch.cuda.get_device_capability()[0] == 9:
        from flash_attn_interface import flash_attn_varlen_func

        return "FlashAttention-3 (flash_attn_interface)", flash_attn_varlen_func
    if is_flash_attn_2_available() and is_flash_attn_greater_or_equal("2.6.0"):
        from flash_attn import __version__, flash_attn_varlen_func

        return f"FlashAttention-2 (flash-attn {__version__})", flash_attn_varlen_func
    return None


_flash_fn: Callable | None = None  # set by ``use_flash_attn`` before the first (compiled) call


def use_flash_attn() -> None:
    """Look the flash-attn function up once, outside compiled code (a cached lookup inside a
    compiled block would break its graph)."""
    global _flash_fn
    engine = flash_attn_engine()
    if engine is None:
        raise RuntimeError("prefopt_varlen_fa: no flash-attn for this GPU (see its banner line)")
    _flash_fn = engine[1]


def flash_attn_segments(
    q: Tensor, k: Tensor, v: Tensor, index: VarlenIndex, scale: float | None, softcap: float | None
) -> Tensor:
    if _flash_fn is None:
        use_flash_attn()
    q, k, v = half_inputs(q, k, v)
    cap = {"softcap": softcap} if softcap else {}
    out = _flash_fn(
        q,
        k,
        v,
        index.cu_q,
        index.cu_k,
        index.max_q,
        index.max_k,
        softmax_scale=scale,
        causal=True,  # flash-attn >= 2.1: aligned at the bottom right when Rk > Rq
        **cap,
    )
    return out[0] if isinstance(out, tuple) else out  # some FlashAttention-3 builds add the LSE


def torch_varlen_ready() -> str | None:
    """None when torch's varlen flash attention runs here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if torch_varlen is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    parameters = inspect.signature(torch_varlen.varlen_attn).parameters
    if not {"window_size", "enable_gqa", "scale"} <= set(parameters):  # torch >= 2.13's API
        return f"torch {torch.__version__}'s varlen_attn takes no window_size/enable_gqa/scale"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    if torch.cuda.get_device_capability() < (8, 0):
        return "FlashAttention needs an Ampere or newer GPU (compute capability >= 8.0)"
    return None


def torch_flash_candidate() -> str | None:
    """'FA4' or 'FA3' where transformers reports that library installed and this GPU runs it:
    torch can route its flash kernels (varlen_attn included) to it. None: torch's own FA2."""
    from transformers.utils import is_flash_attn_3_available, is_flash_attn_4_available

    if not torch.cuda.is_available():
        return None
    major = torch.cuda.get_device_capability()[0]
    if major in (9, 10) and is_flash_attn_4_available():
        return "FA4"
    if major == 9 and is_flash_attn_3_available():
        return "FA3"
    return None


@functools.cache
def activate_torch_flash() -> str:
    """Route torch's flash kernels to FlashAttention-4/3 where installed
    (``torch.nn.attention.activate_flash_attention_impl``, once per process); the name of the
    kernel torch's ``varlen_attn`` runs from now on."""
    impl = torch_flash_candidate()
    if impl is None:
        return "FA2"
    from torch.nn.attention import activate_flash_attention_impl

    try:
        activate_flash_attention_impl(impl)
    except Exception as e:  # noqa: BLE001  (a broken install must not stop the run: FA2 serves)
        log.warning("torch could not activate %s (%s): its built-in FA2 serves", impl, e)
        return "FA2"
    return impl


def torch_segments(
    q: Tensor, k: Tensor, v: Tensor, index: VarlenIndex, scale: float | None, softcap: float | None
) -> Tensor:
    if softcap:
        raise ValueError("prefopt_varlen_torch cannot cap attention logits (Gemma-2)")
    q, k, v = half_inputs(q, k, v)
    return torch_varlen.varlen_attn(
        q,
        k,
        v,
        index.cu_q,
        index.cu_k,
        index.max_q,
        index.max_k,
        scale=scale,
        window_size=(-1, 0),  # causal; the flash kernel aligns it at the bottom right
        enable_gqa=q.shape[1] != k.shape[1],
    )
