"""Peak host memory (RSS) of a SmolLM2-135M DPO run on CPU: full fine-tuning vs LoRA.

    python experiments/lora_memory.py            # a few minutes on 2 CPU cores

Full fine-tuning keeps the policy, its gradients, Adam's two moments and a frozen reference copy
(about 5 x the weights); LoRA keeps the weights once plus adapter-sized state, because its
reference is the policy with adapters off. Each run is its own process, measured by its parent
(``RUSAGE_CHILDREN``: the peak resident set of the waited-for child).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "model=smollm2_135m",
    "loss=dpo",
    "trainer.max_steps=2",
    "trainer.global_batch_groups=2",
    "trainer.micro_batch_groups=1",
    "trainer.eval_batch_groups=2",
    "dataset.max_length=256",
    "dataset.max_eval_examples=4",
    "trainer.export_final=false",
    "trainer.progress=false",
    "trainer.device=cpu",
    "trainer.train_top_blocks=0",  # every block trains (the demo recipe trains the top 4 only)
]
RUNS = {"full": [], "lora": ["+model/lora=default"]}
# Runs the training in a grandchild and prints that process's peak RSS in KiB (Linux ru_maxrss).
MEASURE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mib(overrides: list[str], run_dir: Path) -> float:
    cmd = [sys.executable, "-m", "prefopt.train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: peak_rss_mib(extra, Path(tmp, name)) for name, extra in RUNS.items()}


if __name__ == "__main__":
    peaks = measure()
    for name, mib in peaks.items():
        print(f"{name:>5} DPO, SmolLM2-135M, CPU: peak RSS {mib:8.0f} MiB")
    print(f"LoRA / full: {peaks['lora'] / peaks['full']:.2f}")
