"""Step extras: the one extension point for losses that need more than (policy, reference,
scores). A loss declares them by name, ``register_loss(..., extras=("mismatched_kl",))``;
``EXTRAS`` maps each name to its ``StepExtra`` class (``base.py`` says what one provides).

The loop, the held-out evaluation, the model build, the memory plan, the banner and the
checkpoint use them only through this module: ``StepExtras.build`` once per run,
``inputs``/``regularizer`` once per step (``inputs`` once per evaluation pass too),
``reference_model_needed`` before building, and ``TrainState.extra_state`` for their state.

To add one: subclass ``StepExtra`` in a module here, add it to ``EXTRAS``, name it in the loss's
registration, and add the fields it reads to the loss's config dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor

from prefopt.losses.registry import LossConfig, LossSpec
from prefopt.model.logprobs import StatsModel
from prefopt.train.extras.base import ExtraEnv, ExtraState, StepExtra, StepRows
from prefopt.train.extras.mismatched_kl import MismatchedKL
from prefopt.train.extras.on_policy_kl import OnPolicyKL

__all__ = [
    "EXTRAS",
    "ExtraEnv",
    "ExtraState",
    "StepExtra",
    "StepExtras",
    "StepRows",
    "extra_classes",
    "reference_model_needed",
]

EXTRAS: dict[str, type[StepExtra]] = {
    "mismatched_kl": MismatchedKL,  # KTO's kl_estimate (Ethayarajh et al. 2024, Sec. 4.1)
    "on_policy_kl": OnPolicyKL,  # SPO's KL(pi || ref) on on-policy samples (Eq. 15, Alg. 1)
}


def extra_classes(spec: LossSpec) -> dict[str, type[StepExtra]]:
    """The classes of the extras ``spec`` declares, in declaration order.

    Raises:
        KeyError: a declared name is not in ``EXTRAS``.
        TypeError: the loss config lacks a field the extra reads.
    """
    where = f"loss {spec.name!r} ({spec.fn.__module__}, register_loss(extras=...))"
    out = {}
    for name in spec.extras:
        if name not in EXTRAS:
            raise KeyError(f"{where} declares extra {name!r}; known extras: {sorted(EXTRAS)}")
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        missing = [f for f in EXTRAS[name].config_fields if f not in fields]
        if missing:
            raise TypeError(
                f"{where}: extra {name!r} reads loss config fields {missing}, which "
                f"{spec.config_cls.__name__} lacks"
            )
        out[name] = EXTRAS[name]
    return out


def reference_model_needed(
    spec: LossSpec, loss_cfg: LossConfig, reference: str, *, training: bool = True
) -> bool:
    """Whether the run holds a frozen reference model, for the loss config ``loss_cfg`` and
    ``trainer.reference``: reference log-probs read in the loop (``model``), or an active extra
    that runs the reference on rows no precomputed cache holds (KTO's mismatched pairs; SPO's
    on-policy samples when its KL weight is positive), whatever the setting. ``training=False``
    (a held-out evaluation): only the extras' inputs run there, not their regularizers."""
    if spec.needs_reference and reference == "model":
        return True
    return any(
        cls.uses_reference and cls.active(loss_cfg) and (training or bool(cls.input_names))
        for cls in extra_classes(spec).values()
    )


class StepExtras:
    """The active extras of one run's loss, called together: their inputs merged into one dict
    of loss keywords, their regularizers summed into one closure."""

    def __init__(self, extras: dict[str, StepExtra]) -> None:
        self.extras = extras

    @classmethod
    def build(cls, spec: LossSpec, loss_cfg: LossConfig, env: ExtraEnv) -> StepExtras:
        active = {n: k for n, k in extra_classes(spec).items() if k.active(loss_cfg)}
        names = [i for k in active.values() for i in k.input_names]
        if len(names) != len(set(names)):
            raise ValueError(f"loss {spec.name!r}: two extras provide the same input ({names})")
        return cls({n: k(loss_cfg, env) for n, k in active.items()})

    def __bool__(self) -> bool:
        return bool(self.extras)

    def inputs(self, policy: StatsModel, rows: StepRows) -> dict[str, Tensor]:
        """Every extra's loss inputs for the step (or evaluation pass) ``rows``."""
        out: dict[str, Tensor] = {}
        for extra in self.extras.values():
            out.update(extra.inputs(policy, rows))
        return out

    def regularizer(
        self, policy: StatsModel, rows: StepRows, states: dict[str, ExtraState]
    ) -> Callable[[], Tensor] | None:
        """The step's regularizers as one closure (None without any). ``states``: this rank's
        ``TrainState.extra_state``, one dict per extra, kept between steps and checkpointed."""
        terms = []
        for name, extra in self.extras.items():
            term = extra.regularizer(policy, rows, states.setdefault(name, {}))
            if term is not None:
                terms.append(term)
        if len(terms) <= 1:
            return terms[0] if terms else None

        def regularize() -> Tensor:  # each term runs its own backward
            return sum((term() for term in terms[1:]), terms[0]())

        return regularize
