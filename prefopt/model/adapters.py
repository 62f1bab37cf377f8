"""LoRA / QLoRA adapters (peft) on a frozen base, and the base itself as the reference.

    python -m prefopt.train model=llama3_8b_instruct +model/lora=default loss=dpo
    python -m prefopt.train model=llama3_8b_instruct +model/lora=default model.quantize=4bit

The policy is the base model with LoRA adapters (Hu et al. 2021, arXiv:2106.09685, Eq. 3:
``W x + (alpha / r) B A x``); only ``A`` and ``B`` train. Because ``B`` starts at zero, the
policy starts equal to the base, and the base *is* the reference of every reference-based loss:
``AdaptersOff`` runs the policy with its adapters switched off (peft's ``disable_adapter``), so a
LoRA run holds one model, not two.

Sharding: the adapters live inside the decoder blocks, so ``fully_shard`` per block puts each
block's frozen base weights and its adapters in one FSDP2 group. FSDP2 asks for one dtype among a
group's *trainable* parameters only (frozen ones are all-gathered as bytes when dtypes differ;
checked on 2 gloo ranks), so the frozen base can be stored in bf16 while the adapters keep fp32
master weights, with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` for compute.

Checkpoints hold the trainable parameters and the optimizer state only
(``checkpoint_state_dicts``); the base is rebuilt from its source on resume. The final export writes
the adapter in PEFT format, and with ``model.lora.export_merged`` the merged model in HF format.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
)
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefopt.config import LoraConfig, ModelConfig, Quantize, check_choice
from prefopt.data.collate import Batch
from prefopt.data.packing import PackedBatch
from prefopt.model import parallel
from prefopt.types import GroupStats

if TYPE_CHECKING:
    import peft


# ---- building ----


def peft_config(lora: LoraConfig) -> peft.LoraConfig:
    import peft  # here, not at the top: peft (and torchao with it) takes seconds to import

    targets = lora.target_modules
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # peft reads the string "all-linear" (not a one-item list) as "every linear layer but
        # the output layer", which resolves per architecture
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )


def check_quantize(cfg: ModelConfig) -> None:
    """Fail before loading when ``model.quantize`` cannot work here, naming the option."""
    from prefopt.errors import ConfigError

    check_choice("model.quantize", cfg.quantize, Quantize)
    if cfg.quantize == "none":
        return
    if cfg.lora is not None and cfg.lora.export_merged:
        raise ConfigError(
            "model.lora.export_merged with model.quantize: merging into quantized "
            "weights loses precision",
            fix="merge the exported adapter into the unquantized base instead",
        )
    if cfg.lora is None:
        raise ConfigError(
            f"model.quantize={cfg.quantize} freezes the base: it needs adapters to train",
            fix="add +model/lora=default",
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.quantize={cfg.quantize} uses bitsandbytes' {cfg.quantize} "
            "kernels, which need a CUDA device; none is visible",
            fix="on CPU, train LoRA with model.quantize=none",
        )
    from prefopt.deps import check

    check("bitsandbytes")  # installed, and a release transformers 5 quantizes with
    if cfg.source == "tiny":
        raise ConfigError(
            "model.quantize needs weights loaded with from_pretrained",
            fix="save the tiny model and use model=checkpoint model.name_or_path=<dir>",
        )


def quantization_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a quantized frozen base (QLoRA: NF4 weights,
    double quantization, bf16 compute; Dettmers et al. 2023, arXiv:2305.14314), else {}."""
    check_quantize(cfg)
    if cfg.quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes quantizes while loading onto this rank's GPU (init_distributed picked it)
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


def apply_adapters(model: PreTrainedModel, cfg: ModelConfig, bf16: bool) -> PreTrainedModel:
    """``model`` with LoRA adapters when ``model.lora`` is set (else unchanged), before compile
    and sharding. With ``bf16`` the frozen base is stored in bf16 (the forward runs in bf16
    anyway); the adapters stay fp32, the optimizer's master copy."""
    if cfg.lora is None:
        return model
    import peft

    # No prepare_model_for_kbit_training for a quantized base: its fp32 upcast of norms and
    # embeddings is what the loop below undoes in bf16, and non-reentrant checkpointing
    # (load_model) does not need inputs that require grad.
    adapted = peft.get_peft_model(model, peft_config(cfg.lora))
    for p in adapted.parameters():
        if p.requires_grad:
            p.data = p.data.float()
        elif bf16 and p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
    return adapted


