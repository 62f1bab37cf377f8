"""Training: ``python -m prefopt.train`` (the Hydra entry point in ``__main__``) runs
``prefopt.train.loop.run``. This package's import stays light (no torch) so the command line
composes and prints configs quickly; the loop is imported after composition.

The data schemas other packages provide are registered here, before any config is checked:
the offline benchmark's ``constraints_reference`` (``prefopt/eval/constraints/schema.py``)."""

import prefopt.eval.constraints.schema  # noqa: F401  (registers dataset.schema=constraints_reference)
