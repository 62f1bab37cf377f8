"""Summarise a Hydra multirun sweep: Markdown and CSV tables and PNG plots (offline, files only).

    python -m prefopt.sweeps.report <sweep dir> [--out DIR] [--metric eval/rewards/accuracy]

A job is any dir under the sweep dir holding ``.hydra/overrides.yaml``; its status is the
``status`` of its ``summary.json`` (``ok``, or ``failed`` with an ``error``), or ``missing`` without
one (running, killed). Swept parameters = override keys whose values differ across jobs. Writes
to ``--out`` (default: the sweep dir) ``report.md``, ``report.csv`` (a row per job),
``curves.csv`` (a row per job and step of ``metrics.jsonl``), ``metric_vs_<param>.png`` and
``training_curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import yaml

# (report.csv column, report.md header or "" for CSV only, summary.json section, key)
COLUMNS = [
    (f"eval/{k}_{w}", f"{h} {w}", f"eval_{w}", k)
    for k, h in [
        ("loss", "eval loss"),
        ("rewards/accuracy", "accuracy"),
        ("rewards/margin", "margin"),
    ]
    for w in ("final", "best")
]
COLUMNS += [
    (f"eval/lengths/{k}_final", "", "eval_final", f"lengths/{k}") for k in ("chosen", "rejected")
]


@dataclass
class Job:
    """One run dir of the sweep: its overrides, summary and metrics.jsonl lines."""

    name: str
    path: Path
    overrides: dict[str, str]
    status: str = "missing"
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)


def parse_overrides(path: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a list of ``key=value``) as {key: value}; ``+``/``~`` dropped."""
    items = yaml.safe_load(path.read_text()) or []
    pairs = (str(item).split("=", 1) for item in items)
    return {k.lstrip("+~"): v for k, v in (p if len(p) == 2 else (p[0], "") for p in pairs)}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a truncated or corrupt line (a killed job) is skipped."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(_json, lines) if isinstance(r, dict)]


def load_job(job_dir: Path, sweep_dir: Path) -> Job:
    """Read one job dir; never raises on a missing or unreadable summary."""
    job = Job(
        str(job_dir.relative_to(sweep_dir)),
        job_dir,
        parse_overrides(job_dir / ".hydra" / "overrides.yaml"),
    )
    job.curves = read_jsonl(job_dir / "metrics.jsonl")
    path = job_dir / "summary.json"
    if path.is_file():
        summary = _json(path.read_text())
        job.summary = summary if isinstance(summary, dict) else {}
        job.status = str(job.summary.get("status", "ok" if job.summary else "failed"))
        job.error = str(job.summary.get("error", "" if job.summary else "bad summary.json"))
    return job


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 10 after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every dir under ``sweep_dir`` (itself included) holding ``.hydra/overrides.yaml``."""
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    return [load_job(d, sweep_dir) for d in sorted(dirs, key=_natural)]


def swept_params(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs across jobs (absent counts as a value), in CLI order."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def to_float(value: Any) -> float:
    """A number, or NaN for anything that is not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def metric_value(job: Job, metric: str) -> float:
    """``eval/<k>`` from summary ``eval_final``; else the last value logged in metrics.jsonl
    (so a failed or missing job shows how far it got)."""
    final = job.summary.get("eval_final") or {}
    if metric.startswith("eval/") and metric[5:] in final:
        return to_float(final[metric[5:]])
    values = [r[metric] for r in job.curves if metric in r]
    return to_float(values[-1]) if values else math.nan


