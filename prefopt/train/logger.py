"""Metric loggers behind one protocol: metrics.jsonl always, W&B when asked, nothing off rank 0."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

from prefopt.config import LoggerConfig, LoggerKind, check_choice
from prefopt.model.parallel import is_main

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def _step(line: str) -> float:
    """The step of a metrics line; inf for a line torn by a kill (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class JsonlLogger:
    """One JSON line per log call. A resumed run first drops the lines of steps it is about to
    log again (written after its checkpoint, before the kill), so no step appears twice; the
    first step it logs is the one after the checkpoint, or 0 for a fresh start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None

    def _open(self, first_step: int) -> IO[str]:
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _step(line) < first_step]
            if len(kept) < len(lines):
                dropped = len(lines) - len(kept)
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
                os.replace(tmp, self.path)
                msg = "%s: dropped %d lines from step %d on (logged before the resume)"
                log.info(msg, self.path, dropped, first_step)
        return self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.file is None:
            self.file = self._open(step)
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class WandbLogger:
    """W&B run in the run dir; offline mode when no API key is configured (sync later)."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: str,
        config: dict[str, Any],
        sweep: SweepInfo | None = None,
    ) -> None:
        import wandb

        mode = wandb_mode(cfg.mode)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            # The jobs of one sweep share a group and are tagged with their swept values.
            group=cfg.group or (sweep.group if sweep else None),
            tags=[*cfg.tags, *(sweep.tags if sweep else [])],
            dir=run_dir,
            config=config,
            mode=mode,
            resume="allow",  # a resumed run (same run dir) continues the same W&B run
            id=hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16],
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_mode(mode: str) -> str:
    """``auto``: WANDB_MODE if set, else online with an API key (or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    has_key = os.environ.get("WANDB_API_KEY") or Path.home().joinpath(".netrc").is_file()
    return os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")


class MultiLogger:
    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class SweepInfo(NamedTuple):
    group: str  # the sweep's directory, shared by its jobs
    tags: list[str]  # this job's overrides, e.g. ["loss.beta=2.5"] (W&B caps tags at 64 chars)


def build_logger(
    cfg: LoggerConfig, run_dir: str, config: dict[str, Any], sweep: SweepInfo | None = None
) -> MetricLogger:
    """metrics.jsonl, and W&B when ``logger.kind=wandb`` (``config``: the run's values, which W&B
    records with the run). Off rank 0: a logger that writes nothing."""
    if not is_main():
        return MultiLogger([])
    check_choice("logger.kind", cfg.kind, LoggerKind)
    loggers: list[MetricLogger] = [JsonlLogger(Path(run_dir, "metrics.jsonl"))]
    if cfg.kind == "wandb":
        loggers.append(WandbLogger(cfg, run_dir, config, sweep))
    return MultiLogger(loggers)
