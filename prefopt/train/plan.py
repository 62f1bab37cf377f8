"""The memory plan of a training run: bytes per GPU (and host memory per rank) for the composed
config and world size, before anything is allocated.

    python -m prefopt.train.plan model=llama3_8b_instruct dataset=ultrafeedback trainer=gpu \
        --world-size 8 --gpu-memory-gib 80

It counts what the code keeps: the policy's sharded master parameters, gradients and optimizer
state; the frozen reference's shards; the parameters FSDP gathers for compute (the block running
and the one prefetched, the root held through backward); with ``trainer.grad_sync=last``, the
unsharded fp32 gradient of every trainable parameter that FSDP2 accumulates on every rank until
a step's last micro-batch (4 bytes per parameter, whatever the world size); activations at the
micro-batch token budget (saved block inputs with gradient checkpointing, every block's
intermediates without);
one log-prob chunk's fp32 logits. Activations are an estimate (per token and block: 2 bytes x
(8 hidden + 3 intermediate), the tensors a Llama-style block keeps for backward); the rest is
exact for the parameter counts. The run prints it and refuses to start when it exceeds the device.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from prefopt.config import TrainConfig
from prefopt.errors import report_user_errors

if TYPE_CHECKING:  # torch and transformers are imported where the plan builds the model
    import torch
    from transformers import PreTrainedModel

    from prefopt.model.parallel import World

GIB = 1024**3
SAFETY = 0.92  # the share of device memory a plan may fill (allocator fragmentation, kernels)
ACCUMULATORS = "unsharded gradient accumulators (fp32)"


@dataclass(frozen=True)
class Shape:
    """What the plan needs to know of a model."""

    params: int  # all parameters (a tied output layer counted once)
    block_params: int  # one decoder block
    root_params: int  # embeddings, final norm, output layer: FSDP's root group
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @staticmethod
    def of(model: PreTrainedModel) -> Shape:
        """From a model (on the meta device is enough): exact counts."""
        from prefopt.model.blocks import decoder_blocks

        blocks = decoder_blocks(model, "plan")
        params = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in blocks[0].parameters())
        cfg = model.config
        return Shape(
            params,
            block,
            params - block * len(blocks),
            len(blocks),
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
        )


@dataclass(frozen=True)
class PlanInputs:
    world_size: int
    master_bytes: int  # 4: fp32 master weights; 2: bf16 (stochastic-rounding optimizer)
    compute_bytes: int  # 2: bf16 compute; 4: fp32
    optimizer_state_bytes: float  # per parameter: 8 (AdamW fp32), 2 (8-bit), 4 (bf16 states)
    reference: str  # model | precompute | none
    gradient_checkpointing: bool
    micro_batch_tokens: int  # forward positions per micro-batch
    chunk_tokens: int  # log-prob chunk
    trainable_params: int | None = None  # None: all (full fine-tune); LoRA: the adapters
    frozen_bytes: float | None = None  # per frozen parameter; None: compute dtype, sharded
    # (a LoRA base); 0.5 or 1: a 4- or 8-bit QLoRA base, which every rank holds whole
    # trainer.train_top_blocks: the blocks that keep activations for the backward (None: all);
    # nothing below the first trainable block needs a gradient, so nothing there is kept
    activation_blocks: int | None = None
    attention_bytes: int = 0  # a dense attention kernel's (L, L) mask and scores (the registry's)
    # trainer.grad_sync=last: until a step's last micro-batch FSDP2 keeps every trainable
    # parameter's gradient unsharded, in the reduce dtype (fp32), on every rank
    unsharded_accumulation: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    rows: dict[str, int]  # bytes per GPU by item
    host_bytes: int  # weight bytes each rank reads into host memory while loading (bf16 files)
    params: int = 0  # all parameters
    trainable: int = 0  # the ones the optimizer steps (LoRA: the adapters)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def plan_memory(shape: Shape, p: PlanInputs) -> MemoryPlan:
    W = p.world_size
    trainable = shape.params if p.trainable_params is None else p.trainable_params
    frozen = shape.params - trainable  # LoRA: the base model, held in compute dtype
    if p.frozen_bytes is None:
        frozen_total = frozen * p.compute_bytes // W
    else:
        frozen_total = int(frozen * p.frozen_bytes)  # quantized: not sharded
    rows = {
        "parameters (sharded)": trainable * p.master_bytes // W + frozen_total,
        "gradients (sharded)": trainable * p.master_bytes // W,
        "optimizer state (sharded)": int(trainable * p.optimizer_state_bytes) // W,
    }
    # Gathered for compute: the running block and the prefetched one, plus the root, which the
    # trainable policy keeps gathered from forward through backward.
    gathered = (2 * shape.block_params + shape.root_params) * p.compute_bytes
    rows["gathered parameters"] = gathered
    rows["unsharded gradients (one block, fp32)"] = 4 * min(trainable, shape.block_params)
    if p.unsharded_accumulation:  # not divided by W: each rank holds the whole model's
        rows[ACCUMULATORS] = 4 * trainable
    if p.reference == "model":
        rows["reference (sharded)"] = shape.params * p.compute_bytes // W
        rows["reference gathered"] = (shape.block_params + shape.root_params) * p.compute_bytes
    T, H, I = p.micro_batch_tokens, shape.hidden, shape.intermediate  # noqa: E741
    per_block = T * 2 * (8 * H + 3 * I)
    kept = shape.layers if p.activation_blocks is None else p.activation_blocks
    if p.gradient_checkpointing:
        rows["activations"] = kept * T * H * 2 + per_block
    else:
        rows["activations"] = kept * per_block
    rows["log-prob chunk (fp32 logits)"] = 3 * p.chunk_tokens * shape.vocab * 4
    if p.attention_bytes:  # eager/sdpa: memory that grows with the square of the row
        rows["attention (dense (L, L) mask, scores)"] = p.attention_bytes
    # Loading: each rank reads only its slices of the (bf16) weight files.
    return MemoryPlan(rows, shape.params * 2 // W, shape.params, trainable)


def format_plan(plan: MemoryPlan, capacity: int | None = None) -> str:
    lines = [f"  trained parameters: {plan.trainable:,} (model: {plan.params:,})"]
    lines += [f"  {name:<40}{n / GIB:8.2f} GiB" for name, n in plan.rows.items()]
    lines.append(f"  {'total per GPU':<40}{plan.total / GIB:8.2f} GiB")
    if capacity:
        lines.append(f"  {'device memory':<40}{capacity / GIB:8.2f} GiB")
    lines.append(f"  {'weights read per rank (host, loading)':<40}{plan.host_bytes / GIB:8.2f} GiB")
    return "\n".join(lines)


def check_fits(plan: MemoryPlan, capacity: int, where: str) -> None:
    """Refuse a plan over the device (``where`` names it), saying what would make it fit."""
    if plan.total <= SAFETY * capacity:
        return
    from prefopt.errors import PlanError

    raise PlanError(
        f"the memory plan needs {plan.total / GIB:.1f} GiB per GPU but {where} has "
        f"{capacity / GIB:.1f} GiB ({SAFETY:.0%} usable):\n{format_plan(plan, capacity)}",
        fix=fit_hint(plan),
    )


def fit_hint(plan: MemoryPlan) -> str:
    """What would make a plan fit; every option it names exists (tests/test_scale.py)."""
    hints = []
    if ACCUMULATORS in plan.rows:
        hints.append("trainer.grad_sync=every (gradients accumulate sharded)")
    hints += [
        "more GPUs (FSDP shards parameters, gradients and optimizer state)",
        "model.gradient_checkpointing=true",
        "a smaller trainer.micro_batch_tokens or trainer.logps_chunk_size",
        "trainer.reference=precompute",
        "a low-memory optimizer (optimizer=adamw8bit, or optimizer=adamw_bf16_sr "
        "trainer.master_dtype=bfloat16)",
        "LoRA (+model/lora=default)",
    ]
    return ", ".join(hints)


def optimizer_state_bytes(target: str, master_bytes: int) -> float:
    """Optimizer state per trainable parameter, from its ``_target_``."""
    if "8bit" in target.lower() or "8Bit" in target:
        return 2.0  # two 8-bit moments (block scales are negligible)
    if "4bit" in target.lower():
        return 1.0
    return 2.0 * master_bytes  # two moments in the parameters' dtype


def inputs_from_config(cfg: TrainConfig, world_size: int, device_type: str) -> PlanInputs:
    """The plan's inputs as the composed training config says."""
    t, d = cfg.trainer, cfg.dataset
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device_type == "cuda")
    master = 4 if t.master_dtype == "float32" else 2
    tokens = t.micro_batch_tokens or t.micro_batch_groups * 4 * d.max_length
    from prefopt.losses import get_spec
    from prefopt.train.extras import reference_model_needed

    needed = reference_model_needed(get_spec(cfg.loss.name), cfg.loss, t.reference)
    reference = "model" if needed else "none"
    return PlanInputs(
        world_size=world_size,
        master_bytes=master,
        compute_bytes=2 if bf16 else 4,
        optimizer_state_bytes=optimizer_state_bytes(cfg.optimizer._target_, master),
        reference=reference,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        micro_batch_tokens=tokens,
        chunk_tokens=min(t.logps_chunk_size, tokens),
        unsharded_accumulation=t.grad_sync == "last",
    )


