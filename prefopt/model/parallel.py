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

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedModel

from prefopt.config import ComputePrecision, MasterDtype, check_choice
from prefopt.model.blocks import decoder_blocks
from prefopt.model.logprobs import StatsModel

log = logging.getLogger("prefopt")


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
            dist.init_process_group(
                backend,
                store=dist.HashStore(),
                rank=0,
                world_size=1,
                timeout=timedelta(seconds=timeout_s),
            )
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dev, mesh)


@dataclass(frozen=True)
class Precision:
    """The dtypes of a run. ``master``: the policy's sharded parameters, which the optimizer
    steps, their gradients and (for torch AdamW) the optimizer state; ``compute``: what the
    forward and backward run in (FSDP2 casts the gathered parameters to it); ``reference``: the
    frozen reference's sharded parameters (no gradients, no optimizer, no master copy)."""

    compute: torch.dtype
    master: torch.dtype
    reference: torch.dtype

    @property
    def bf16(self) -> bool:
        return self.compute == torch.bfloat16


# the torch dtype of each name ``prefopt.config.Dtype`` allows
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_precision(device: torch.device, precision: str, master_dtype: str) -> Precision:
    """``trainer.precision`` (auto: bf16 compute on CUDA, fp32 on CPU) and
    ``trainer.master_dtype`` (float32; bfloat16 only with a stochastic-rounding optimizer)."""
    check_choice("trainer.precision", precision, ComputePrecision)
    check_choice("trainer.master_dtype", master_dtype, MasterDtype)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    compute = torch.bfloat16 if bf16 else torch.float32
    return Precision(compute, DTYPES[master_dtype], compute)


def quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """bitsandbytes' packed weights (QLoRA): FSDP2 cannot shard them, so every rank keeps its
    own frozen copy (an 8B base in NF4 is about 5 GB) and only the adapters are sharded."""
    return {p for p in model.parameters() if type(p).__module__.startswith("bitsandbytes")}


def shard(
    model: PreTrainedModel, world: World, precision: Precision, trainable: bool = True
) -> StatsModel:
    """``fully_shard`` each decoder block, then the wrapper (root), and allocate the shards.

    ``model`` may live on the meta device (``prefopt.model.load.empty_model``): then only this
    rank's shards are ever allocated, on ``world.device``, and ``load_weights`` fills them. The
    trainable policy is sharded in ``precision.master`` (fp32 master weights whatever the dtype
    on disk), gathered in ``precision.compute`` for the forward and its gradients reduced in fp32;
    the frozen reference is held in ``precision.reference``. Frozen parameters of the policy (a
    LoRA base) are held in the compute dtype: they need no master copy; a quantized base is left
    as is.
    """
    dtype = precision.master if trainable else precision.reference
    skip = quantized_params(model)
    for p in model.parameters():  # parameters only: RoPE buffers keep their fp32 values
        if p not in skip and p.is_floating_point():
            p.data = p.data.to(dtype if p.requires_grad or not trainable else precision.compute)
    buffers = {n: b.clone() for n, b in model.named_buffers() if not b.is_meta}
    wrapper = StatsModel(model)
    mp = MixedPrecisionPolicy(
        param_dtype=precision.compute if precision.compute != dtype else None,
        reduce_dtype=torch.float32 if trainable else None,
    )
    units = decoder_blocks(model, "shard")
    ignored = quantized_params(model) or None  # QLoRA: the 4/8-bit base stays whole per rank
    for block in units:
        fully_shard(
            block, mesh=world.mesh, mp_policy=mp, reshard_after_forward=True, ignored_params=ignored
        )
    # The trainable root (embeddings, final norm, output layer) keeps FSDP's default: not
    # resharded after forward, since backward needs it at once. The reference never runs a
    # backward, so its root is freed after each forward.
    root_reshard = {} if trainable else {"reshard_after_forward": True}
    fully_shard(wrapper, mesh=world.mesh, mp_policy=mp, ignored_params=ignored, **root_reshard)
    register_fsdp_forward_method(wrapper, "kl")  # SPO's KL: the root gathered as for forward
    for unit in [*units, wrapper]:
        # Sum gradients over ranks instead of averaging: the loop divides by the number of valid
        # groups of the whole step, over all ranks, in one place.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    if any(p.is_meta for p in wrapper.parameters()):
        _materialize(wrapper, world.device, buffers)
    else:
        wrapper.to(world.device)
    if not trainable:
        wrapper.requires_grad_(False).eval()
    return wrapper


