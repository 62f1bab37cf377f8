"""The results files of ``bench_throughput.py``: experiments/results/throughput_<tag>.{json,md},
each with its command, commit, device and versions."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # CPU timings move with whatever else runs on the machine: keep its load beside them.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, load average {load} at the end"
    )


def write_results(
    args, results: list[dict], peak: float, commit: str, shape: dict, lengths: tuple
) -> Path:
    import transformers

    trl = importlib.import_module("trl").__version__ if importlib.util.find_spec("trl") else "-"
    report = {
        "commit": commit,
        "device": device_name(args.device),
        "command": " ".join(["python", *sys.argv]),
        "measured_peak_flops": peak,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl,
        },
        "settings": vars(args),
        "model": shape,
        "lengths": lengths,
        "results": results,
    }
    out = ROOT / "experiments" / "results" / f"throughput_{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    unit = "TFLOP/s" if args.device == "cuda" else "GFLOP/s"
    scale = 1e12 if args.device == "cuda" else 1e9
    lines = [
        f"# Throughput: {args.tag}",
        "",
        f"- device: {report['device']}",
        f"- commit: {report['commit']}",
        f"- command: `{report['command']}`",
        f"- versions: {report['versions']}",
        f"- shape {args.shape}, lengths "
        f"{args.lengths}, {args.pairs_per_step} groups per step, {args.steps} timed steps "
        f"after {args.warmup} warm-up; peak probed at the start {peak / scale:.1f} {unit} "
        "and before each row (its MFU's denominator)",
        "- rates and step times: "
        + (
            "wall clock"
            if args.device == "cuda"
            else "this process's CPU time (1 torch thread), "
            "which the other jobs of a shared machine do not inflate; wall tok/s beside it"
        ),
        "",
        "| system | K | attention | tok/s (prompt once) | tok/s (prompt per pair) | MFU | "
        "probe peak | peak GPU mem | step (s) | forward positions/step | wall tok/s |",
        "|---" * 11 + "|",
    ]
    for r in results:
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(
            f"| {r['system']} | {r['k']} | {r['attn']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s_prompt_per_pair']:.0f} | {r['mfu']:.1%} | "
            f"{r['peak_flops'] / scale:.1f} {unit} | {mem} | "
            f"{r['step_s_median']:.2f} | {r['forward_positions_per_step']:.0f} | "
            f"{r['wall_tokens_per_s']:.0f} |"
        )
    lines += ["", "Kernels: " + "; ".join(sorted({r["kernel"] for r in results if "kernel" in r}))]
    lines += [f"- {r['system']}: {r['note']}" for r in results if r.get("note")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out
