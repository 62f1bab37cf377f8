"""Start-up time of the training entrypoint: what a user waits for before anything happens.

    python experiments/bench_startup.py            # 3 runs of each command, prints the numbers
    python experiments/bench_startup.py --runs 5

Times ``python -m prefopt.train --help``, ``--cfg job`` (the composed config of the headline
command) and the import of the heavy modules the loop needs, each in a fresh interpreter, and
prints the wall and CPU (user + sys of the child) seconds. The target is <= 3 s wall for the
first two on an idle 2-core machine; CPU time is the number to compare on a shared machine.
A benchmark, not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["-m", "prefopt.train", "--help"],
    "--cfg job": ["-m", "prefopt.train", "loss=refa_dynamic", "model=mistral7b", "--cfg", "job"],
    "heavy imports (loop)": ["-c", "import prefopt.train.loop"],
}


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(args: list[str]) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cpu0, t0 = child_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True)
    wall, cpu = time.perf_counter() - t0, child_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed:\n{proc.stderr.decode()[-2000:]}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {runs} runs each")
    print(f"{'command':<24}{'wall median':>12}{'wall min':>10}{'cpu median':>12}")
    for name, args in COMMANDS.items():
        times = [time_once(args) for _ in range(runs)]
        walls, cpus = [w for w, _ in times], [c for _, c in times]
        wall, best, cpu = statistics.median(walls), min(walls), statistics.median(cpus)
        print(f"{name:<24}{wall:>11.2f}s{best:>9.2f}s{cpu:>11.2f}s", flush=True)


if __name__ == "__main__":
    main()