def shape_and_inputs(
    cfg: TrainConfig, world_size: int, device_type: str
) -> tuple[Shape, PlanInputs]:
    """Exact counts from the model built on the meta device (only its config.json is read: the
    shapes shipped for recipe models, else from the Hub or a local directory; built in code for
    ``model=tiny``) and the plan's inputs; with
    LoRA, the adapters are the trainable parameters and the reference is the policy itself; with
    ``trainer.train_top_blocks``, the top blocks and the final norm, as the loop freezes them."""
    from prefopt.model.adapters import count_adapter_parameters
    from prefopt.model.attention import workspace_bytes
    from prefopt.model.blocks import freeze_below_top_blocks
    from prefopt.model.load import empty_model, model_config, tiny_tokenizer

    tok = tiny_tokenizer() if cfg.model.source == "tiny" else None
    config = model_config(cfg.model, cfg.cache_dir, tok, shapes_only=True)
    model = empty_model(cfg.model, config)
    shape = Shape.of(model)
    inputs = inputs_from_config(cfg, world_size, device_type)
    t = cfg.trainer
    attention = workspace_bytes(
        cfg.model.attn_implementation,
        t.layout,
        inputs.micro_batch_tokens,
        cfg.dataset.max_length,
        config.num_attention_heads,
        inputs.compute_bytes,
    )
    inputs = replace(inputs, attention_bytes=attention)
    top = cfg.trainer.train_top_blocks
    if top > 0:  # the frozen blocks are held in the compute dtype, like a LoRA base
        trained = freeze_below_top_blocks(model, top)
        inputs = replace(inputs, trainable_params=trained, activation_blocks=top)
    if cfg.model.lora is not None:
        adapter, _ = count_adapter_parameters(config, cfg.model.lora)
        frozen = {"4bit": 0.5, "8bit": 1.0}.get(cfg.model.quantize)
        inputs = replace(inputs, trainable_params=adapter, frozen_bytes=frozen, reference="none")
    return shape, inputs


