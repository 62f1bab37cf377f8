"""Process-group setup and cross-rank reductions: the only module that knows about ranks.

One code path for 1 and N processes: without torchrun the world has size 1 and the reductions are
identities. Sharding the model with FSDP2 (``fully_shard``) is added here by the scale-out issue;
until then a multi-process launch stops with a clear error instead of training unsharded copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str = "auto") -> World:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise NotImplementedError(
            "multi-process training needs the FSDP2 path (scale-out issue); run one process"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    return World(rank=0, world_size=1, local_rank=0, device=torch.device(device))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
