"""Optimizer construction and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from prefopt.config import TrainerConfig


def build_optimizer(cfg: DictConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    target = cfg._target_
    if target.startswith("bitsandbytes."):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"optimizer {target} needs bitsandbytes: pip install 'prefopt[bnb]'"
            ) from e
    factory = instantiate(cfg)
    return factory(params)


def lr_at(step: int, base_lr: float, t: TrainerConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup_ratio * max_steps`` steps, then cosine/linear/constant decay
    to ``min_lr_ratio * base_lr``. ``step`` counts completed optimizer steps (0-based)."""
    warmup = math.ceil(t.warmup_ratio * max_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    floor = t.min_lr_ratio
    if t.schedule == "cosine":
        scale = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    elif t.schedule == "linear":
        scale = floor + (1 - floor) * (1 - min(progress, 1.0))
    elif t.schedule == "constant":
        scale = 1.0
    else:
        raise ValueError(f"trainer.schedule must be cosine, linear or constant, got {t.schedule!r}")
    return base_lr * scale