def device_capacity(device: torch.device) -> tuple[int, str] | None:
    """The memory of the device a run trains on and its name; None on CPU (nothing checked)."""
    if device.type != "cuda":
        return None
    import torch

    props = torch.cuda.get_device_properties(device)
    return props.total_memory, f"{props.name} ({device})"


def plan_for_run(cfg: TrainConfig, world: World) -> MemoryPlan:
    """The composed run's plan on this world; on a GPU, refuse it when it does not fit."""
    plan = plan_memory(*shape_and_inputs(cfg, world.world_size, world.device.type))
    capacity = device_capacity(world.device)
    if capacity is not None:
        check_fits(plan, *capacity)
    return plan


@report_user_errors  # a config, Hub or dependency mistake: one block on stderr, exit 2
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m prefopt.train.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--world-size", type=int, default=1, help="GPUs (ranks) in the job")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for prefopt.train")
    args = parser.parse_args(argv)
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    import prefopt.losses  # noqa: F401  (the loss schemas)
    from prefopt import deps
    from prefopt.checks import typed

    deps.check(*deps.CORE)
    deps.keep_torchao_out(lora=False)  # the plan builds the model on the meta device only

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = typed(
            compose("train", overrides=[*args.overrides, "run_dir=/nonexistent"]), TrainConfig
        )
    shape, inputs = shape_and_inputs(cfg, args.world_size, "cuda")
    plan = plan_memory(shape, inputs)
    capacity = int(args.gpu_memory_gib * GIB)
    trainable = "" if inputs.trainable_params is None else f", {inputs.trainable_params:,} trained"
    print(
        f"{cfg.model.name_or_path}: {shape.params / 1e9:.2f} B parameters{trainable}, "
        f"{args.world_size} GPU(s) of {args.gpu_memory_gib:g} GiB"
    )
    print(format_plan(plan, capacity))
    fits = plan.total <= SAFETY * capacity
    print("fits" if fits else "does NOT fit: see the rows above")
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    main()
