"""The attention kernels, in one registry: which kernel serves which device, layout and model, and
which one ``auto`` picks.

A micro-batch is laid out ``padded``, ``packed`` or ``shared`` (``prefopt.data.packing``). In
the shared layout a prompt's tokens attend causally within the prompt, and the queries of response
k attend to [its prompt; response k]: FlashAttention's variable-length call expresses exactly
that, one segment per prompt and per response with separate query and key offsets, causal aligned
at the bottom right (``packing.VarlenIndex``). Each ``Kernel`` declares the devices and layouts it
serves, whether it applies an attention-logit softcap (Gemma-2), whether it needs bf16 compute,
how its availability is checked (transformers' and torch's own checks, never a module name), how
a batch becomes its decoder inputs, and the banner's line. ``auto`` asks for the first available
kernel of ``AUTO`` (fastest first) that serves the run's ``Target``:

- ``prefopt_varlen_fa``: flash-attn's varlen call (FlashAttention-3 on Hopper where installed);
- ``prefopt_varlen_torch``: torch's ``varlen_attn`` (its built-in FlashAttention-2, or
  FlashAttention-4/3 swapped in with ``activate_flash_attention_impl`` where installed); no softcap;
- ``prefopt_flex``: FlexAttention with a BlockMask from document boundaries (any dtype, softcap);
- ``prefopt_varlen_ref``: SDPA per varlen segment, the CPU kernel and the reference of the
  index plumbing the CUDA kernels share (``kernels/varlen.py``); on CUDA the last resort.

transformers' own implementations remain selectable by name: ``sdpa`` and ``eager`` with a dense
(L, L) document mask (the reference path of the tests; the memory plan counts their mask and
scores), ``flash_attention_2`` (documents only, not shared prompts) and ``flex_attention``.
Padded rows run causally without a padding mask in prefopt's kernels: every row is right-padded,
so no real token sees padding. Anything else (generation with left padding) goes to SDPA.
Adding a kernel is one ``Kernel`` entry and its tests (``tests/test_kernels.py``). prefopt's
names avoid "flash" and "sdpa": transformers reads those substrings of an implementation's name
(``is_flash_attention_requested``: it would load flash-attn or a Hub kernel; "sdpa": it would
refuse models without SDPA support, such as Gemma-2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prefopt.config import LAYOUTS, TrainerConfig
from prefopt.data.collate import Batch
from prefopt.data.packing import PackedBatch, VarlenIndex
from prefopt.errors import ConfigError
from prefopt.model.kernels import flex, varlen
from prefopt.model.kernels import inputs as batch_inputs


class Target(NamedTuple):
    """What ``auto`` chooses for: where attention runs and what the model needs."""

    device: str = "cpu"  # cpu | cuda
    layout: str | None = None  # None: a kernel that serves every layout
    half: bool = False  # bf16/fp16 compute (the FlashAttention kernels need it)
    softcap: bool = False  # the model caps attention logits (Gemma-2's attn_logit_softcapping)

    @staticmethod
    def of_trainer(t: TrainerConfig, device: str | None = None) -> Target:
        """The target of a ``trainer`` config: its layout, device and compute precision."""
        if device is None:
            device = t.device if t.device != "auto" else this_device()
        half = t.precision == "bf16" or (t.precision == "auto" and device == "cuda")
        return Target(device, t.layout, half)


def this_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def softcap_of(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "attn_logit_softcapping", None))


class Call(NamedTuple):
    """One layer's attention call as prefopt's kernels receive it."""

    mask: Any  # a BlockMask (prefopt_flex), else transformers' placeholder
    index: VarlenIndex  # the row's segments
    scale: float | None
    softcap: float | None


@dataclass(frozen=True)
class Kernel:
    name: str
    devices: tuple[str, ...]
    layouts: tuple[str, ...]
    softcap: bool  # applies an attention-logit softcap
    half_only: bool  # computes in bf16/fp16 only
    available: Callable[[], str | None]  # None: runs here; else why not
    inputs: Callable[[Batch | PackedBatch, torch.dtype], dict[str, Any]]  # decoder kwargs
    describe: Callable[[str, str], str]  # (layout, device) -> what runs, for the banner
    attend: Callable[[Tensor, Tensor, Tensor, Call], Tensor] | None = None  # prefopt's own
    dense: str | None = None  # "mask" or "scores": memory that grows with L^2 (the plan)

    def refusal(self, target: Target) -> str | None:
        """Why this kernel cannot run ``target`` (None: it can)."""
        if target.device not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {target.device}"
        if target.layout is not None and target.layout not in self.layouts:
            return f"does not serve the {target.layout} layout (only {', '.join(self.layouts)})"
        if target.softcap and not self.softcap:
            return "does not apply the model's attention-logit softcap (Gemma-2)"
        if self.half_only and not target.half:
            return "computes in bf16/fp16 only (trainer.precision resolves to fp32)"
        return self.available()


# ---- what each kernel computes ----


def _segments(fn: varlen.SegmentsFn) -> Callable[[Tensor, Tensor, Tensor, Call], Tensor]:
    def attend(query: Tensor, key: Tensor, value: Tensor, call: Call) -> Tensor:
        return varlen.varlen_attention(fn, query, key, value, call.index, call.scale, call.softcap)

    return attend


def _flex(query: Tensor, key: Tensor, value: Tensor, call: Call) -> Tensor:
    return flex.flex_rows(query, key, value, call.mask, call.scale, call.softcap)


def _cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device is visible"


def _flash_ready() -> str | None:
    if _cuda() or varlen.flash_attn_engine() is None:
        return _cuda() or "transformers reports no flash-attn >= 2.6 (nor FlashAttention-3)"
    return None


def _flex_ready() -> str | None:
    from torch.utils._triton import has_triton

    return _cuda() or (None if has_triton() else "FlexAttention's CUDA kernel needs triton")


def _hf_flash_ready() -> str | None:
    from transformers.utils import is_flash_attn_2_available

    return None if is_flash_attn_2_available() else "transformers reports FlashAttention-2 absent"


def _always() -> str | None:
    return None


def _segments_line(engine: Callable[[], str]) -> Callable[[str, str], str]:
    def describe(layout: str, device: str) -> str:
        return engine() + {
            "shared": ", segments: each prompt causal, each response over [its prompt; itself] "
            "causal at the bottom right (the prompt's K/V copied per response)",
            "packed": ", segments: the documents, causal",
            "padded": ", segments: the right-padded rows, causal",
        }.get(layout, "")

    return describe


def _flash_engine() -> str:
    engine = varlen.flash_attn_engine()
    return engine[0] if engine else "flash-attn (not available here)"


def _torch_engine() -> str:
    impl = varlen.torch_flash_candidate()
    via = f"{impl} through activate_flash_attention_impl" if impl else "its built-in FA2"
    return f"FlashAttention in torch (varlen_attn, {via})"


def _reference_engine() -> str:
    return "SDPA per varlen segment (the reference; on CUDA it reads the offsets on the host)"


def _flex_line(layout: str, device: str) -> str:
    what = {"padded": "a causal BlockMask over right-padded rows"}.get(
        layout, "BlockMask from document boundaries, masked tiles skipped"
    )
    return f"FlexAttention, {what} (compiled once, dynamic lengths)"


def _fixed(text: str) -> Callable[[str, str], str]:
    return lambda layout, device: text


ALL = tuple(LAYOUTS)
KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel(
            "prefopt_varlen_fa", devices=("cuda",), layouts=ALL, softcap=True, half_only=True,
            available=_flash_ready, inputs=batch_inputs.varlen_inputs,
            describe=_segments_line(_flash_engine), attend=_segments(varlen.flash_attn_segments),
        ),
        Kernel(
            "prefopt_varlen_torch", devices=("cuda",), layouts=ALL, softcap=False, half_only=True,
            available=varlen.torch_varlen_ready, inputs=batch_inputs.varlen_inputs,
            describe=_segments_line(_torch_engine), attend=_segments(varlen.torch_segments),
        ),
        Kernel(
            "prefopt_flex", devices=("cuda",), layouts=ALL, softcap=True, half_only=False,
            available=_flex_ready, inputs=batch_inputs.flex_inputs, describe=_flex_line,
            attend=_flex,
        ),
        Kernel(
            "prefopt_varlen_ref", devices=("cpu", "cuda"), layouts=ALL, softcap=True,
            half_only=False,
            available=_always, inputs=batch_inputs.varlen_inputs,
            describe=_segments_line(_reference_engine),
            attend=_segments(varlen.sdpa_segments),
        ),
        Kernel(
            "flash_attention_2", devices=("cuda",), layouts=("padded", "packed"), softcap=True,
            half_only=True, available=_hf_flash_ready, inputs=batch_inputs.hf_flash_inputs,
            describe=_fixed("transformers' flash-attn over whole documents"),
        ),
        Kernel(  # CUDA: on CPU FlexAttention has no backward (torch 2.13)
            "flex_attention", devices=("cuda",), layouts=ALL, softcap=True, half_only=False,
            available=_flex_ready, inputs=batch_inputs.hf_flex_inputs,
            describe=_fixed("transformers' FlexAttention with the batch's BlockMask"),
        ),
        Kernel(
            "sdpa", devices=("cuda", "cpu"), layouts=ALL, softcap=False, half_only=False,
            available=_always, inputs=batch_inputs.sdpa_inputs,
            describe=_fixed("SDPA, dense (L, L) document mask (reference path: every tile)"),
            dense="mask",
        ),
        Kernel(
            "eager", devices=("cuda", "cpu"), layouts=ALL, softcap=True, half_only=False,
            available=_always, inputs=batch_inputs.dense_inputs,
            describe=_fixed("eager, dense (L, L) mask and scores (reference path: every tile)"),
            dense="scores",
        ),
    )
}  # fmt: skip
AUTO = ("prefopt_varlen_fa", "prefopt_varlen_torch", "prefopt_flex", "prefopt_varlen_ref")


def kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ConfigError(
            f"model.attn_implementation={name!r} is not a known attention kernel",
            fix=f"use auto or one of {sorted(KERNELS)}",
        )
    return KERNELS[name]


def choose(requested: str, target: Target) -> str:
    """The kernel ``model.attn_implementation`` names for ``target``: ``requested`` when it can
    run it, the first of ``AUTO`` that can for ``auto``; a ConfigError says why not."""
    what = f"{target.layout or 'any'} layout on {target.device}"
    if requested != "auto":
        why = kernel(requested).refusal(target)
        if why:
            raise ConfigError(
                f"model.attn_implementation={requested}: {why}",
                fix=f"set model.attn_implementation=auto (picks a kernel for the {what})",
            )
        return requested
    reasons = {name: KERNELS[name].refusal(target) for name in AUTO}
    for name, why in reasons.items():
        if why is None:
            return name
    if target.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but no CUDA device is visible", fix="set trainer.device=auto"
        )
    raise ConfigError(
        f"no attention kernel runs the {what}: "
        + "; ".join(f"{n}: {why}" for n, why in reasons.items()),
        fix="install flash-attn, or train in bf16 on CUDA, or run on CPU",
    )


def prepare(name: str) -> None:
    """What a kernel sets up once per process, before its first (compiled) call: flash-attn's
    function is looked up; torch's varlen kernel routes to FlashAttention-4/3 where transformers
    reports them installed for this GPU."""
    if name == "prefopt_varlen_fa" and torch.cuda.is_available():
        varlen.use_flash_attn()
    if name == "prefopt_varlen_torch" and torch.cuda.is_available():
        varlen.activate_torch_flash()


def kernel_description(name: str, layout: str, device: torch.device | str) -> str:
    """One line for the run banner: the kernel that runs this layout's attention."""
    dev = torch.device(device).type
    return f"attention: {name} for {layout} rows on {dev}: {kernel(name).describe(layout, dev)}"


