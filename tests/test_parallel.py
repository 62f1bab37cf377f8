# .venv/bin/pytest tests/test_parallel.py -q
"""FSDP2 on 2 CPU processes (gloo, torchrun): same training as 1 process, exact resume, and a
dead rank ends the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed


def _launch(
    tmp_path: Path,
    run_dir: Path,
    data,
    nproc: int,
    *overrides: str,
    port: int,
    wait: bool = True,
    loss: str = "dpo",
):
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    entry = [
        "-m",
        "prefopt.train",
        "model=tiny",
        "trainer=debug",
        f"loss={loss}",
        f"dataset.path={data[0]}",
        f"dataset.eval_path={data[1]}",
        f"hydra.run.dir={run_dir}",
        "trainer.export_final=true",
        "optimizer.lr=1e-3",
        *overrides,
    ]
    if nproc == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
            *entry,
        ]
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "train/loss" in m]


def _losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in _metrics(run_dir)]


def test_two_ranks_train_like_one(tmp_path, tiny_data):
    """Each rank takes half of every step's groups; gradients are reduced across ranks."""
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(tmp_path, one, tiny_data, 1, port=0)
    _launch(tmp_path, two, tiny_data, 2, port=29611)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    # The first step sees identical weights: loss and gradient norm agree to fp32 round-off.
    first = [_metrics(d)[0] for d in (one, two)]
    for key in ("train/loss", "train/grad_norm", "train/valid_groups", "train/tokens"):
        assert first[0][key] == pytest.approx(first[1][key], rel=1e-6), key
    # Later steps go through Adam, which amplifies round-off a little.
    torch.testing.assert_close(
        torch.tensor(_losses(one)), torch.tensor(_losses(two)), rtol=1e-4, atol=1e-5
    )
    a, b = _final(one), _final(two)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # same keys, close values


def test_two_ranks_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("trainer.max_steps=4",)
    _launch(tmp_path, straight, tiny_data, 2, *common, port=29613)
    _launch(tmp_path, resumed, tiny_data, 2, *common, "trainer.stop_at_step=2", port=29615)
    assert not (resumed / "final").exists()
    _launch(tmp_path, resumed, tiny_data, 2, *common, port=29617)
    assert _losses(straight) == _losses(resumed)
    a, b = _final(straight), _final(resumed)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same keys, bit-identical values


def test_a_dead_rank_ends_the_job(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    proc = _launch(
        tmp_path,
        run_dir,
        tiny_data,
        2,
        "trainer.max_steps=100000",
        "trainer.collective_timeout_s=30",
        port=29619,
        wait=False,
    )
    deadline = time.time() + 180
    while not (run_dir / "metrics.jsonl").exists() or len(_losses(run_dir)) < 2:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.5)
    workers = [
        int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code != 0
    assert time.time() - start < 120


def _scale_check(tmp_path: Path, name: str, port: int) -> None:
    """``tests/scale_checks.py <name>`` on 2 gloo ranks."""
    script = str(REPO / "tests" / "scale_checks.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        script,
        name,
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"ok {name}" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-3000:]
    )


def test_skipped_step_leaves_no_gradient_behind_on_two_ranks(tmp_path):
    """A NaN in rank 1's second micro-batch: the step is skipped on both ranks, and the next
    step's gradients equal a fresh model's (``scale_checks.skip_check``)."""
    _scale_check(tmp_path, "skip", 29625)


def test_plan_gradient_rows_equal_what_fsdp2_holds_on_two_ranks(tmp_path):
    """Without gradient sync each rank holds the whole model's fp32 gradient, not half of it
    (``scale_checks.grad_memory_check``)."""
    _scale_check(tmp_path, "grad_memory", 29627)


def test_signal_to_one_rank_stops_both_after_one_step_and_resumes_exactly(tmp_path, tiny_data):
    """SIGUSR1 to rank 1 only, mid-run, with SPO (per-rank on-policy samples, the KL generated
    and gathered through backward on sharded ranks): both ranks stop after the same step and
    write one checkpoint; the resumed run ends bit-identical to an uninterrupted one."""
    spo = (
        "trainer.max_steps=12",
        "loss.kl_num_samples=2",
        "loss.kl_max_new_tokens=4",
        "loss.kl_every=1",  # fresh samples every step: a resume samples before any forward
        "trainer.save_every=0",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _launch(tmp_path, straight, tiny_data, 2, *spo, port=29627, loss="spo")
    kl = [m["train/regularizer"] for m in _metrics(straight)]
    assert kl[0] == pytest.approx(0, abs=1e-6) and max(kl) > 0  # policy = reference at step 1
    proc = _launch(tmp_path, resumed, tiny_data, 2, *spo, port=29629, loss="spo", wait=False)
    deadline = time.time() + 240
    while not (resumed / "metrics.jsonl").exists() or len(_losses(resumed)) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    workers = [
        int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ]
    os.kill(workers[1], signal.SIGUSR1)  # the second worker is rank 1
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = [p.name for p in (resumed / "checkpoints").iterdir()]
    assert len(stopped) == 1 and int(stopped[0].split("_")[1]) < 12, stopped
    assert not (resumed / "final").exists()
    _launch(tmp_path, resumed, tiny_data, 2, *spo, port=29631, loss="spo")
    assert _losses(straight) == _losses(resumed)
    assert [m["step"] for m in _metrics(resumed)] == list(range(1, 13))
    a, b = _final(straight), _final(resumed)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same keys, bit-identical values


@pytest.mark.parametrize(
    ("loss", "extra", "rel"),
    [("kto", (), 1e-6), ("simpo", ("model.dtype=bfloat16", "trainer.precision=bf16"), 2e-3)],
)
def test_two_ranks_first_step_equals_one_process(tmp_path, tiny_data, loss, extra, rel):
    """KTO's baseline is taken over the whole step, so 2 ranks give 1 process's loss; bf16
    compute over fp32 master weights agrees to bf16 round-off."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("trainer.max_steps=1", *extra)
    _launch(tmp_path, one, tiny_data, 1, *common, port=0, loss=loss)
    _launch(tmp_path, two, tiny_data, 2, *common, port=29633, loss=loss)
    a, b = _metrics(one)[0], _metrics(two)[0]
    for key in ("train/loss", "train/grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=rel), key
    if loss == "kto":
        assert a["train/kto/z0"] == pytest.approx(b["train/kto/z0"], rel=1e-6)
