"""Optimizer construction and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch
from hydra.utils import instantiate

from prefopt.config import OptimizerConfig, Schedule, TrainerConfig, check_choice
from prefopt.deps import check

STOCHASTIC_ROUNDING = ("prefopt.train.optim.adamw_bf16_sr",)


def uses_torchao(target: str) -> bool:
    """Whether an optimizer ``_target_`` is torchao's (directly or through a wrapper here)."""
    return target.startswith("torchao.") or target in STOCHASTIC_ROUNDING


def build_optimizer(
    cfg: OptimizerConfig, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    target = cfg._target_
    if uses_torchao(target):
        check("torchao")  # installed, and a release with torchao.optim
    elif target.startswith("bitsandbytes."):
        check("bitsandbytes")
    if any(p.dtype == torch.bfloat16 for p in params) and target not in STOCHASTIC_ROUNDING:
        from prefopt.errors import ConfigError

        raise ConfigError(
            f"trainer.master_dtype=bfloat16 with optimizer {target}: a round-to-nearest update "
            "of bf16 weights drops every step below 1/256 of a weight (at lr 5e-7, almost all)",
            fix="optimizer=adamw_bf16_sr (stochastic rounding), or trainer.master_dtype=float32",
        )
    factory = instantiate(cfg)
    return factory(params)


def adamw_bf16_sr(
    params: list[torch.nn.Parameter], lr: float, betas: list[float], weight_decay: float, eps: float
) -> torch.optim.Optimizer:
    """torchao's AdamW with bf16 stochastic rounding of the weight update (for bf16 master
    weights, ``trainer.master_dtype=bfloat16``); its moments are kept in the weights' dtype."""
    from torchao.optim import _AdamW

    return _AdamW(
        params,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        bf16_stochastic_round=True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate. torchao's optimizers keep it as a tensor (so
    that a compiled step does not recompile when it changes) and refuse a float in its place:
    fill that tensor in place; torch's take a float."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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
    else:
        check_choice("trainer.schedule", t.schedule, Schedule)
        scale = 1.0  # constant
    return base_lr * scale
