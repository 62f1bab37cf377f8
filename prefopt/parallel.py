"""Process group, FSDP2 sharding and cross-rank reductions: the only module that knows about
ranks and the only one that imports ``torch.distributed.fsdp``.

One code path for 1 and N processes. Under ``torchrun`` (or ``srun`` + torchrun) the process
group comes from the environment; alone, a 1-rank group on an in-memory store. Models are always
wrapped in ``StatsModel`` (whose forward returns the (B, K) statistics) and sharded with
``fully_shard`` per decoder block, then the wrapper as root: the root group holds the embeddings,
the final norm and the output layer together (tied embeddings must share one group), and because
the statistics are computed inside the root's forward, the output layer's weights are gathered
while the chunked log-probs read them (the Liger#332 / trl#6372 failure mode cannot happen).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from prefopt.adapters import quantized_params
from prefopt.data.collate import Batch
from prefopt.stats import group_stats, sequence_kl
from prefopt.types import GroupStats


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> World:
    """Join the torchrun process group, or make a 1-rank one; pick this rank's device.

    ``timeout_s`` bounds every collective: when a rank dies the others fail within it instead of
    hanging (torchrun's agent also stops the job when a worker exits).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))  # fmt: skip
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dev, mesh)


class StatsModel(nn.Module):
    """A causal LM whose forward returns GroupStats, so FSDP's root hooks cover the output layer."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: Batch, chunk_size: int, kl_ref: StatsModel | None = None
    ) -> GroupStats | Tensor:
        """GroupStats of the batch, or with ``kl_ref`` the (N,) per-row KL(self || kl_ref).

        The reference's own (root) parameters must be gathered by the caller, ``unsharded``,
        until after the backward: the chunked KL recomputes its logits there.
        """
        if kl_ref is None:
            return group_stats(self.model, batch, chunk_size)
        return sequence_kl(self.model, kl_ref.model, batch, chunk_size)


def decoder_blocks(model: PreTrainedModel) -> list[nn.Module]:
    """The transformer blocks of an HF causal LM (``get_decoder().layers`` for Llama-like ones)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found to shard")
    return list(layers)


def shard(model: PreTrainedModel, world: World, bf16: bool, trainable: bool = True) -> StatsModel:
    """``fully_shard`` each decoder block, then the wrapper (root). With ``bf16`` the forward runs
    in bf16 while master weights stay fp32 and gradients are reduced in fp32."""
    wrapper = StatsModel(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()  # fmt: skip
    units = decoder_blocks(model)
    ignored = quantized_params(model) or None  # QLoRA: the 4/8-bit base stays whole per rank
    for block in units:
        fully_shard(
            block, mesh=world.mesh, mp_policy=mp, reshard_after_forward=True, ignored_params=ignored
        )
    fully_shard(
        wrapper,
        mesh=world.mesh,
        mp_policy=mp,
        reshard_after_forward=trainable,
        ignored_params=ignored,
    )
    for unit in [*units, wrapper]:
        # Sum gradients over ranks instead of averaging: the loop divides by the number of valid
        # groups of the whole step, over all ranks, in one place.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    if not trainable:
        wrapper.requires_grad_(False).eval()
    return wrapper


@contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Gather a sharded root's own parameters for calls that bypass its forward (generate)."""
    if isinstance(module, FSDPModule):
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The unsharded HF state dict on rank 0 (empty elsewhere), for ``save_pretrained``."""
    sd = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # Gathered tied weights (embeddings = output layer) come back as separate copies; keep one
    # name per parameter so the export matches what save_pretrained writes for the plain model.
    seen: set[int] = set()
    tied: set[str] = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return {k.removeprefix("model."): v for k, v in sd.items() if k not in tied}


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """In-place sum over ranks (on the collective's device for NCCL, then back)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else t.device  # fmt: skip
        moved = t.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t.copy_(moved.to(t.device))
    return t


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every rank: ranks must agree before a sharded backward, or the
    ones that run it wait forever for the ones that skipped it."""
    return all_reduce_mean(float(flag)) == 1.0


def all_reduce_mean(value: float) -> float:
    """The mean of a per-rank scalar over ranks."""
    t = all_reduce_sum(torch.tensor([value], dtype=torch.float64))
    return float(t) / (dist.get_world_size() if dist.is_initialized() else 1)


def all_gather_objects(obj: object) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
