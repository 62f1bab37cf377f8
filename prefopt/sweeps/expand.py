"""Expand a Hydra sweep into its jobs, for SLURM array jobs (one array task = one job).

    python -m prefopt.sweeps.expand count +sweep=refa model=tiny          # how many jobs
    python -m prefopt.sweeps.expand list  +sweep=refa loss.lam=0          # one line per job
    python -m prefopt.sweeps.expand point 7 +sweep=refa                   # the overrides of job 7
    python -m prefopt.sweeps.expand submit --sbatch "--time=2:00:00" -- +sweep=refa model=mistral7b

The grid is the one ``python -m prefopt.train -m ...`` runs: a preset's ``hydra.sweeper.params``
(``conf/sweep/*.yaml``) extended or replaced by comma-separated values on the command line, in
the order Hydra's basic sweeper uses.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

import prefopt.config  # noqa: F401  (registers the config schemas)
import prefopt.losses  # noqa: F401  (registers loss schemas before composition)

CONF = Path(__file__).resolve().parents[2] / "conf"
ARRAY_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "sweep_array.sbatch"


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job of the sweep as its list of overrides."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=plain, return_hydra_config=True)
    given = {o.get_key_element() for o in parsed}
    preset = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items() if k not in given]
    batches = BasicSweeper.split_arguments(parser.parse_overrides(preset + overrides), None)
    return [job for batch in batches for job in batch]


def glue_sbatch_value(argv: list[str]) -> list[str]:
    """``--sbatch "--cpus-per-task=1"`` as ``--sbatch=--cpus-per-task=1``: argparse takes a value
    that starts with ``-`` for an option of its own and refuses it."""
    out = []
    for arg in argv:
        if out and out[-1] == "--sbatch":
            out[-1] = f"--sbatch={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m prefopt.sweeps.expand",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("command", choices=["count", "list", "point", "submit"])
    ap.add_argument("--sbatch", default="", help="extra sbatch arguments (submit)")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch command (submit)")
    ap.add_argument("overrides", nargs="*")
    argv = sys.argv[1:] if argv is None else argv
    tail = argv[argv.index("--") + 1 :] if "--" in argv else []  # overrides after "--"
    head = argv[: len(argv) - len(tail) - (1 if tail or "--" in argv else 0)]
    args = ap.parse_args(glue_sbatch_value(head))
    args.overrides += tail
    index = None
    if args.command == "point":
        if not args.overrides or not args.overrides[0].isdigit():
            ap.error("point needs a job index first: python -m prefopt.sweeps.expand point 3 ...")
        index, args.overrides = int(args.overrides[0]), args.overrides[1:]
    jobs = expand(args.overrides)
    if args.command == "count":
        print(len(jobs))
    elif args.command == "list":
        print("\n".join(shlex.join(job) for job in jobs))
    elif args.command == "point":
        if not 0 <= index < len(jobs):
            ap.error(f"job index {index} is not in [0, {len(jobs)})")
        print(shlex.join(jobs[index]))
    else:
        cmd = [
            "sbatch",
            f"--array=0-{len(jobs) - 1}",
            *shlex.split(args.sbatch),
            str(ARRAY_SCRIPT),
            *args.overrides,
        ]
        print(shlex.join(cmd))
        if not args.dry_run:
            return subprocess.run(cmd, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
