"""Config checks run before any work: unknown keys, value ranges, choices, the loss schema; then
the composed config becomes the schema's typed object, once.

Hydra rejects a typo in ``key=value``, but ``+key=value`` adds any key, even to a typed node
(``+trainer.max_stepz=3``), and the loss node is untyped in ``TrainConfig``. :func:`check_schema`
walks the composed config and refuses every key its node's dataclass does not declare, suggesting
the close match. :func:`check_ranges` adds the ranges, :func:`check_choices` the values of every
``choice`` field (``prefopt/config.py`` declares them), each error naming the key and value.
:func:`validate` (training) and :func:`typed` (the other entry points) return the typed config
(``OmegaConf.to_object``: ``TrainConfig`` with its loss node as the loss's dataclass); nothing
below an entry point sees the ``DictConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

from omegaconf import DictConfig, OmegaConf

from prefopt.config import Layout, TrainConfig, TrainerConfig, check_choice
from prefopt.errors import ConfigError

T = TypeVar("T")


def _unknown_keys(node: DictConfig, prefix: str) -> list[ConfigError]:
    errors = []
    if node._is_none():  # an optional sub-config left unset (model.lora)
        return errors
    typ = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(typ):
        names = [f.name for f in dataclasses.fields(typ)]
        for key in node:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                fix = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {names}"
                errors.append(
                    ConfigError(
                        f"unknown key {prefix}{key} ({typ.__name__} has no field {key!r})", fix=fix
                    )
                )
    for key, value in node.items_ex(resolve=False):
        if isinstance(value, DictConfig):
            errors += _unknown_keys(value, f"{prefix}{key}.")
    return errors


def check_schema(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first key that no schema declares (added with ``+``)."""
    errors = _unknown_keys(cfg, "")
    if errors:
        raise errors[0]


def check_loss_schema(loss: DictConfig) -> None:
    """``loss.name`` must be the loss whose schema the node was built from (``loss=<name>``), and
    its values must pass the loss's own ``check``."""
    from prefopt.losses import LOSSES

    if loss.name not in LOSSES:
        raise ConfigError(
            f"loss.name={loss.name!r} is not a registered loss",
            fix=f"choose the loss with loss=<name>, one of {sorted(LOSSES)}",
        )
    typ = OmegaConf.get_type(loss)
    if typ is not LOSSES[loss.name].config_cls:
        owner = next((n for n, s in LOSSES.items() if s.config_cls is typ), typ.__name__)
        raise ConfigError(
            f"loss.name={loss.name!r}, but the loss config is {owner!r}'s schema ({typ.__name__})",
            fix=f"select the loss with loss={loss.name}, not by setting loss.name",
        )
    OmegaConf.to_object(loss).check()  # the loss's own constraints (ranges, combinations)


Rule = tuple[str, Callable[[Any], bool], str]  # (key, holds for a good value, what is required)


def _fraction(v: float) -> bool:
    return 0.0 <= v <= 1.0


