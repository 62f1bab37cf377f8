"""Checkpoints: sharded model + optimizer (torch.distributed.checkpoint) and a small TrainState.

Layout: ``<run_dir>/checkpoints/step_000030/`` with DCP shards (``*.distcp``, ``.metadata``),
``train_state.pt`` (rank 0: step, data position, counters, loss state, RNG) and ``rng_rank<r>.pt``
for the other ranks. Everything is written into a hidden temporary directory that rank 0 renames
when all ranks are done, so a crash mid-write leaves the previous checkpoint as the latest good
one. The learning-rate schedule is a pure function of the step: the step is all the scheduler
state there is. Resuming needs the same world size (per-rank data slices and RNG).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import set_state_dict

from prefopt.adapters import checkpoint_state_dicts
from prefopt.parallel import all_gather_objects, barrier, is_main

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    consumed: int = 0  # views consumed from the endless epoch stream (the data position)
    skipped_steps: int = 0  # steps dropped because the loss or the gradient was not finite
    tokens: int = 0
    wall_time: float = 0.0
    loss_state: dict = field(default_factory=dict)  # running statistics of stateful losses
    kl_samples: list = field(default_factory=list)  # SPO's on-policy samples (prompt, response)
    world_size: int = 1
    rng: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(
    run_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
    keep_last: int,
) -> Path:  # fmt: skip
    root = Path(run_dir, "checkpoints")
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp-step_{state.step:06d}"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd, _ = checkpoint_state_dicts(model, optimizer)  # LoRA: adapters only
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    state.rng = rng_state()
    if is_main():
        torch.save(asdict(state), tmp / "train_state.pt")
    else:
        torch.save(state.rng, tmp / f"rng_rank{_rank()}.pt")
    barrier()
    if is_main():
        if final.exists():  # re-saving the same step (e.g. resumed at the end): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(run_dir: str) -> list[Path]:
    root = Path(run_dir, "checkpoints")
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, run_dir: str) -> Path | None:
    """``auto``: the latest checkpoint of this run dir, if any; ``never``; or an explicit path.

    Every rank must agree, so rank 0 decides and the others follow.
    """
    found: Path | None = None
    if resume == "auto":
        candidates = list_checkpoints(run_dir)
        found = candidates[-1] if candidates else None
    elif resume != "never":
        found = Path(resume)
        if not (found / "train_state.pt").is_file():
            raise FileNotFoundError(
                f"trainer.resume={resume}: no checkpoint there (train_state.pt)"
            )
    return all_gather_objects(found)[0]


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int
) -> TrainState:
    state = TrainState(**torch.load(path / "train_state.pt", weights_only=False))
    if state.world_size != world_size:
        raise ValueError(f"{path} was written by {state.world_size} ranks; resuming needs the "
                         f"same number (got {world_size})")  # fmt: skip
    model_sd, optim_sd, opts = checkpoint_state_dicts(model, optimizer)  # LoRA: adapters only
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"], options=opts)  # fmt: skip
    rank = _rank()
    set_rng_state(state.rng if rank == 0 else torch.load(path / f"rng_rank{rank}.pt",
                                                         weights_only=False))  # fmt: skip
    return state
