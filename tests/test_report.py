# .venv/bin/pytest tests/test_report.py -q
"""prefopt.sweeps.report on a hand-written sweep dir (ok, failed and missing jobs), and the
notebooks executed on its output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from prefopt.sweeps.report import find_jobs, main, parse_overrides, report, swept_params

REPO = Path(__file__).resolve().parents[1]
# The report notebooks (notebooks/ursla.ipynb reads a model, not a report: tests/test_ursla.py).
NOTEBOOKS = [
    REPO / "notebooks" / f"{name}.ipynb"
    for name in ("length_vs_loss", "sweep_comparison", "training_dynamics")
]
EXAMPLE = REPO / "experiments" / "results" / "tiny_refa_sweep"


def _eval(loss: float, acc: float, margin: float) -> dict[str, float]:
    return {
        "loss": loss,
        "rewards/accuracy": acc,
        "rewards/margin": margin,
        "lengths/chosen": 20.0,
        "lengths/rejected": 30.0 + loss,
    }


def _job(sweep: Path, name: str, beta: str, gamma: str, summary: dict | None, lines: list[str]):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    overrides = ["loss=refa_dynamic", f"loss.beta={beta}", f"loss.gamma={gamma}", "+sweep=refa"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))


def _steps(base: float, n: int = 4) -> list[str]:
    rows = [{"step": 0, "eval/loss": base + 0.5, "eval/rewards/accuracy": 0.5}]
    for s in range(1, n + 1):
        rows.append(
            {
                "step": s,
                "train/loss": base + 1 / s,
                "train/rewards/margin": 0.1 * s,
                "train/rewards/accuracy": 0.5,
                "train/grad_norm": 1.0,
                "train/lengths/chosen": 20.0 + s,
                "train/lengths/rejected": 30.0,
                "train/avg_logps/chosen": -1.0,
                "train/avg_logps/rejected": -1.2,
            }
        )
    rows.append({"step": n, "eval/loss": base, "eval/rewards/accuracy": 0.6})
    return [json.dumps(r) for r in rows]


def _ok(loss: float, acc: float) -> dict:
    return {
        "status": "ok",
        "loss": "refa_dynamic",
        "steps": 4,
        "tokens": 1000,
        "skipped_steps": 0,
        "train_wall_time_s": 2.5,
        "eval_before": _eval(loss + 0.5, 0.5, 0),
        "eval_final": _eval(loss, acc, 0.3),
        "eval_best": _eval(loss - 0.01, acc, 0.31),
    }


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """Jobs 0-2 ok, 3 failed (summary with status failed), 10 missing (no summary, and its
    metrics.jsonl ends in a half-written line); plus Hydra's multirun.yaml at the top."""
    d = tmp_path / "sweep"
    _job(d, "0", "1", "0.7", _ok(0.9, 0.55), _steps(0.9))
    _job(d, "1", "1", "1.4", _ok(0.8, 0.65), _steps(0.8))
    _job(d, "2", "2.5", "0.7", _ok(0.7, 0.60), _steps(0.7))
    failed = {"status": "failed", "error": "RuntimeError: CUDA out of memory | retry"}
    _job(d, "3", "2.5", "1.4", failed, _steps(0.9, n=1))
    _job(d, "10", "4", "0.7", None, [*_steps(1.0, n=2), '{"step": 3, "train/lo'])
    (d / "multirun.yaml").write_text("hydra: {}\n")
    return d


def test_jobs_statuses_and_swept_params(sweep):
    jobs = find_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3", "10"]  # numeric order
    assert [j.status for j in jobs] == ["ok", "ok", "ok", "failed", "missing"]
    assert jobs[3].error.startswith("RuntimeError") and jobs[4].error == ""
    assert len(jobs[4].curves) == 4  # the half-written last line is skipped
    assert swept_params(jobs) == ["loss.beta", "loss.gamma"]  # loss= and +sweep= are constant
    assert parse_overrides(sweep / "0" / ".hydra" / "overrides.yaml")["sweep"] == "refa"


def test_report_table_csv_and_plots(sweep, tmp_path):
    out = tmp_path / "out"
    rows = report(sweep, out)
    assert [(r["job"], r["status"], r["loss.beta"], r["loss.gamma"]) for r in rows] == [
        ("0", "ok", "1", "0.7"),
        ("1", "ok", "1", "1.4"),
        ("2", "ok", "2.5", "0.7"),
        ("3", "failed", "2.5", "1.4"),
        ("10", "missing", "4", "0.7"),
    ]
    assert rows[1]["eval/loss_final"] == 0.8 and rows[1]["eval/loss_best"] == pytest.approx(0.79)
    assert rows[1]["eval/rewards/margin_best"] == 0.31 and rows[1]["tokens"] == 1000
    assert rows[3]["eval/loss_final"] == 0.9 and math.isnan(rows[3]["eval/loss_best"])
    assert rows[4]["eval/rewards/accuracy_final"] == 0.6  # not finished: the last logged eval
    md = (out / "report.md").read_text()
    assert "5 jobs: 3 ok, 1 failed, 1 missing." in md
    assert "Best final `eval/rewards/accuracy`: **0.65**, job 1 (loss.beta=1, loss.gamma=1.4)" in md
    assert "- job 3 (failed): RuntimeError: CUDA out of memory \\| retry" in md
    assert "- job 10 (missing): no summary.json" in md
    table = [r for r in md.splitlines() if r.startswith("| ")]
    assert len(table) == 1 + 5 and all(r.count(" | ") == table[0].count(" | ") for r in table)
    assert table[2].startswith("| 1 | ok | 1 | 1.4 | 0.8 | 0.79 | 0.65 |")
    with (out / "report.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "ok", "ok", "failed", "missing"]
    with (out / "curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 3 * 5 + 2 + 3  # (job, step) rows; train and eval lines merged
    for png in ("metric_vs_loss.beta.png", "metric_vs_loss.gamma.png", "training_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in md
    assert not (sweep / "report.md").exists()


def test_cli_metric_and_default_out(sweep, capsys):
    main([str(sweep), "--metric", "eval/loss"])  # lower is better for a loss
    md = (sweep / "report.md").read_text()
    assert "Best final `eval/loss`: **0.7**, job 2" in md and md in capsys.readouterr().out
    main([str(sweep), "--metric", "train/loss"])  # not in the summary: last logged value
    assert "Best final `train/loss`: **0.95**, job 2" in (sweep / "report.md").read_text()
    assert "| train/loss final |" in (sweep / "report.md").read_text()


def test_empty_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no job dirs"):
        report(tmp_path)


def test_committed_example_and_stripped_notebooks():
    assert {"report.md", "report.csv", "curves.csv", "training_curves.png"} <= {
        p.name for p in EXAMPLE.iterdir()
    }
    with (EXAMPLE / "report.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"] * 4
    assert [p.stem for p in NOTEBOOKS] == [
        "length_vs_loss",
        "sweep_comparison",
        "training_dynamics",
    ]
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            assert not cell.get("outputs") and not cell.get("execution_count"), path


def test_notebooks_execute_on_a_report(sweep, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat")
    nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient")
    pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (a python3 kernel)")
    pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib")
    out = tmp_path / "report"
    report(sweep, out)
    monkeypatch.setenv("PREFOPT_REPORT_DIR", str(out))  # the kernel inherits the environment
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        resources = {"metadata": {"path": str(tmp_path)}}  # the kernel's working directory
        nbclient.NotebookClient(
            nb, timeout=120, kernel_name="python3", resources=resources
        ).execute()
        assert str(out) in json.dumps(nb.cells[1]["outputs"]), path.name  # the setup cell's print
