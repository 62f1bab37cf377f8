"""Checkpoints: sharded model + optimizer (torch.distributed.checkpoint) and a small TrainState.

Layout: ``<run_dir>/checkpoints/step_000030/`` with DCP shards (``*.distcp``, ``.metadata``),
``train_state.pt`` (rank 0: step, data position, counters, loss state, RNG, the loss extras'
state) and ``rng_rank<r>.pt`` for the other ranks (their RNG and their own extras' state, e.g.
SPO's on-policy samples). Everything is
written into a hidden temporary directory that rank 0 renames
when all ranks are done, so a crash mid-write leaves the previous checkpoint as the latest good
one. The last file written is ``manifest.json`` (the completeness marker): each file's size and
SHA-256, hashed by the rank that wrote it. Resuming verifies it (each rank re-hashes its own
files) and takes the newest checkpoint that verifies, logging the ones it skipped and why; a
failed write (a full disk, named as such) removes the partial directory, so the previous
checkpoint stays the one to resume from. The learning-rate schedule is a pure function of the
step: the step is all the scheduler state there is. Resuming needs the same world size (per-rank
data slices and RNG).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import set_state_dict

from prefopt.atomic import file_sha256
from prefopt.errors import CheckpointError
from prefopt.model.adapters import checkpoint_state_dicts
from prefopt.model.parallel import all_gather_objects, barrier, is_main

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
FileSums = dict[str, dict]  # file name -> {"bytes": int, "sha256": str, "rank": int}


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    consumed: int = 0  # views consumed from the endless epoch stream (the data position)
    skipped_steps: int = 0  # steps dropped because the loss or the gradient was not finite
    tokens: int = 0
    wall_time: float = 0.0
    loss_state: dict = field(default_factory=dict)  # running statistics of stateful losses
    # this rank's state of the loss's extras, by extra name (``prefopt.train.extras``; SPO's
    # on-policy samples): each rank saves and restores its own
    extra_state: dict = field(default_factory=dict)
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


def _sums(root: Path, names: list[str], rank: int) -> FileSums:
    return {
        n: {"bytes": (root / n).stat().st_size, "sha256": file_sha256(root / n), "rank": rank}
        for n in names
    }


def _own_files(root: Path, rank: int) -> list[str]:
    """The files this rank wrote: its DCP shards (``__<rank>_*.distcp``) and its RNG state."""
    mine = (f"__{rank}_", f"rng_rank{rank}.pt")
    return sorted(p.name for p in root.iterdir() if p.name.startswith(mine))


def _state_bytes(obj: object) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict: what a save writes."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _cause(e: BaseException) -> BaseException:
    """The writer's own error inside DCP's ``CheckpointException`` (which prints a traceback)."""
    if isinstance(e, CheckpointException) and e.failures:
        return _cause(next(iter(e.failures.values()))[0])
    return e


def _is_no_space(e: BaseException) -> bool:
    seen: BaseException | None = _cause(e)
    while seen is not None:  # torch.save reports a full disk without errno ("unexpected pos")
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write_failure(
    e: BaseException, tmp: Path, needed: int, previous: Path | None
) -> CheckpointError:
    """Name the cause of a failed write: no space (errno ENOSPC, or fewer bytes free than the
    save needs: torch.save reports a full disk as "unexpected pos"), or whatever it was."""
    free = shutil.disk_usage(tmp.parent).free
    resume = f"training resumes from {previous.name}" if previous else "no checkpoint yet"
    if _is_no_space(e) or free < needed:
        return CheckpointError(
            f"no space left on the device of {tmp.parent} while writing checkpoint {tmp.name}: "
            f"it needs about {needed} bytes on this rank ({needed / 2**30:.2f} GiB), "
            f"{free} bytes are free",
            fix=f"free space (or lower trainer.keep_last), then rerun with the same run dir; "
            f"{resume}",
        )
    cause = _cause(e)
    what = f"writing checkpoint {tmp} failed: {type(cause).__name__}: {cause}"
    return CheckpointError(what, fix=f"rerun with the same run dir; {resume}")


def _all_ok(error: CheckpointError | None) -> None:
    """Every rank learns whether any failed (no rank left waiting at a barrier); the ones that
    failed raise their own error, the others the first one."""
    errors = all_gather_objects(str(error) if error else None)
    if error is not None:
        raise error
    first = next((e for e in errors if e), None)
    if first is not None:
        raise CheckpointError(f"another rank failed to write the checkpoint: {first}")


def save_checkpoint(
    run_dir: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep_last: int,
) -> Path:
    root = Path(run_dir, "checkpoints")
    final = root / f"step_{state.step:06d}"
    tmp = root / f".tmp-step_{state.step:06d}"
    previous = next((p for p in reversed(list_checkpoints(run_dir)) if p != final), None)
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd, _ = checkpoint_state_dicts(model, optimizer)  # LoRA: adapters only
    rank, error, sums = _rank(), None, {}
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        state.rng = rng_state()
        if is_main():
            torch.save(asdict(state), tmp / "train_state.pt")
        else:
            own = {"rng": state.rng, "extra_state": state.extra_state}  # this rank's own state
            torch.save(own, tmp / f"rng_rank{rank}.pt")
        sums = _sums(tmp, _own_files(tmp, rank), rank)
    except (OSError, RuntimeError, CheckpointException) as e:  # torch.save's, DCP's wrappers
        error = _write_failure(e, tmp, _state_bytes([model_sd, optim_sd]) + (1 << 20), previous)
    try:
        _all_ok(error)
    except CheckpointError:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the latest
        raise
    gathered = all_gather_objects(sums)
    error = None
    if is_main():
        try:
            files: FileSums = {k: v for s in gathered for k, v in s.items()}
            rest = sorted(p.name for p in tmp.iterdir() if p.name not in files)
            files.update(_sums(tmp, rest, 0))  # .metadata, train_state.pt, anything else
            manifest = {"step": state.step, "world_size": state.world_size, "files": files}
            _write_manifest(tmp, manifest)
            if final.exists():  # re-saving the same step (e.g. resumed at the end): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = _write_failure(e, tmp, 1 << 20, previous)
    _all_ok(error)
    if is_main():
        _prune(list_checkpoints(run_dir), final, keep_last)
    barrier()
    return final


def _prune(found: list[Path], final: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` up to ``final``. Newer ones belong to the timeline this run
    resumed away from (damaged ones it skipped, or beyond an older explicit resume): left in
    place, ``resume=auto`` would pick them after the next interruption."""
    mine = found[: found.index(final) + 1]
    for stale in found[len(mine) :]:
        log.warning("removing %s: newer than the resumed run's checkpoint %s", stale, final.name)
        shutil.rmtree(stale, ignore_errors=True)
    for old in mine[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _write_manifest(root: Path, manifest: dict) -> None:
    with (root / MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename publishes the directory


def list_checkpoints(run_dir: str) -> list[Path]:
    root = Path(run_dir, "checkpoints")
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it verifies. A collective: each rank
    re-hashes the files its rank wrote (so no rank reads the whole model), rank 0 the rest."""
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    reason = None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files: FileSums = manifest["files"]
    except FileNotFoundError:
        reason = f"no {MANIFEST} (an interrupted save, or written before prefopt checked them)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    else:
        for name, want in sorted(files.items()):
            if want["rank"] % world != rank:
                continue
            f = path / name
            if not f.is_file():
                reason = f"{name} is missing"
            elif f.stat().st_size != want["bytes"]:
                reason = f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
            elif file_sha256(f) != want["sha256"]:
                reason = f"{name} is damaged (SHA-256 differs from {MANIFEST})"
            if reason:
                break
    return next((r for r in all_gather_objects(reason) if r), None)


def resolve_resume(resume: str, run_dir: str) -> Path | None:
    """``auto``: the newest checkpoint of this run dir that verifies; ``never``; or an explicit
    checkpoint directory, which must verify. Every rank takes part and agrees.

    Raises:
        CheckpointError: an explicit checkpoint is missing or damaged, or ``auto`` finds
            checkpoints and none verifies.
    """
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        reason = verify_checkpoint(path) if path.is_dir() else "no such directory"
        if reason:
            raise CheckpointError(
                f"trainer.resume={resume}: cannot resume from it: {reason}",
                fix="give a complete checkpoint dir (checkpoints/step_N)",
            )
        return path
    candidates = all_gather_objects(list_checkpoints(run_dir))[0]  # rank 0's listing for all
    skipped = []
    for path in reversed(candidates):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        skipped.append(f"{path.name}: {reason}")
        if is_main():
            log.warning("skipping checkpoint %s: %s", path, reason)
    if skipped:
        raise CheckpointError(
            f"no checkpoint in {Path(run_dir, 'checkpoints')} verifies ({'; '.join(skipped)})",
            fix="restore a good copy, or move the damaged step_* dirs away to start over",
        )
    return None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int
) -> TrainState:
    try:
        state = TrainState(**torch.load(path / "train_state.pt", weights_only=False))
    except Exception as e:  # verified, so this is a format change: name the file, keep the cause
        what = f"{path / 'train_state.pt'} cannot be read: {type(e).__name__}: {e}"
        raise CheckpointError(what) from e
    if state.world_size != world_size:
        what = f"{path} was written by {state.world_size} ranks; resuming needs as many"
        raise CheckpointError(f"{what} (got {world_size})")
    model_sd, optim_sd, opts = checkpoint_state_dicts(model, optimizer)  # LoRA: adapters only
    loaded = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(loaded, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # e.g. the model config changed since the save
        what = f"{path}: the model and optimizer state do not load: {type(e).__name__}: {e}"
        fix = "resume with the config the run was started with (.hydra/config.yaml)"
        raise CheckpointError(what, fix=fix) from e
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=opts,
    )
    rank = _rank()
    if rank > 0:  # every rank keeps its own RNG and extras' state (SPO: its own samples)
        own = torch.load(path / f"rng_rank{rank}.pt", weights_only=False)
        state.rng, state.extra_state = own["rng"], own["extra_state"]
    set_rng_state(state.rng)
    return state


class Preemption:
    """SIGTERM/SIGUSR1 (SLURM's warning before the time limit) -> checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.requested = True
