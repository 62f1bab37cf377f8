"""Checkpoints: model, optimizer and TrainState, written atomically; keep-last-N.

Layout: ``<run_dir>/checkpoints/step_000030/{model.safetensors, optimizer.pt, train_state.pt}``.
A checkpoint is written into a hidden temporary directory and renamed when complete, so a crash
mid-write leaves the previous checkpoint as the latest good one. The learning-rate schedule is a
pure function of the step, so the step is all the scheduler state there is.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

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


def save_checkpoint(
    run_dir: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep_last: int,
) -> Path:
    root = Path(run_dir, "checkpoints")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp-step_{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state.rng = rng_state()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(asdict(state), tmp / "train_state.pt")
    if final.exists():  # re-saving the same step (e.g. resumed at the end): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str) -> list[Path]:
    root = Path(run_dir, "checkpoints")
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, run_dir: str) -> Path | None:
    """``auto``: the latest checkpoint of this run dir, if any; ``never``; or an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "train_state.pt").is_file():
        raise FileNotFoundError(f"trainer.resume={resume}: no checkpoint there (train_state.pt)")
    return path


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> TrainState:
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    state = TrainState(**torch.load(path / "train_state.pt", weights_only=False))
    set_rng_state(state.rng)
    return state
