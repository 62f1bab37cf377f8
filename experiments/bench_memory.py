"""Peak host memory (RSS) per rank of a short multi-rank training run, printed per rank.

    python experiments/bench_memory.py                       # 2 ranks, SmolLM2-135M, DPO, 2 steps
    python experiments/bench_memory.py --repo /path/to/other/checkout -- loss=simpo

Each rank runs ``python -m prefopt.train`` under torchrun through this file, which records the
process's peak resident set size (``getrusage``) when it exits. ``--repo`` runs another checkout
(an older commit) the same way, so the two can be compared on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def _as_rank() -> None:
    """Inside torchrun: run the training entry point, then write this rank's peak RSS, also the
    peak when the models were built (before any training step)."""
    import prefopt.train.setup

    out = Path(os.environ["PREFOPT_RSS_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    record: dict[str, float] = {}
    build = prefopt.train.setup.build_models

    def measured(*args, **kwargs):  # the loop imports build_models from prefopt.train.setup
        result = build(*args, **kwargs)
        record["after_models_mib"] = _peak_mib()
        return result

    prefopt.train.setup.build_models = measured
    sys.argv = ["prefopt.train", *sys.argv[2:]]
    try:
        runpy.run_module("prefopt.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        out.write_text(json.dumps({**record, "peak_rss_mib": _peak_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--port", type=int, default=29691)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prefopt-rss-"))
    overrides = [
        "model=smollm2_135m",
        "loss=dpo",
        "trainer.max_steps=2",
        "trainer.progress=false",
        "trainer.micro_batch_groups=2",
        "trainer.export_final=false",
        "trainer.eval_batch_groups=4",
        "dataset.max_eval_examples=8",
        f"hydra.run.dir={tmp / 'run'}",
        *args.overrides,
    ]
    env = {
        **os.environ,
        "PREFOPT_RSS_DIR": str(tmp),
        "PYTHONPATH": str(args.repo),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        f"--master_port={args.port}",
        str(Path(__file__).resolve()),
        "--as-rank",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=args.repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True
    ).stdout.strip()
    for r, m in enumerate(ranks):
        print(
            f"commit {commit} rank {r}: peak RSS {m['after_models_mib']:.0f} MiB once the models "
            f"are built, {m['peak_rss_mib']:.0f} MiB over the run"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--as-rank":
        _as_rank()
    else:
        main()
