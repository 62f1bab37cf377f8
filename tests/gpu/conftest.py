"""GPU tests (``pytest -m gpu tests/gpu``, or ``make gpu-check``): skipped without CUDA.

Each session writes experiments/results/gpu_tests.md: commit, device, command, and every test's
outcome and duration, so a GPU run leaves its evidence in the repository.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_outcomes: list[tuple[str, str, float]] = []


@pytest.fixture(autouse=True)
def fresh_compile():
    """Each test starts with no compiled graphs: the tests use more dtypes and head shapes than
    one run does, and dynamo's recompile limit (8) counts across them."""
    from prefopt.model.kernels import flex

    torch._dynamo.reset()
    flex._compiled_flex = None
    yield


def pytest_collection_modifyitems(items) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes.append((report.nodeid, report.outcome, report.duration))


def pytest_sessionfinish(session, exitstatus) -> None:
    if not torch.cuda.is_available() or not _outcomes:
        return
    from prefopt.train.summary import git_commit

    lines = [
        "# GPU tests",
        "",
        f"- commit: {git_commit()}",
        f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
        f"- command: `{' '.join(['pytest', *sys.argv[1:]])}`",
        f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        "",
        "| test | outcome | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {outcome} | {secs:.1f} |" for name, outcome, secs in _outcomes]
    out = REPO / "experiments" / "results" / "gpu_tests.md"
    out.write_text("\n".join(lines) + "\n")
