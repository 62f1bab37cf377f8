"""Loss registry: ``name -> LossSpec(fn, config dataclass, capabilities)``.

A loss is a pure function ``fn(policy, ref, scores, **hparams) -> LossOutput`` over (B, K)
statistics. Its hyper-parameter dataclass is the schema of ``conf/loss/<name>.yaml``: the decorator
stores it in Hydra's ConfigStore as ``loss/_schema_<name>`` so a typo or a wrong type in a loss key
fails at composition. The loop reads the capabilities (``needs_reference``, ``k``), never the name.
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

    ``init(**hparams)`` gives the starting state; ``update(state, sums, **hparams)`` folds the
    step's all-reduced ``LossOutput.stat_updates`` into a new state. Both are pure; the loop
    passes the state to the loss as ``state=`` and saves it in checkpoints.
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
    # SPO: the loop adds kl_weight * KL(pi || ref) on on-policy samples (config fields kl_weight,
    # kl_every, kl_num_samples, kl_max_new_tokens), with a reference model when kl_weight > 0.
    on_policy_kl: bool = False
    # KTO: the loop passes ``kl_estimate`` (a scalar, no grad): the mean over the whole optimizer
    # step (all micro-batches and ranks) of log pi - log ref on mismatched (prompt, response)
    # pairs (``prefopt.train.mismatched``), for the KL baseline z_0.
    needs_mismatched: bool = False

    def reference_model_needed(self, cfg: Any, reference: str) -> bool:
        """Whether the loop holds a frozen reference model, for the loss config ``cfg`` and
        ``trainer.reference``: reference log-probs read in the loop (``model``), or forwards on
        rows no precomputed cache holds (KTO's mismatched pairs; SPO's on-policy samples when its
        KL weight is positive) whatever the setting."""
        kl = self.on_policy_kl and cfg.get("kl_weight", 0) > 0
        return (self.needs_reference and reference == "model") or kl or self.needs_mismatched

    def hparams(self, cfg: Any) -> dict[str, Any]:
        """The config fields that ``fn`` takes as keywords.

        Fields the function does not name (``name``; SPO's ``kl_*`` settings) are read by the
        loop from the config, so a loss's YAML can carry them without the function seeing them.
        """
        params = inspect.signature(self.fn).parameters
        return {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(self.config_cls)
            if f.name in params and f.name != "state"
        }


LOSSES: dict[str, LossSpec] = {}


@dataclass
class LossConfig:
    """Base of every loss schema; ``name`` selects the registry entry."""

    name: str = "???"


def register_loss(
    name: str,
    config_cls: type,
    *,
    needs_reference: bool = False,
    k: int | None = None,
    state: StateSpec | None = None,
    on_policy_kl: bool = False,
    needs_mismatched: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` under ``name`` with its hyper-parameter dataclass ``config_cls``.

    A stateful loss (``state`` given) takes the current state as the keyword ``state``.
    """

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        if not issubclass(config_cls, LossConfig):
            raise TypeError(f"{config_cls.__name__} must subclass LossConfig")
        LOSSES[name] = LossSpec(
            name, fn, config_cls, needs_reference, k, state, on_policy_kl, needs_mismatched
        )
        ConfigStore.instance().store(group="loss", name=f"_schema_{name}", node=config_cls)
        return fn

    return decorator


def get_spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; registered losses: {sorted(LOSSES)}") from None


def build_loss(cfg: Any) -> tuple[LossSpec, LossFn]:
    """Return the spec and ``fn`` with the config's hyper-parameters bound as keywords."""
    spec = get_spec(cfg.name)
    return spec, functools.partial(spec.fn, **spec.hparams(cfg))