def base_checkpoint_key(name: str) -> str | None:
    """The key under which the weight files hold a model's state-dict entry ``name``: peft's
    wrapper prefix and ``base_layer`` step removed; None for an adapter weight (not in them)."""
    if ".lora_" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def reset_adapters(model: nn.Module) -> None:
    """Initialise every adapter in place with peft's own init (A random, B zero, so the policy
    starts as the base). For a model built on the meta device: after sharding and ``to_empty``
    the base weights come from the checkpoint and the adapters from here. Seed torch first.

    peft draws each adapter matrix whole, on the CPU, in module order, and each rank keeps its
    own shard of it: the same values on any number of ranks (random ops on DTensor shards would
    draw per shard, so 2 ranks would start from other adapters than 1; ``parallel.copy_full_``
    writes each rank's shard)."""
    from peft.tuners.lora import LoraLayer

    config = peft_model(model).peft_config
    for m in model.modules():
        if not isinstance(m, LoraLayer):
            continue
        for name in m.lora_A:
            sharded = {}
            for linear in (m.lora_A[name], m.lora_B[name]):
                sharded[linear] = linear.weight
                full = torch.empty(linear.weight.shape, dtype=linear.weight.dtype)
                linear.weight = nn.Parameter(full, requires_grad=linear.weight.requires_grad)
            m.reset_lora_parameters(name, init_lora_weights=config[name].init_lora_weights)
            with torch.no_grad():
                for linear, param in sharded.items():
                    full = linear.weight.detach()
                    linear.weight = param  # the sharded parameter FSDP manages, back in place
                    parallel.copy_full_(param, full)


def peft_model(module: nn.Module) -> peft.PeftModel | None:
    """The peft model inside a policy (``StatsModel.model``) or the module itself, else None."""
    peft = sys.modules.get("peft")  # not imported: no model can be adapted
    if peft is None:
        return None
    for m in (module, getattr(module, "model", None)):
        if isinstance(m, peft.PeftModel):
            return m
    return None


def is_adapted(module: nn.Module) -> bool:
    return peft_model(module) is not None


# ---- the reference: the policy with its adapters off ----


@contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """Run ``module`` (a policy or its peft model) as its base model; no-op without adapters.

    peft clears the adapters' ``requires_grad`` while they are off and sets it again on exit. A
    policy forward taken before the context still backpropagates into them afterwards (same
    gradients as without the context, checked on 2 FSDP2 ranks); run no backward inside it.
    """
    m = peft_model(module)
    with m.disable_adapter() if m is not None else nullcontext():
        yield


class _Off(nn.Module):
    """A submodule of an adapted model called with the adapters off."""

    def __init__(self, inner: nn.Module, owner: peft.PeftModel) -> None:
        super().__init__()
        self.inner, self._owner = inner, [owner]  # a list: not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_off(self._owner[0]):
            return self.inner(*args, **kwargs)


class _OffModel:
    """What ``prefopt.model.logprobs`` reads from a model (``config``, ``dtype``, ``get_decoder``,
    ``get_output_embeddings``), with every call made as the base model."""

    def __init__(self, model: peft.PeftModel) -> None:
        self._model, self.config = model, model.config

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    def get_decoder(self) -> nn.Module:
        return _Off(self._model.get_decoder(), self._model)

    def get_output_embeddings(self) -> nn.Module:
        return _Off(self._model.get_output_embeddings(), self._model)


