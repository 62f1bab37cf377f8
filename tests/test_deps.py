# .venv/bin/pytest tests/test_deps.py -q
"""Dependency floors: pyproject.toml declares what prefopt/deps.py checks at start, and an old
library stops the run with one message; optional libraries stay out of runs that do not use
them (no torchao warnings on a default-like run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO
from doc_commands import run_module

from prefopt import deps


def _pyproject_floors() -> dict[str, str]:
    """package -> floor, from every ``name>=version`` requirement of pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_-]+)>=([0-9][0-9.]*)"', text))


def test_pyproject_declares_the_floors_the_run_checks():
    declared = _pyproject_floors()
    for package, (floor, why, _) in deps.FLOORS.items():
        assert declared.get(package) == floor, (package, declared.get(package), floor)
        assert why
    assert set(deps.CORE) <= set(deps.FLOORS)


def test_installed_libraries_meet_the_floors():
    deps.check(*deps.CORE)  # what CI installs passes its own check
    deps.check("torchao")  # .ci/run installs the lowmem extra


@pytest.mark.parametrize(
    "package,old", [("torch", "2.11.0"), ("transformers", "4.57.1"), ("peft", "0.17.1")]
)
def test_an_old_library_stops_the_run_with_one_message(tmp_path, monkeypatch, package, old):
    """As a user runs it: ``python -m prefopt.train`` (in-process), with the installed version
    of one package reported older than its floor."""
    real = deps.installed
    monkeypatch.setattr(deps, "installed", lambda p: old if p == package else real(p))
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    result = run_module("prefopt.train", ["model=tiny", "trainer=debug"], tmp_path)
    assert result.code == 2, result.out[-2000:]
    floor = deps.FLOORS[package][0]
    assert f"prefopt dependency error: {package} {old} is installed; prefopt needs " in result.out
    assert f"{package}>={floor}" in result.out
    assert f"to fix: pip install -U '{package}>={floor}'" in result.out
    assert "Traceback" not in result.out
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


def test_an_optional_library_is_checked_when_the_run_uses_it(monkeypatch):
    from omegaconf import OmegaConf
    from torch import nn

    from prefopt.errors import DependencyError
    from prefopt.train.optim import build_optimizer

    monkeypatch.setattr(deps, "installed", lambda p: "0.9.0" if p == "torchao" else "99")
    cfg = OmegaConf.create({"_target_": "torchao.optim.AdamW8bit", "_partial_": True, "lr": 1e-3})
    with pytest.raises(DependencyError, match=r"torchao 0.9.0 is installed.*torchao>=0.10") as e:
        build_optimizer(cfg, list(nn.Linear(2, 2).parameters()))
    assert ".[lowmem]" in e.value.fix


# What torchao's import prints (through transformers' quantizer registry) on a run that does not
# use it: its CUDA kernels, triton, and its Enum registrations with torch.compile.
NOISE = ("Failed to load", "_C_mxfp8", "Detected no triton", "is an Enum subclass", "torchao")


def test_a_default_like_run_prints_no_library_warning(tmp_path):
    """A fresh process, as the user starts it (torchao installed, not used)."""
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "prefopt.train", "model=tiny", "trainer.max_steps=1"]
    proc = subprocess.run(
        [*cmd, "logger=none"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    noisy = [line for line in lines if any(n in line for n in NOISE)]
    assert not noisy, noisy
    assert "verdict:" in proc.stdout  # the run did run
