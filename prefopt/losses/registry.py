"""Loss registry: ``name -> LossSpec(fn, config dataclass, capabilities)``.

A loss is a pure function ``fn(policy, ref, scores, **hparams) -> LossOutput`` over (B, K)
statistics. Its hyper-parameter dataclass is the schema of ``conf/loss/<name>.yaml``: the decorator
stores it in Hydra's ConfigStore as ``loss/_schema_<name>`` so a typo or a wrong type in a loss key
fails at composition. The loop reads the capabilities (``needs_reference``, ``k``, ``state``,
``extras``), never the name.

Extras are what a loss needs beyond (policy, reference, scores): a keyword input computed once
per optimizer step (KTO's ``kl_estimate``) or a per-step regularizer (SPO's on-policy KL). A loss
declares them by name (``extras=("mismatched_kl",)``); the implementations live in
``prefopt.train.extras``, so this module stays free of models and light to import.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from torch import Tensor

from prefopt.types import LossOutput

LossFn = Callable[..., LossOutput]


LossState = dict[str, Tensor]


@dataclass(frozen=True)
class StateSpec:
    """Running statistics of a loss (alpha-DPO's and LMPO's z-scores).

    ``init(**fields)`` gives the starting state; ``update(state, sums, **fields)`` folds the
    step's all-reduced ``LossOutput.stat_updates`` into a new state, with ``fields`` every field
    of the loss config but ``name`` (take the ones you read, ``**_`` the rest). Both are pure;
    the loop passes the state to the loss as ``state=`` and saves it in checkpoints.
    """

    init: Callable[..., LossState]
    update: Callable[..., LossState]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    config_cls: type
    needs_reference: bool  # reference log-probs required (frozen copy of the start model)
    k: int | None  # responses per group the loss accepts; None = any K >= 2; 2 = pairwise
    state: StateSpec | None = None  # running statistics, for stateful losses
    # Names in the ``prefopt.train.extras`` table: per-step inputs and regularizers the loop runs
    # for this loss ("mismatched_kl": KTO's kl_estimate; "on_policy_kl": SPO's KL term).
    extras: tuple[str, ...] = ()

    def hparams(self, cfg: LossConfig) -> dict[str, Any]:
        """The config fields that ``fn`` takes as keywords.

        Fields the function does not name (``name``; SPO's ``kl_*`` settings, read by its extra;
        alpha-DPO's ``stats_init``, read by its state) stay out of the call, so a loss's YAML can
        carry them without the function seeing them.
        """
        params = inspect.signature(self.fn).parameters
        return {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(self.config_cls)
            if f.name in params and f.name != "state"
        }

    def state_fields(self, cfg: LossConfig) -> dict[str, Any]:
        """Every field of the loss config but ``name``: what ``state.init``/``update`` get."""
        return {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(self.config_cls)
            if f.name != "name"
        }

    def init_state(self, cfg: LossConfig) -> LossState:
        """The running statistics before the first step (stateful losses only)."""
        return self.state.init(**self.state_fields(cfg))

    def update_state(self, state: LossState, sums: dict[str, Tensor], cfg: LossConfig) -> LossState:
        """The state after one applied step, from its all-reduced ``stat_updates``."""
        return self.state.update(state, sums, **self.state_fields(cfg))


LOSSES: dict[str, LossSpec] = {}


@dataclass
class LossConfig:
    """Base of every loss schema; ``name`` selects the registry entry."""

    name: str = "???"

    def check(self) -> None:
        """Refuse values this loss cannot take that a type cannot express (a range, a choice, a
        combination of keys) with a ``ConfigError`` naming ``loss.<key>``. The config checks
        call it before any model is loaded; by default every typed value is accepted."""


def register_loss(
    name: str,
    config_cls: type,
    *,
    needs_reference: bool = False,
    k: int | None = None,
    state: StateSpec | None = None,
    extras: tuple[str, ...] = (),
) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` under ``name`` with its hyper-parameter dataclass ``config_cls``.

    A stateful loss (``state`` given) takes the current state as the keyword ``state``. Each name
    in ``extras`` selects a ``prefopt.train.extras`` entry: the keyword inputs it provides
    (``kl_estimate``) are passed to ``fn``, its regularizer is added to the step's gradient, and
    the config fields it reads (SPO's ``kl_*``) live in ``config_cls`` without ``fn`` naming them.
    """
    if isinstance(extras, str) or not all(isinstance(e, str) for e in extras):
        raise TypeError(f"loss {name!r}: extras must be a tuple of names, got {extras!r}")

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        if not issubclass(config_cls, LossConfig):
            raise TypeError(f"{config_cls.__name__} must subclass LossConfig")
        LOSSES[name] = LossSpec(name, fn, config_cls, needs_reference, k, state, tuple(extras))
        ConfigStore.instance().store(group="loss", name=f"_schema_{name}", node=config_cls)
        return fn

    return decorator


def get_spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; registered losses: {sorted(LOSSES)}") from None


def build_loss(cfg: LossConfig) -> tuple[LossSpec, LossFn]:
    """Return the spec and ``fn`` with the config's hyper-parameters bound as keywords."""
    spec = get_spec(cfg.name)
    return spec, functools.partial(spec.fn, **spec.hparams(cfg))