class AdaptersOff:
    """The reference of a LoRA run: called like a ``StatsModel`` (``ref(batch, chunk_size)``),
    it runs the policy with its adapters switched off. ``.model`` serves SPO's KL, which reads
    the reference's hidden states and output layer inside the policy's own forward."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        self.model = _OffModel(peft_model(policy))

    def __call__(self, batch: Batch | PackedBatch, chunk_size: int) -> GroupStats:
        was_training = self.policy.training
        self.policy.eval()  # a reference runs in eval mode (no dropout, no recompute)
        try:
            with adapters_off(self.policy):
                return self.policy(batch, chunk_size)
        finally:
            self.policy.train(was_training)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.policy.parameters()


# ---- counts and the run banner ----


class AdapterSummary(NamedTuple):
    trainable: int  # adapter parameters (the optimizer's)
    total: int  # every parameter of the policy, base included
    reference: str  # what reference-based losses compare with

    def line(self) -> str:
        return (
            f"adapters: {self.trainable:,} trainable / {self.total:,} parameters "
            f"({100 * self.trainable / max(self.total, 1):.2f}%); "
            f"reference: {self.reference}"
        )


def _numel(p: Tensor) -> int:
    # bitsandbytes packs 4-bit weights two to a byte and keeps the logical shape aside
    shape = getattr(p, "quant_state", None)
    return int(shape.shape.numel()) if shape is not None else p.numel()


def summary(policy: nn.Module) -> AdapterSummary | None:
    """Trainable / total parameters and the reference mode of an adapted policy, else None.
    DTensor shards report their global size, so every rank prints the same numbers."""
    if not is_adapted(policy):
        return None
    params = list(policy.parameters())
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    return AdapterSummary(trainable, sum(_numel(p) for p in params), "adapters off")


def count_adapter_parameters(hf_config: PretrainedConfig, lora: LoraConfig) -> tuple[int, int]:
    """(adapter parameters, base parameters) of ``lora`` on the architecture ``hf_config``
    describes, counted on the meta device (no memory, about a second for 8B): what a memory
    plan needs to size the trainable part (fp32 weights, gradients, Adam moments)."""
    import peft

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        base = sum(p.numel() for p in model.parameters())
        adapted = peft.get_peft_model(model, peft_config(lora))
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return trainable, base


# ---- checkpoints and export ----


def checkpoint_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any], StateDictOptions]:
    """``get_state_dict(model, optimizer)`` for DCP, and the options to load it back with.

    An adapted model saves and loads its trainable parameters only (the frozen base comes from
    its source). ``ignore_frozen_params`` still lists a frozen weight tied to another one (the
    output layer of tied embeddings), so the dict is filtered by name too. ``strict=False`` lets
    ``set_state_dict`` accept a dict without the base; ``dcp.load`` still fails on a saved key
    that is missing.
    """
    if not is_adapted(model):
        return (*get_state_dict(model, optimizer), StateDictOptions())
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd, opts


def _gather(policy: nn.Module, adapters_only: bool) -> dict[str, Tensor]:
    """The full (unsharded) state dict of the peft model, on CPU, rank 0 only; a collective."""
    opts = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapters_only
    )
    sd = get_model_state_dict(policy, options=opts)
    return {k.removeprefix("model."): v for k, v in sd.items()}  # StatsModel's prefix


def export(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    merged_path: Path | None,
    is_main: bool,
) -> None:
    """The adapter in PEFT format (``adapter_config.json``, ``adapter_model.safetensors``) in
    ``path``; with ``merged_path`` also the merged model in HF format, ``from_pretrained``-able.
    Every rank must call it (the shards are gathered)."""
    model = peft_model(policy)
    adapter_sd = _gather(policy, adapters_only=True)
    if is_main:
        model.save_pretrained(path, state_dict=adapter_sd)
        tokenizer.save_pretrained(path)
    if merged_path is None:
        return
    full = _gather(policy, adapters_only=False)
    if is_main:
        merged = merge(model, full)
        merged.save_pretrained(merged_path)
        tokenizer.save_pretrained(merged_path)


def merge(model: peft.PeftModel, full: dict[str, Tensor]) -> PreTrainedModel:
    """A plain HF model with ``full`` (the peft model's gathered weights) merged by peft
    (``W + scaling * B A``), built on the meta device and filled by reference: no copy."""
    import peft

    config = model.get_base_model().config
    with torch.device("meta"):
        fresh = peft.get_peft_model(
            AutoModelForCausalLM.from_config(config), model.peft_config["default"]
        )
    missing, unexpected = fresh.load_state_dict(full, strict=False, assign=True)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"merge: state dict mismatch, missing {missing}, extra {unexpected}")
    plain = fresh.merge_and_unload()
    if config.tie_word_embeddings:
        plain.tie_weights()  # the gathered dict keeps one copy of tied weights
    return plain  # its non-persistent buffers (rotary) stay on meta: save_pretrained skips them
