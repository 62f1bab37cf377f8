# .venv/bin/pytest tests/test_cli.py -q
"""Habits users bring to the command line: Hydra's ``--cfg job --resolve``, one sbatch flag for
the sweep submitter, and four mistakes that end in one prefopt error block (exit 2, no
traceback): the first three before any model is loaded, the last naming the learning rate."""

from __future__ import annotations

import runpy
import sys

import pytest
import torch

import prefopt.train.loop as loop
from prefopt.sweeps.expand import main as expand


def _train(monkeypatch, capfd, tmp_path, *args: str) -> tuple[int, str, str]:
    """``python -m prefopt.train <args>`` in this process (runpy runs it as ``-m`` does)."""
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    for switch in ("PREFOPT_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setattr(sys, "argv", ["prefopt.train", *args])
    code = 0
    try:
        runpy.run_module("prefopt.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def test_cfg_job_resolve_prints_the_resolved_config(monkeypatch, capfd, tmp_path):
    code, out, err = _train(
        monkeypatch, capfd, tmp_path, "model=tiny", "loss=simpo", "--cfg", "job", "--resolve"
    )
    assert code == 0, err[-2000:]
    assert "\nrun_dir: outputs/simpo/" in out and "${" not in out


def test_ranks_without_torchruns_store_are_told_to_name_the_run_dir(monkeypatch, capfd, tmp_path):
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _train(monkeypatch, capfd, tmp_path, "model=tiny", "--cfg", "job", "--resolve")
    assert code == 2 and "cannot agree on a run dir" in err and "hydra.run.dir=" in err, err
    assert "Traceback" not in err


def test_sweep_submit_takes_a_single_sbatch_flag(capsys):
    argv = ["submit", "--dry-run", "--sbatch", "--cpus-per-task=1", "--", "model=tiny"]
    assert expand(argv) == 0
    assert capsys.readouterr().out.startswith("sbatch --array=0-0 --cpus-per-task=1 ")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=refa_dynamic", "loss.gamma=-1"], "config error: loss.gamma=-1.0: must be >= 0"),
        (["loss=refa_1vsall", "loss.p=1.5"], "config error: loss.p=1.5 with loss.deviation=signed"),
        (["trainer.device=cuda"], "config error: trainer.device=cuda, but torch sees no CUDA"),
    ],
)
def test_mistakes_are_refused_before_any_model_is_loaded(
    monkeypatch, capfd, tmp_path, tiny_data, overrides, message
):
    if "trainer.device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was refused")

    monkeypatch.setattr(loop, "build_models", no_models)
    code, _, err = _train(
        monkeypatch,
        capfd,
        tmp_path,
        *("model=tiny", "trainer=debug", f"hydra.run.dir={tmp_path / 'run'}"),
        *(f"dataset.path={tiny_data[0]}", f"dataset.eval_path={tiny_data[1]}", *overrides),
    )
    assert code == 2 and f"prefopt {message}" in err, err[-2000:]
    assert "Traceback" not in err


def test_diverging_run_stops_with_one_block_naming_the_learning_rate(
    monkeypatch, capfd, tmp_path, tiny_data
):
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_SKIPS", 2)  # 10 shipped; 2 keeps the test short
    code, _, err = _train(
        monkeypatch,
        capfd,
        tmp_path,
        *("model=tiny", "trainer=debug", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"),
        *(f"dataset.path={tiny_data[0]}", f"dataset.eval_path={tiny_data[1]}"),
        *("optimizer.lr=1e30", "trainer.max_steps=10"),
    )
    assert code == 2, err[-2000:]
    assert "prefopt training error: 2 consecutive steps skipped" in err
    assert "at learning rate" in err and "lower optimizer.lr" in err
    assert "Traceback" not in err
