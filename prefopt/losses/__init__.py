"""Loss registry and every registered loss. Importing this package registers them all."""

from prefopt.losses import pairwise, refa  # noqa: F401  (registration side effects)
from prefopt.losses.registry import LOSSES, LossConfig, LossSpec, build_loss, get_spec

__all__ = ["LOSSES", "LossConfig", "LossSpec", "build_loss", "get_spec"]
