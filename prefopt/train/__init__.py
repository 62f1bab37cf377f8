"""Training: ``python -m prefopt.train`` (the Hydra entry point in ``__main__``) runs
``prefopt.train.loop.run``. This package's import stays light (no torch) so the command line
composes and prints configs quickly; the loop is imported after composition."""