def _materialize(wrapper: nn.Module, device: torch.device, buffers: dict[str, Tensor]) -> None:
    """Allocate the shards of a model built on the meta device (values are set by
    ``load_weights``); buffers computed at construction (RoPE frequencies) are put back."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keeps tied parameters tied
    try:
        wrapper.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with torch.no_grad():
        for name, buf in wrapper.model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])


def tied_names(model: nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (a tied output layer)."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def load_weights(
    wrapper: StatsModel,
    weights: Path | dict[str, Tensor],
    file_key: Callable[[str], str | None] = str,
) -> None:
    """Fill a sharded model's parameters without materializing the whole model on any rank.

    ``weights`` is a directory of Hugging Face safetensors files: every rank reads only the
    slices of its own shards (``torch.distributed.checkpoint``'s Hugging Face reader), and values
    are converted from the dtype on disk to the shards' dtype. Or a full state dict held by rank
    0 (the random tiny model, a ``.bin`` checkpoint): broadcast shard by shard. ``file_key``
    names each parameter as the files do, None for one they lack (a LoRA model:
    ``prefopt.model.adapters.base_checkpoint_key``).
    """
    model = wrapper.model
    state = model.state_dict()  # the sharded parameters (DTensors), under the module's names
    file_keys = {k: file_key(k) for k in state}
    adapted = any(v is None for v in file_keys.values())
    if isinstance(weights, dict):
        full = {k: weights[f] for k, f in file_keys.items() if f is not None} if is_main() else {}
        set_model_state_dict(  # it replaces the values of the dict it gets: ``full`` is a copy
            model,
            full,
            options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True, strict=not adapted
            ),
        )
        return
    skip = tied_names(model)
    targets = {
        file_keys[k]: v for k, v in state.items() if k not in skip and file_keys[k] is not None
    }
    try:
        dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(weights)))
    except Exception as e:  # DCP wraps per-rank failures; name the directory and the cause
        raise RuntimeError(f"loading weights from {weights} failed: {e}") from e


@contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Gather a sharded root's own parameters for calls that bypass its forward (generate)."""
    if isinstance(module, FSDPModule):
        # FSDP2 sets up every group from the root on the root's first forward. A call that
        # bypasses it before then (a resumed SPO run's first on-policy samples) would make the
        # first block a root of its own, and the next real forward fails; set up from here.
        module._get_fsdp_state()._lazy_init()
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters a forward without backward left behind (the trainable root
    is not resharded after forward), so optimizer and checkpoints see the sharded ones again."""
    if isinstance(module, FSDPModule):
        module.reshard()


def divide_gradients(params: Iterable[nn.Parameter], divisor: Tensor) -> None:
    """Divide every gradient by ``divisor`` (at least 1), in place on this rank's shards: the
    gradients are sums over micro-batches and ranks (``shard`` sets plain sums)."""
    for p in params:
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        grad.div_(divisor.clamp(min=1).to(grad.dtype))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the gradients to a total norm of ``max_norm`` over every rank's shards; return the
    norm before clipping as a plain tensor, the same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def copy_full_(param: Tensor, full: Tensor) -> None:
    """Write the whole tensor ``full`` into ``param``, which may be sharded: each rank keeps its
    own shard of it (the same values on any number of ranks)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


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
    tied = tied_names(module)
    return {k.removeprefix("model."): v for k, v in sd.items() if k not in tied}


def rank_slice(n: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's share of ``range(n)`` padded (by wrapping around) to the same length on every
    rank, so all ranks run the same number of sharded forwards; and how many are its own."""
    own = list(range(rank, n, world_size))
    width = -(-n // world_size)
    return own + [(rank + world_size * i) % n for i in range(len(own), width)], len(own)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """In-place sum over ranks (on the collective's device for NCCL, then back)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else t.device
        )
        moved = t.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t.copy_(moved.to(t.device))
    return t


def all_gather_objects(obj: object) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


WAIT_POLL_S = 0.5  # how often a waiting rank asks the store
WAIT_LOG_EVERY_S = 60.0  # a rank that waits longer says so this often
_main_first_calls = 0  # every rank enters the main_first sections in the same order


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (converting, downloading, tokenizing into a shared cache);
    the other ranks wait for it, then run it themselves and find the cache filled.

    The ranks wait on the process group's store, not in a collective: a 14 GB download or a
    long tokenization may take longer than ``trainer.collective_timeout_s``, which bounds every
    collective. A rank that dies meanwhile still ends the job: torchrun's agent stops the others
    when a worker exits (and a dead rank 0 takes the store with it where it hosts it).
    """
    global _main_first_calls
    if size() == 1:
        yield
        return
    _main_first_calls += 1
    key = f"prefopt/main_first/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    key += f"/{_main_first_calls}"
    if not is_main():
        _wait_for_count(key, 1, "rank 0 (downloading, converting or tokenizing into the cache)")
    yield
    store = dist.distributed_c10d._get_default_store()
    store.add(key, 1)
    _wait_for_count(key, size(), "the other ranks (reading the cache rank 0 filled)")


def _wait_for_count(key: str, count: int, whom: str) -> None:
    """Poll the default store until ``count`` ranks have added 1 to ``key``; no timeout."""
    store = dist.distributed_c10d._get_default_store()
    start = time.monotonic()
    next_log = start + WAIT_LOG_EVERY_S
    while store.add(key, 0) < count:
        time.sleep(WAIT_POLL_S)
        if time.monotonic() >= next_log:
            log.warning("rank %d: waiting for %s for %.0f s", rank(), whom, next_log - start)
            next_log += WAIT_LOG_EVERY_S


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
