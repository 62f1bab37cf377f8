"""Loss registry and every registered loss.

Importing this package imports every module in it, so a new loss family is one new file here
(plus its YAML and test): no list to edit.
"""

import importlib
import pkgutil

from prefopt.losses.registry import LOSSES, LossConfig, LossSpec, StateSpec, build_loss, get_spec

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("registry", "common"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LOSSES", "LossConfig", "LossSpec", "StateSpec", "build_loss", "get_spec"]
