# sudo bash slurm/local_cluster.sh start && .venv/bin/pytest tests/test_slurm.py -q
"""Against a real SLURM (one-node cluster from slurm/local_cluster.sh), from a copy of the tracked
files (a fresh clone): the commands of docs/slurm.md as written, through the substitution that
page documents (its section "How the tests run these commands"): an array sweep, a submitit
multirun, and the requeue path (signal -> checkpoint -> requeue -> resume -> finish) of both
scripts. Nothing overrides the scripts' log paths or run dirs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import OmegaConf

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
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    if "gpu:2" not in gres:
        return (
            "the test node has no placeholder GPUs (rerun sudo bash slurm/local_cluster.sh start)"
        )
    return None


_reason = _cluster_up()
if _reason:
    pytest.skip(_reason, allow_module_level=True)


TEST_NODE = {  # the substitution of docs/slurm.md, "How the tests run these commands"
    "--nodes": lambda v: "1",
    "--gpus-per-node": lambda v: str(min(int(v.rsplit(":", 1)[-1]), 2)),
    "--partition": lambda v: "debug",
    "hydra.launcher.partition": lambda v: "debug",
}


def _doc_command(prefix: str) -> list[str]:
    """The first command in docs/slurm.md's code blocks that starts with ``prefix``."""
    text = (REPO / "docs" / "slurm.md").read_text()
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(prefix):
                return shlex.split(line)
    raise AssertionError(f"docs/slurm.md shows no `{prefix}` command")


def _options(args: list[str]) -> list[str]:
    """SLURM options (``--opt value`` or ``--opt=value``) on the test node."""
    out, i = [], 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in TEST_NODE:
            if not eq:
                i += 1
                value = args[i]
            out.append(f"{name}={TEST_NODE[name](value)}")
        else:
            out.append(args[i])
        i += 1
    return out


def _overrides(args: list[str], data, jobs: int = 2) -> list[str]:
    """Hydra overrides at tiny scale: no experiment, the tiny model and data, a cut sweep."""
    out = _options([a for a in args if not a.startswith("experiment=")])
    out += ["model=tiny", "trainer=debug", "logger=none"]
    out += [f"dataset.path={data[0]}", f"dataset.eval_path={data[1]}"]
    for preset in [a.removeprefix("+sweep=") for a in args if a.startswith("+sweep=")]:
        grid = OmegaConf.load(REPO / "conf" / "sweep" / f"{preset}.yaml").hydra.sweeper.params
        for n, (key, values) in enumerate(grid.items()):
            out.append(f"{key}={','.join(str(values).split(',')[: jobs if n == 0 else 1])}")
    return out


def _on_test_cluster(args: list[str], data, *extra: str, jobs: int = 2) -> list[str]:
    """A documented command with the documented substitution, then ``extra`` overrides."""
    if args[0] == "sbatch":
        script = next(i for i, a in enumerate(args) if a.endswith(".sbatch"))
        tail = _overrides(args[script + 1 :], data, jobs)
        return ["sbatch", *_options(args[1:script]), args[script], *tail, *extra]
    python = [sys.executable, *args[1:]]
    if "--" not in args:  # python -m prefopt.train -m hydra/launcher=slurm ...
        return [*python[:3], *_overrides(python[3:], data, jobs), *extra]
    dash = python.index("--")
    head = python[:dash]
    flags = head.index("--sbatch") + 1
    head[flags] = shlex.join(_options(shlex.split(head[flags])))
    return [*head, "--", *_overrides(python[dash + 1 :], data, jobs), *extra]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's tracked files, as a fresh clone has them (no slurm/logs/*.out, no
    outputs/): the jobs are submitted from here."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    root = tmp_path_factory.mktemp("clone")
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def _submit(clone: Path, tmp_path: Path, cmd: list[str]) -> str:
    """Run a submitting command from ``clone``; the job id sbatch printed."""
    env = {
        **os.environ,
        "PYTHONPATH": str(clone),
        "PREFOPT_PYTHON": sys.executable,
        "PREFOPT_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


_submitted: list[str] = []


@pytest.fixture(autouse=True)
def _cancel_leftovers():
    """A failed test leaves no job behind in the queue for the next one."""
    yield
    if _submitted:
        subprocess.run(["scancel", *_submitted], check=False)
        _submitted.clear()


def _job_id(stdout: str) -> str:
    _submitted.append(re.findall(r"Submitted batch job (\d+)", stdout)[-1])
    return _submitted[-1]


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


def _steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if "train/loss" in x]


