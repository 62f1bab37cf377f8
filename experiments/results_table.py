"""The offline results table: the starting model vs models trained with each loss on the default
data (SmolLM2-135M-Instruct's own verifier-scored samples), evaluated on held-out constraint
tasks and held-out preference groups.

    python experiments/results_table.py --device cuda                      # the table (GPU)
    python experiments/results_table.py --device cpu --losses dpo simpo \\
        --train-args trainer=default                                       # a CPU subset

For every loss: ``python -m prefopt.train loss=<loss> <train args>``, then ``python -m
prefopt.eval.evaluate model=checkpoint model.name_or_path=<run>/final`` (greedy answers to the
held-out tasks, verified; SimPO-reward accuracy on the held-out groups). The starting model gets
the same evaluation. Each step is a subprocess with its own run dir under ``--work-dir``; a
finished step (its evaluation.json exists) is not rerun, so an interrupted table resumes.
Writes ``<out>.md`` and ``<out>.json`` with the commands that made them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ["dpo", "simpo", "refa_dynamic", "swepo", "alpha_dpo", "lmpo", "spo"]
# Enough steps to see each loss move a 135M model: ~2 epochs of the default train split.
GPU_TRAIN_ARGS = [
    "trainer.max_steps=40",
    "trainer.global_batch_groups=16",
    "trainer.micro_batch_groups=16",
    "trainer.eval_batch_groups=32",
]


def sh(cmd: list[str], log: Path) -> float:
    """Run one step, its output to ``log``; fail loudly with the log's tail."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"step failed ({code}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def evaluate(name: str, model_args: list[str], work: Path, device: str) -> dict:
    out = work / name / "eval"
    if not (out / "evaluation.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "prefopt.eval.evaluate",
            *model_args,
            f"device={device}",
            f"trainer.device={device}",
            f"hydra.run.dir={out}",
        ]
        out.mkdir(parents=True, exist_ok=True)
        sh(cmd, work / name / "eval.log")
    return json.loads((out / "evaluation.json").read_text())


def train(loss: str, args: list[str], work: Path, device: str) -> tuple[Path, dict]:
    """The run dir and its timings: the training loop's and the whole command's seconds."""
    run = work / loss / "train"
    timing = run / "wall_time.json"
    if not timing.exists():
        cmd = [
            sys.executable,
            "-m",
            "prefopt.train",
            f"loss={loss}",
            f"trainer.device={device}",
            *args,
            f"hydra.run.dir={run}",
        ]
        (work / loss).mkdir(parents=True, exist_ok=True)
        wall = sh(cmd, work / loss / "train.log")
        loop = json.loads((run / "summary.json").read_text()).get("train_wall_time_s")
        timing.write_text(json.dumps({"loop_s": loop, "wall_s": wall}))
    return run, json.loads(timing.read_text())


def row(name: str, ev: dict, timing: dict | None) -> dict:
    c, p = ev["constraints"], ev["preference"]
    return {
        "model": name,
        "satisfaction": c["satisfaction"],
        "verifier_score": c["score"],
        "reward_accuracy": p["rewards/accuracy"],
        "reward_margin": p["rewards/margin"],
        "mean_tokens": c["lengths"]["tokens/mean"],
        "ended_with_eos": c.get("ended_with_eos"),
        "train_loop_s": timing and timing["loop_s"],
        "train_wall_s": timing and timing["wall_s"],
    }


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | held-out satisfaction | verifier score (0-10) | reward accuracy | "
        "reward margin | mean response tokens | ended with EOS | train loop / command (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = "" if r["train_wall_s"] is None else f"{r['train_loop_s']:.0f} / "
        t += "" if r["train_wall_s"] is None else f"{r['train_wall_s']:.0f}"
        lines.append(
            f"| {r['model']} | {r['satisfaction']:.3f} | {r['verifier_score']:.2f} | "
            f"{r['reward_accuracy']:.3f} | {r['reward_margin']:+.3f} | "
            f"{r['mean_tokens']:.1f} | {r['ended_with_eos']:.2f} | {t} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--losses", nargs="+", default=LOSSES)
    ap.add_argument(
        "--train-args",
        nargs="*",
        default=None,
        help="overrides for prefopt.train (default: ~2 epochs on GPU)",
    )
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "results_table")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "offline_table")
    args = ap.parse_args(argv)
    train_args = GPU_TRAIN_ARGS if args.train_args is None else args.train_args
    train_args = [f"model={args.model}", *train_args]
    rows = [
        row(
            f"{args.model} (start)",
            evaluate("start", [f"model={args.model}"], args.work_dir, args.device),
            None,
        )
    ]
    for loss in args.losses:
        run, timing = train(loss, train_args, args.work_dir, args.device)
        ev = evaluate(
            loss,
            ["model=checkpoint", f"model.name_or_path={run / 'final'}"],
            args.work_dir,
            args.device,
        )
        rows.append(row(loss, ev, timing))
        print(rows[-1], flush=True)
    command = " ".join(["python experiments/results_table.py", *(argv or sys.argv[1:])])
    header = (
        f"Offline results table (`{command}`; train args: `{' '.join(train_args)}`). "
        "Held-out: 64 constraint tasks answered greedily (max 64 new tokens) and the default "
        "dataset's held-out groups; reward accuracy = SimPO's length-normalised log-prob "
        "reward, best vs worst response."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(rows, header))
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"command": command, "device": args.device, "train_args": train_args, "rows": rows},
            indent=2,
        )
    )
    print(markdown(rows, header))
    return rows


if __name__ == "__main__":
    main()
