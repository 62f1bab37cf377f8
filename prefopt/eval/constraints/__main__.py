"""Write constraint-following tasks as JSONL rows.

python -m prefopt.eval.constraints --split heldout --n 64 --seed 0 --out tasks.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from prefopt.eval.constraints.families import FAMILIES
from prefopt.eval.constraints.tasks import SPLITS, Task, make_tasks, task_row


def main(argv: list[str] | None = None) -> list[Task]:
    ap = argparse.ArgumentParser(
        prog="python -m prefopt.eval.constraints",
        description="Write constraint-following tasks as JSONL rows.",
    )
    ap.add_argument("--split", choices=SPLITS, default="heldout")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default=None, help=f"comma-separated subset of {list(FAMILIES)}")
    ap.add_argument("--out", default=None, help="output .jsonl (default: stdout)")
    args = ap.parse_args(argv)
    families = args.families.split(",") if args.families else None
    tasks = make_tasks(args.split, args.n, args.seed, families)
    lines = "".join(json.dumps(task_row(t), ensure_ascii=False) + "\n" for t in tasks)
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="\n") as f:
            f.write(lines)
    else:
        sys.stdout.write(lines)
    counts = Counter(t.family for t in tasks)
    log = sys.stdout if args.out else sys.stderr  # keep stdout pure JSONL when it carries rows
    print(f"{len(tasks)} {args.split} tasks -> {args.out or 'stdout'}", file=log)
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), file=log)
    return tasks


if __name__ == "__main__":
    main()
