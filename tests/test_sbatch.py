# .venv/bin/pytest tests/test_sbatch.py -q
"""slurm/train.sbatch's srun line without a cluster: the script runs under bash with the variables
SLURM sets in a batch job (SLURM_GPUS_ON_NODE for --gpus-per-node, --gres=gpu:N and --gpus alike,
checked on SLURM 22.05) and a stand-in ``srun`` that records its arguments. tests/test_slurm.py
runs the script on a real one-node cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO


def _srun_args(tmp_path: Path, **slurm: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")  # show hostnames
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PREFOPT_"))},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        **slurm,
    }
    script = str(REPO / "slurm" / "train.sbatch")
    proc = subprocess.run(["bash", script, "model=tiny"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "srun.args").read_text().splitlines()


@pytest.mark.parametrize(
    ("slurm", "nproc"),
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, "4"),  # --gres=gpu:4 (SLURM_GPUS_PER_NODE unset)
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "h100:8"}, "8"),  # --gpus-per-node
        ({"SLURM_GPUS_PER_NODE": "h100:2"}, "2"),  # an older SLURM without SLURM_GPUS_ON_NODE
        ({}, "1"),  # no GPU asked for
        ({"SLURM_GPUS_ON_NODE": "8", "PREFOPT_NPROC": "2"}, "2"),
    ],
)
def test_one_process_per_gpu_of_the_node(tmp_path, slurm, nproc):
    assert f"--nproc-per-node={nproc}" in _srun_args(tmp_path, **slurm)


def test_srun_gets_the_cpus_sbatch_gave_the_task(tmp_path):
    """SLURM >= 22.05 does not pass sbatch's --cpus-per-task on to srun."""
    args = _srun_args(tmp_path, SLURM_CPUS_PER_TASK="8")
    assert "--cpus-per-task=8" in args
    assert args[-1] == "hydra.run.dir=outputs/slurm/42" and "model=tiny" in args