RULES: list[Rule] = [
    ("trainer.max_steps", lambda v: v >= 0, ">= 0 (0 derives it from trainer.epochs)"),
    ("trainer.epochs", lambda v: v > 0, "> 0"),
    ("trainer.global_batch_groups", lambda v: v >= 1, ">= 1"),
    ("trainer.micro_batch_groups", lambda v: v >= 1, ">= 1"),
    ("trainer.micro_batch_tokens", lambda v: v >= 0, ">= 0 (0 = micro_batch_groups)"),
    ("trainer.eval_batch_groups", lambda v: v >= 1, ">= 1"),
    ("trainer.log_every", lambda v: v >= 1, ">= 1"),
    ("trainer.eval_every", lambda v: v >= 0, ">= 0 (0 = only before and after training)"),
    ("trainer.save_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("trainer.keep_last", lambda v: v >= 0, ">= 0 (0 keeps every checkpoint)"),
    ("trainer.stop_at_step", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("trainer.warmup_ratio", _fraction, "in [0, 1]"),
    ("trainer.min_lr_ratio", _fraction, "in [0, 1]"),
    ("trainer.max_grad_norm", lambda v: v > 0, "> 0 (a large value such as 1e9 disables clipping)"),
    ("trainer.logps_chunk_size", lambda v: v >= 1, ">= 1"),
    ("trainer.collective_timeout_s", lambda v: v > 0, "> 0"),
    ("trainer.num_threads", lambda v: v >= 0, ">= 0 (0 = torch's default)"),
    ("optimizer.lr", lambda v: v > 0, "> 0"),
    (
        "optimizer.betas",
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.95]",
    ),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optimizer.eps", lambda v: v > 0, "> 0"),
    ("dataset.max_length", lambda v: v >= 2, ">= 2"),
    ("dataset.max_prompt_length", lambda v: v >= 1, ">= 1"),
    ("dataset.max_train_examples", lambda v: v >= 1, ">= 1 (or null for all)"),
    ("dataset.max_eval_examples", lambda v: v >= 1, ">= 1 (or null for all)"),
]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_choices(node: DictConfig, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first ``choice`` field (``prefopt.config.choice``) of
    any schema in ``node`` whose value is not one its ``Literal`` allows."""
    if node._is_none():
        return
    typ = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(typ):
        for f in dataclasses.fields(typ):
            value = OmegaConf.select(node, f.name, throw_on_missing=False)
            if "choices" in f.metadata and value is not None and value not in f.metadata["choices"]:
                raise ConfigError(
                    f"{prefix}{f.name}={value!r}: expected one of {f.metadata['choices']}"
                )
    for key, value in node.items_ex(resolve=False):
        if isinstance(value, DictConfig):
            check_choices(value, f"{prefix}{key}.")


def check_ranges(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first key whose value is out of range."""
    for key, ok, required in RULES:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is None:
            continue
        if isinstance(value, DictConfig | list) or OmegaConf.is_list(value):
            value = list(value)
        elif not _number(value) or math.isnan(value):
            raise ConfigError(f"{key}={value!r}: must be a number {required}")
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={value}: must be {required}")
    check_choices(cfg)
    d = cfg.dataset
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"dataset.max_prompt_length={d.max_prompt_length} must be below "
            f"dataset.max_length={d.max_length}"
        )
    if not (d.eval_path or d.eval_split) and d.eval_size < 1:
        raise ConfigError(
            f"dataset.eval_size={d.eval_size}: with no dataset.eval_path or "
            "eval_split, eval_size groups of train are held out for evaluation",
            fix="set dataset.eval_size >= 1, or give dataset.eval_path",
        )


def validate_config(cfg: DictConfig) -> TrainConfig:
    """Missing values, unknown keys, the loss schema, ranges and choices: no heavy imports, so the
    CLI runs it right after composition, before torch and transformers load. Returns the typed
    config."""
    from prefopt.data.schemas import SCHEMAS

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config values missing: {missing}", fix="set them on the command line")
    check_schema(cfg)
    check_loss_schema(cfg.loss)
    check_ranges(cfg)
    if cfg.dataset.schema not in SCHEMAS:
        known = sorted(SCHEMAS)
        raise ConfigError(f"dataset.schema={cfg.dataset.schema!r}: expected one of {known}")
    return OmegaConf.to_object(cfg)


def typed(cfg: DictConfig, schema: type[T]) -> T:
    """A composed config of the other entry points (generate, evaluate, datagen, ursla, the
    memory plan) as its ``schema``'s typed object, after the checks every schema gets: unknown
    keys and choices."""
    check_schema(cfg)
    check_choices(cfg)
    # ``schema`` types the result; no isinstance check: ``python -m`` re-runs a CLI module as
    # __main__, which registers its schema class anew (ursla's UrslaConfig)
    return cast(T, OmegaConf.to_object(cfg))


def validate(composed: DictConfig) -> TrainConfig:
    """Fail before any work: :func:`validate_config`, then what needs the installed libraries.
    Returns the typed config the run uses from here on."""
    import torch

    from prefopt.model.adapters import check_quantize
    from prefopt.model.attention import Target, choose

    cfg = validate_config(composed)
    check_quantize(cfg.model)  # LoRA / QLoRA: a clear error before loading
    t = cfg.trainer
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda, but torch sees no CUDA device on this machine",
            fix="run on a GPU node (CUDA_VISIBLE_DEVICES, the job's GPU request), or set "
            "trainer.device=auto (the CPU where there is no GPU)",
        )
    # the kernel registry refuses a kernel that cannot run this layout, device or precision
    # (the model's own needs, a logit softcap, are checked once its config is read)
    choose(cfg.model.attn_implementation, Target.of_trainer(t))
    return cfg


def validate_batching(t: TrainerConfig, world_size: int) -> None:
    """Every rank must run the same number of micro-batches per step (sharded collectives)."""
    check_choice("trainer.layout", t.layout, Layout)
    if t.micro_batch_tokens:  # the token-budget plan gives every rank as many micro-batches
        if t.global_batch_groups % world_size:
            raise ConfigError(
                f"trainer.global_batch_groups={t.global_batch_groups} must be a "
                f"multiple of the {world_size} ranks"
            )
        return
    if t.global_batch_groups % (t.micro_batch_groups * world_size):
        raise ConfigError(
            f"trainer.global_batch_groups={t.global_batch_groups} must be a multiple of "
            f"trainer.micro_batch_groups x ranks = {t.micro_batch_groups} x {world_size}"
        )
