"""User-facing errors and the one way the command-line entry points report them.

A ``PrefoptError`` is a mistake in what the user gave (data, config, a damaged run directory or
cache, a plan that cannot run): its message says what is wrong and where (file and line, or the
config key and value), and ``fix`` says what to change. The CLIs print it as one short block on
stderr and exit with status 2, without a traceback: a SLURM log should show the cause, not a stack.
``PREFOPT_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) re-raises it with its stack. Anything else
is a bug in prefopt or a library and keeps its traceback.

Each subclass also derives from the built-in type callers caught before (``ValueError``,
``FileNotFoundError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2  # argparse's convention for "you asked for something that cannot run"


class PrefoptError(Exception):
    """Base of the user-facing errors. ``str(e)`` is the message; ``fix`` the suggested change."""

    kind = "error"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class DataError(PrefoptError, ValueError):
    """Malformed or unusable data. The message names the file (or Hub id and split), line or row,
    and key."""

    kind = "data error"


class ConfigError(PrefoptError, ValueError):
    """A config value that cannot work. The message names the key and its value."""

    kind = "config error"


class CheckpointError(PrefoptError, RuntimeError):
    """A checkpoint that cannot be written or resumed from. The message names its directory."""

    kind = "checkpoint error"


class CacheError(PrefoptError, RuntimeError):
    """A cache entry that cannot be read or rebuilt. The message names its directory."""

    kind = "cache error"


class TrainingError(PrefoptError, FloatingPointError):
    """A run that cannot go on as configured (step after step not finite). The message names
    the step and the value to change."""

    kind = "training error"


class PlanError(PrefoptError, ValueError):
    """A run that cannot fit or cannot be scheduled as configured (memory, batch plan)."""

    kind = "plan error"


def debug_enabled() -> bool:
    return any(
        os.environ.get(v, "") not in ("", "0") for v in ("PREFOPT_DEBUG", "HYDRA_FULL_ERROR")
    )


def format_error(e: PrefoptError) -> str:
    """The block printed for a user error: what and where on the first line, then the fix."""
    lines = [f"prefopt {e.kind}: {e}"]
    if e.fix:
        lines.append(f"  to fix: {e.fix}")
    lines.append("  (PREFOPT_DEBUG=1 shows the stack trace)")
    return "\n".join(lines)


F = TypeVar("F", bound=Callable[..., object])


def report_user_errors(fn: F) -> F:
    """Wrap a CLI ``main``: a ``PrefoptError`` prints :func:`format_error` to stderr and exits 2.

    Put it under ``@hydra.main`` so it runs inside the task function; Hydra would otherwise print
    its own (shortened) traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except PrefoptError as e:
            if debug_enabled():
                raise
            print(format_error(e), file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
