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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


class TrainingError(PrefoptError, FloatingPointError):
    """A run that cannot go on as configured (step after step not finite). The message names
    the step and the value to change."""

    kind = "training error"


class PlanError(PrefoptError, ValueError):
    """A run that cannot fit or cannot be scheduled as configured (memory, batch plan)."""

    kind = "plan error"


class HubError(PrefoptError, OSError):
    """A model or dataset the run needs is neither in the local Hugging Face cache nor reachable
    on the Hub (compute nodes without internet). The message names its id."""

    kind = "hub error"


class DependencyError(PrefoptError, ImportError):
    """An installed library older than the version whose API prefopt uses. The message names
    the package, the installed and the required versions."""

    kind = "dependency error"


# What huggingface_hub, transformers and datasets raise (anywhere in the exception chain) when
# the Hub cannot be reached and the files are not cached, or HF_HUB_OFFLINE=1 forbids asking.
OFFLINE_ERRORS = frozenset(
    {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectError",  # httpx
        "ConnectTimeout",
        "ConnectionError",  # datasets: "Couldn't reach '<id>' on the Hub"; requests
    }
)


def is_offline_error(e: BaseException | None) -> bool:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in OFFLINE_ERRORS or "couldn't connect to" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def offline_error(what: str, repo_id: str, repo_type: str = "model") -> HubError:
    """The one message for a Hub download that cannot happen here, naming ``repo_id``."""
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return HubError(
        f"{what} {repo_id!r} is not in the local Hugging Face cache (HF_HOME={home}) and the "
        "Hub cannot be reached from here",
        fix=f"on a machine with internet, download it once: `hf download{flag} {repo_id}` "
        f"(older huggingface_hub: `huggingface-cli download{flag} {repo_id}`) with HF_HOME on "
        "storage this machine reads (shared storage for cluster nodes), then run here with "
        "the same HF_HOME and HF_HUB_OFFLINE=1",
    )


@contextmanager
def hub_download(what: str, repo_id: str, repo_type: str = "model") -> Iterator[None]:
    """Turn "not cached and the Hub cannot be reached" inside the block into :func:`offline_error`
    (``what``: model, tokenizer, dataset...); any other failure keeps its own error."""
    try:
        yield
    except PrefoptError:
        raise
    except Exception as e:
        if not is_offline_error(e):
            raise
        raise offline_error(what, repo_id, repo_type) from e


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
