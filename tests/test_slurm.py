# sudo bash slurm/local_cluster.sh start && .venv/bin/pytest tests/test_slurm.py -q
"""Against a real SLURM (one-node cluster from slurm/local_cluster.sh): a 3-task array sweep, a
submitit multirun, and the requeue path (signal -> checkpoint -> requeue -> resume -> finish)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slurm


def _cluster_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (sudo bash slurm/local_cluster.sh install)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0 or not any(s in out.stdout for s in ("idle", "mix", "alloc")):
        return f"no SLURM node is up (sudo bash slurm/local_cluster.sh start): {out.stderr.strip()}"
    return None


_reason = _cluster_up()
if _reason:
    pytest.skip(_reason, allow_module_level=True)


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFOPT_PYTHON": sys.executable,
        "PREFOPT_ROOT": str(REPO),
        "PREFOPT_SWEEP_DIR": str(tmp_path / "runs"),
        "PREFOPT_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }


def _common(data) -> list[str]:
    return [
        "model=tiny",
        "trainer=debug",
        "trainer.progress=false",
        f"dataset.path={data[0]}",
        f"dataset.eval_path={data[1]}",
    ]


def _submit(tmp_path: Path, *overrides: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "prefopt.sweeps.expand",
        "submit",
        "--sbatch",
        f"--output={tmp_path}/%A_%a.out -c 1 --parsable",
        "--",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1].split(";")[0]


def _wait_gone(job: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while subprocess.run(
        ["squeue", "-h", "-j", job], capture_output=True, text=True
    ).stdout.strip():
        assert time.time() < deadline, f"job {job} still queued after {timeout} s"
        time.sleep(1)


def _start_requeued(job: str, timeout: float = 120) -> None:
    """A requeued job waits minutes for a begin time; start it now. Not at once, and again until
    it runs: slurmd refuses a relaunch that arrives while it still cleans up the killed instance
    ("Job credential revoked"), and an update during that cleanup is dropped."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(2)
        state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
        if "JobState=PENDING" not in state.stdout:
            if "JobState=RUNNING" in state.stdout or not state.stdout.strip():
                return
            continue
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=False)


def _signal_after_a_checkpoint(job: str, run: Path) -> None:
    """Once the run has a checkpoint: SLURM's pre-timeout signal to the batch script, then wait
    for the requeue and start the requeued job."""
    deadline = time.time() + 240
    while not list(run.glob("checkpoints/step_*")):
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.time() + 180
    show = ["scontrol", "show", "job", job]
    while "Restarts=1" not in subprocess.run(show, capture_output=True, text=True).stdout:
        assert time.time() < deadline, "the job was not requeued"
        time.sleep(1)
    _start_requeued(job)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_array_sweep_runs_every_point(tmp_path, tiny_data):
    job = _submit(tmp_path, *_common(tiny_data), "loss=simpo", "loss.beta=1,2,3")
    _wait_gone(job, 300)
    runs = sorted((tmp_path / "runs" / job).iterdir(), key=lambda p: int(p.name))
    assert [p.name for p in runs] == ["0", "1", "2"]
    betas = []
    for run in runs:
        s = _summary(run)
        assert s["status"] == "ok" and s["steps"] == 3, (run / "train.log").read_text()[-2000:]
        betas += [o for o in s["overrides"] if o.startswith("loss.beta=")]
    assert betas == ["loss.beta=1", "loss.beta=2", "loss.beta=3"]


def test_submitit_multirun(tmp_path, tiny_data):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "prefopt.train",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        *_common(tiny_data),
        "loss=simpo",
        "loss.beta=1,2",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert _summary(sweep / job)["status"] == "ok"


def test_signal_checkpoints_requeues_and_resumes(tmp_path, tiny_data):
    job = _submit(
        tmp_path,
        *_common(tiny_data),
        "loss=simpo",
        "trainer.max_steps=300",
        "trainer.save_every=20",
    )
    task = f"{job}_0"
    run = tmp_path / "runs" / job / "0"
    _signal_after_a_checkpoint(task, run)
    _wait_gone(job, 300)
    s = _summary(run)
    assert s["status"] == "ok" and s["steps"] == 300
    log = (run / "train.log").read_text()
    assert "will checkpoint after this step" in log and "resumed from" in log
    steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    assert steps == list(range(1, 301))  # nothing lost, nothing repeated


def test_train_sbatch_two_ranks_preempted_requeued_resumed(tmp_path, tiny_data):
    """slurm/train.sbatch as users submit it (srun + torchrun, 2 ranks on the one node):
    SIGUSR1 before the limit -> SIGTERM to the step -> both ranks checkpoint the same step ->
    requeue -> resume -> finish, every step logged exactly once."""
    run = tmp_path / "run"
    env = {**_env(tmp_path), "PREFOPT_NPROC": "2", "PREFOPT_RUN_DIR": str(run)}
    cmd = [
        "sbatch",
        "--parsable",
        "-c",
        "2",
        f"--output={tmp_path}/%j.out",
        str(REPO / "slurm" / "train.sbatch"),
        *_common(tiny_data),
        "loss=simpo",
        "trainer.max_steps=60",
        "trainer.save_every=20",
        "trainer.device=cpu",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    _signal_after_a_checkpoint(job, run)
    _wait_gone(job, 400)
    out = (tmp_path / f"{job}.out").read_text()
    s = _summary(run)
    assert s["status"] == "ok" and s["steps"] == 60 and s["world_size"] == 2, out[-3000:]
    assert "SIGUSR1: checkpointing and requeueing" in out and "resumed from" in out
    steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    assert steps == list(range(1, 61))  # nothing lost, nothing repeated
