"""What a step extra is: the base class every entry of ``prefopt.train.extras.EXTRAS`` extends,
the rows it sees, and what it may use besides the policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import datasets
from torch import Tensor

from prefopt.data.loading import View
from prefopt.losses.registry import LossConfig
from prefopt.model.adapters import AdaptersOff
from prefopt.model.logprobs import StatsModel
from prefopt.train.passes import PassOptions

ExtraState = dict[str, Any]  # one extra's state on one rank, checkpointed with that rank


class StepRows(NamedTuple):
    """The rows of one optimizer step, or of one evaluation pass."""

    data: datasets.Dataset
    views: list[View]
    # The step's views in the global order, every rank's (a rank's own groups are
    # ``order[rank::world_size]``); an evaluation pass: every view of the split.
    order: list[int]
    step: int = 0  # optimizer steps completed before this one (an evaluation: 0, unused)

    @classmethod
    def split(cls, data: datasets.Dataset, views: list[View]) -> StepRows:
        """Every view of a split, in order: the rows of an evaluation pass."""
        return cls(data, views, list(range(len(views))))


@dataclass(frozen=True)
class ExtraEnv:
    """What an extra may use besides the policy: the frozen reference (``None`` when the run has
    none; a LoRA run's is the policy with its adapters off), the no-grad pass settings (groups
    per forward, padding id, log-prob chunk, autocast) and the tokenizer's EOS id."""

    ref: StatsModel | AdaptersOff | None
    passes: PassOptions
    eos_id: int


class StepExtra:
    """A per-step input or regularizer a loss declares by name (``register_loss(extras=...)``).

    Override what the extra provides; the defaults provide nothing:

    - ``inputs``: keyword inputs of the loss, computed once per optimizer step over the whole
      step (every micro-batch and rank) and once per evaluation pass, so a number such as KTO's
      ``kl_estimate`` does not depend on how the step is split. Every rank calls it, in step.
    - ``regularizer``: a closure the step calls once after normalising the group gradients; it
      runs its own backward on every rank, finite or not, and returns its detached value (the
      step logs it as ``regularizer`` and skips the update when it is not finite). ``state`` is
      this extra's dict on this rank, saved in every checkpoint and restored on resume.

    Class attributes say what the loop must provide without building the extra: the loss inputs
    it provides (``input_names``, keyword-only parameters of the loss function), the loss-config
    fields it reads (``config_fields``, which the loss function does not name), and whether it
    runs the frozen reference (``uses_reference``: then the run holds a reference model even with
    ``trainer.reference=precompute``, whose cache covers only the data's own rows). ``active``
    turns the extra off for a config (SPO with ``kl_weight=0``).
    """

    input_names: ClassVar[tuple[str, ...]] = ()
    config_fields: ClassVar[tuple[str, ...]] = ()
    uses_reference: ClassVar[bool] = False

    def __init__(self, loss_cfg: LossConfig, env: ExtraEnv) -> None:
        self.env = env

    @classmethod
    def active(cls, loss_cfg: LossConfig) -> bool:
        """Whether the loop runs this extra for the loss config ``loss_cfg``."""
        return True

    def inputs(self, policy: StatsModel, rows: StepRows) -> dict[str, Tensor]:
        """Loss keyword inputs for the step (or evaluation pass) ``rows``; names in
        ``input_names``."""
        return {}

    def regularizer(
        self, policy: StatsModel, rows: StepRows, state: ExtraState
    ) -> Callable[[], Tensor] | None:
        """The step's regularizer (a closure), or None for no term this step."""
        return None
