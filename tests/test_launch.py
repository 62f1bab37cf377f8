# .venv/bin/pytest tests/test_launch.py -q
"""How a torchrun job starts: one run dir for ranks that start seconds apart (no
hydra.run.dir given), and a cold start whose rank 0 prepares the data for longer than the
collective timeout. ``tests/rank_shim.py`` delays a rank's start or its data preparation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, checkpoint_weights

pytestmark = pytest.mark.distributed


def _torchrun(tmp_path: Path, data, *overrides: str, timeout: float = 300, **shim: str):
    """``torchrun --standalone --nproc_per_node 2 -m prefopt.train model=tiny ...`` from
    ``tmp_path`` (where ``outputs/`` lands), each rank through ``tests/rank_shim.py``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFOPT_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        **shim,
    }
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        str(REPO / "tests" / "rank_shim.py"),
        *("model=tiny", "trainer=debug", "loss=simpo", "logger=none", "trainer.max_steps=2"),
        *(f"dataset.path={data[0]}", f"dataset.eval_path={data[1]}"),
        *overrides,
    ]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - start


def test_ranks_started_seconds_apart_write_one_run_dir_and_resume_from_it(tmp_path, tiny_data):
    proc, _ = _torchrun(tmp_path, tiny_data, SHIM_START_DELAY_S="1.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "simpo").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    shards = sorted(p.name for p in (run / "checkpoints" / "step_000002").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert checkpoint_weights(run, 2)  # every shard the metadata names is there
    proc, _ = _torchrun(tmp_path, tiny_data, f"hydra.run.dir={run}", "trainer.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert len(list((tmp_path / "outputs" / "simpo").iterdir())) == 1


def test_rank0_preparing_data_longer_than_the_collective_timeout_does_not_abort(
    tmp_path, tiny_data
):
    run = tmp_path / "run"
    proc, _ = _torchrun(
        tmp_path,
        tiny_data,
        f"hydra.run.dir={run}",
        "trainer.collective_timeout_s=5",
        SHIM_PREPARE_DELAY_S="12",
        SHIM_WAIT_LOG_EVERY_S="4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    assert "rank 1: waiting for rank 0" in proc.stdout  # progress while it waits


def test_rank0_dying_while_the_others_wait_ends_the_job(tmp_path, tiny_data):
    """The wait has no timeout, yet a dead rank 0 ends the job at once (torchrun's agent)."""
    proc, seconds = _torchrun(
        tmp_path, tiny_data, f"hydra.run.dir={tmp_path / 'run'}", SHIM_PREPARE_EXIT="1"
    )
    assert proc.returncode != 0
    assert seconds < 120  # the collective timeout is 600 s