SWEEP = "python -m prefopt.sweeps.expand submit"


def test_array_sweep_as_documented_runs_every_point(clone, tmp_path, tiny_data):
    cmd = _on_test_cluster(_doc_command(SWEEP), tiny_data)
    job = _job_id(_submit(clone, tmp_path, cmd))
    _wait_gone(job, 300)
    values = []
    for task in ("0", "1"):
        log = clone / "slurm" / "logs" / f"{job}_{task}.out"  # where docs/slurm.md says
        assert log.is_file(), sorted(p.name for p in (clone / "slurm" / "logs").iterdir())
        s = _summary(clone / "multirun" / "slurm" / job / task)
        assert s["status"] == "ok" and s["steps"] == 3, log.read_text()[-3000:]
        values += [o for o in s["overrides"] if o.startswith("loss.beta=")]
    assert values == ["loss.beta=2.0", "loss.beta=2.5"]  # the cut grid, in order


def test_submitit_multirun_as_documented(clone, tmp_path, tiny_data):
    cmd = _on_test_cluster(_doc_command("python -m prefopt.train -m"), tiny_data)
    _submit(clone, tmp_path, cmd)
    (sweep,) = (clone / "multirun" / "refa_dynamic").iterdir()
    for job in ("0", "1"):
        assert _summary(sweep / job)["status"] == "ok"
    assert list(sweep.glob(".submitit/*/*.out"))  # submitit's logs


def test_array_task_signalled_checkpoints_requeues_and_resumes(clone, tmp_path, tiny_data):
    cmd = _on_test_cluster(
        _doc_command(SWEEP), tiny_data, "trainer.max_steps=300", "trainer.save_every=20", jobs=1
    )
    job = _job_id(_submit(clone, tmp_path, cmd))
    run = clone / "multirun" / "slurm" / job / "0"
    _signal_after_a_checkpoint(f"{job}_0", run)
    _wait_gone(job, 300)
    s = _summary(run)
    assert s["status"] == "ok" and s["steps"] == 300
    log = (run / "train.log").read_text()
    assert "will checkpoint after this step" in log and "resumed from" in log
    assert "SIGUSR1" in (clone / "slurm" / "logs" / f"{job}_0.out").read_text()
    assert _steps(run) == list(range(1, 301))  # nothing lost, nothing repeated


def test_train_sbatch_as_documented_preempted_requeued_resumed(clone, tmp_path, tiny_data):
    """slurm/train.sbatch as documented (srun + torchrun; 2 ranks from --gpus-per-node 2): SIGUSR1
    before the limit -> SIGTERM to the step -> both ranks checkpoint the same step -> requeue ->
    resume -> finish, every step logged exactly once."""
    cmd = _on_test_cluster(
        _doc_command("sbatch"), tiny_data, "trainer.max_steps=60", "trainer.save_every=20"
    )
    job = _job_id(_submit(clone, tmp_path, cmd))
    run = clone / "outputs" / "slurm" / job
    _signal_after_a_checkpoint(job, run)
    _wait_gone(job, 400)
    out = (clone / "slurm" / "logs" / f"{job}.out").read_text()  # where docs/slurm.md says
    s = _summary(run)
    assert s["status"] == "ok" and s["steps"] == 60 and s["world_size"] == 2, out[-3000:]
    assert "SIGUSR1: checkpointing and requeueing" in out and "resumed from" in out
    assert _steps(run) == list(range(1, 61))  # nothing lost, nothing repeated