def decoder_inputs(name: str, batch: Batch | PackedBatch, dtype: torch.dtype) -> dict[str, Any]:
    """The decoder keyword arguments that run ``batch`` through kernel ``name``: ids, positions
    and what keeps documents and responses apart, in the form that kernel reads."""
    return kernel(name).inputs(batch, dtype)


def workspace_bytes(name: str, layout: str, tokens: int, width: int, heads: int, dtype: int) -> int:
    """Attention memory of one micro-batch of ``tokens`` positions that grows with L^2 (the
    dense reference kernels; 0 for the others and ``auto``): the (L, L) mask (1 byte in SDPA,
    ``dtype`` bytes in eager) and eager's scores of one layer (fp32 softmax, scores and
    probabilities in the compute dtype). ``width``: the padded rows' width."""
    k = KERNELS.get(name)
    if k is None or k.dense is None:
        return 0
    pairs = tokens * (width if layout == "padded" else tokens)  # query-key pairs
    mask = pairs * (1 if k.dense == "mask" else dtype)
    return mask + (heads * pairs * (4 + 2 * dtype) if k.dense == "scores" else 0)


# ---- registration with transformers ----


def _registered(k: Kernel) -> Callable[..., tuple[Tensor, None]]:
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | BlockMask | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        softcap: float | None = None,
        sliding_window: int | None = None,
        prefopt_varlen: VarlenIndex | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        if prefopt_varlen is None:
            return batch_inputs.dense_attention(
                module, query, key, value, attention_mask, scaling, dropout, softcap, **kwargs
            )
        if dropout:
            raise ValueError(f"{k.name} has no attention dropout; set attention_dropout=0")
        if sliding_window and prefopt_varlen.max_k > sliding_window:
            raise ConfigError(
                f"{k.name} attends over {prefopt_varlen.max_k} keys, past the model's sliding "
                f"window of {sliding_window}, which it does not apply",
                fix=f"keep prompt + response within it: dataset.max_length <= {sliding_window}",
            )
        call = Call(attention_mask, prefopt_varlen, scaling, softcap)
        return k.attend(query, key, value, call).contiguous(), None

    return attention


for _k in KERNELS.values():
    if _k.attend is not None:
        AttentionInterface.register(_k.name, _registered(_k))
        AttentionMaskInterface.register(_k.name, sdpa_mask)  # generation: SDPA's masks