def job_row(job: Job, params: list[str], metric: str) -> dict[str, Any]:
    """One report.csv row."""
    s = job.summary
    row: dict[str, Any] = {"job": job.name, "status": job.status}
    row.update({p: job.overrides.get(p, "") for p in params})
    for col, _, section, key in COLUMNS:  # final: as metric_value; best: from the summary only
        in_summary = to_float((s.get(section) or {}).get(key))
        row[col] = metric_value(job, f"eval/{key}") if section == "eval_final" else in_summary
    row[f"{metric}_final"] = metric_value(job, metric)
    row.update(
        steps=s.get("steps", ""),
        tokens=s.get("tokens", ""),
        train_wall_time_s=to_float(s.get("train_wall_time_s")),
        error=job.error,
        path=str(job.path),
    )
    return row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(
    jobs: list[Job],
    rows: list[dict[str, Any]],
    params: list[str],
    metric: str,
    sweep_dir: Path,
    plots: list[str],
    out: Path,
) -> None:
    """report.md: counts, best job, the table, errors, and the plots."""
    counts = {s: sum(j.status == s for j in jobs) for s in dict.fromkeys(j.status for j in jobs)}
    lines = [
        f"# Sweep report: `{sweep_dir}`",
        "",
        f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
        f"Swept: {', '.join(f'`{p}`' for p in params) or 'nothing'}.",
        "",
    ]
    scored = [
        (r[f"{metric}_final"], r)
        for r in rows
        if r["status"] == "ok" and not math.isnan(r[f"{metric}_final"])
    ]
    if scored:
        value, best = (min if "loss" in metric else max)(scored, key=lambda t: t[0])
        setting = ", ".join(f"{p}={best[p]}" for p in params)
        lines += [f"Best final `{metric}`: **{value:.4g}**, job {best['job']} ({setting}).", ""]
    table = dict.fromkeys(["job", "status", *params], "") | {c: h for c, h, *_ in COLUMNS if h}
    table.setdefault(f"{metric}_final", f"{metric} final")
    table |= {"tokens": "tokens", "train_wall_time_s": "wall s"}
    lines += ["| " + " | ".join(h or c for c, h in table.items()) + " |", "|---" * len(table) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in table) + " |" for r in rows]
    errors = [
        f"- job {j.name} ({j.status}): {_fmt(j.error or 'no summary.json')}"
        for j in jobs
        if j.status != "ok"
    ]
    lines += ["", "## Failed or missing jobs", "", *errors] if errors else []
    lines += ["", "## Plots", "", *(f"![{p}]({p})" for p in plots)] if plots else []
    (out / "report.md").write_text("\n".join(lines) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with the union of their keys as columns (first-seen order)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def curve_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per (job, step): the train and eval lines of a step merged."""
    rows = []
    for job in jobs:
        by_step: dict[int, dict[str, Any]] = {}
        for line in job.curves:
            step = int(line.get("step", -1))
            by_step.setdefault(step, {"job": job.name, "step": step}).update(line)
        rows += [by_step[s] for s in sorted(by_step)]
    return rows


def _label(job: Job, params: list[str]) -> str:
    return ", ".join(f"{p.split('.')[-1]}={job.overrides.get(p, '-')}" for p in params) or job.name


def _plot_param(jobs: list[Job], params: list[str], p: str, metric: str, out: Path) -> str:
    """Final ``metric`` vs swept parameter ``p``: one line per setting of the other parameters."""
    from matplotlib.figure import Figure

    others = [q for q in params if q != p]
    points = [(j, v) for j in jobs if not math.isnan(v := metric_value(j, metric))]
    points.sort(key=lambda t: _label(t[0], others))
    xs = sorted({j.overrides.get(p, "-") for j in jobs}, key=lambda x: (to_float(x), x))
    numeric = not any(math.isnan(to_float(x)) for x in xs)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, group in groupby(points, key=lambda t: _label(t[0], others)):
        pts = sorted((xs.index(j.overrides.get(p, "-")), v) for j, v in group)
        x = [to_float(xs[i]) if numeric else i for i, _ in pts]
        ax.plot(x, [v for _, v in pts], marker="o", label=label if others else None)
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
    ax.set(xlabel=p, ylabel=f"final {metric}", title=f"{metric} vs {p}")
    if others:
        ax.legend(fontsize="x-small")
    name = "metric_vs_" + re.sub(r"[^\w.-]", "_", p) + ".png"
    fig.savefig(out / name, dpi=90)
    return name


def _plot_curves(jobs: list[Job], params: list[str], out: Path) -> str:
    """train/loss vs step, one line per job."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for job in jobs:
        pts = [(r["step"], r["train/loss"]) for r in job.curves if "train/loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=_label(job, params))
    ax.set(xlabel="step", ylabel="train/loss", title="training curves")
    ax.legend(fontsize="x-small")
    fig.savefig(out / "training_curves.png", dpi=90)
    return "training_curves.png"


def plot_sweep(jobs: list[Job], params: list[str], metric: str, out: Path) -> list[str]:
    """Write the PNGs (none without matplotlib); return their file names."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots", stacklevel=2)
        return []
    scored = any(not math.isnan(metric_value(j, metric)) for j in jobs)
    names = [_plot_param(jobs, params, p, metric, out) for p in params if scored]
    has_curves = any("train/loss" in r for j in jobs for r in j.curves)
    return names + ([_plot_curves(jobs, params, out)] if has_curves else [])


def report(
    sweep_dir: Path, out: Path | None = None, metric: str = "eval/rewards/accuracy"
) -> list[dict[str, Any]]:
    """Write every report file for ``sweep_dir`` into ``out``; return the table rows."""
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no job dirs (.hydra/overrides.yaml) under {sweep_dir}")
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    params = swept_params(jobs)
    rows = [job_row(j, params, metric) for j in jobs]
    write_csv(out / "report.csv", rows)
    write_csv(out / "curves.csv", curve_rows(jobs))
    plots = plot_sweep(jobs, params, metric, out)
    write_markdown(jobs, rows, params, metric, sweep_dir, plots, out)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir (holds job dirs)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: sweep_dir)")
    parser.add_argument(
        "--metric",
        default="eval/rewards/accuracy",
        help="metric to plot against the swept parameters",
    )
    args = parser.parse_args(argv)
    report(args.sweep_dir, args.out, args.metric)
    print((args.out or args.sweep_dir).joinpath("report.md").read_text())


if __name__ == "__main__":
    main()
