# .venv/bin/pytest tests/test_sweeps.py -q
"""Sweep presets and paper experiments compose (and so do the commands in their comments); a real
2 x 2 multirun on the tiny model is summarised by ``python -m prefopt.sweeps.report``."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# preset -> (loss it selects, {swept key: number of values})
SWEEPS = {
    "refa": ("refa_dynamic", {"loss.beta": 5, "loss.gamma": 3, "loss.p": 2, "loss.lam": 2}),
    "alpha_dpo": ("alpha_dpo", {"loss.alpha": 4}),
    "lmpo": ("lmpo", {"loss.lam": 3, "loss.log_h": 4}),
    "simpo": ("simpo", {"loss.beta": 2, "loss.gamma": 5}),
    "spo": ("spo", {"loss.alpha": 3}),
    "swepo": ("swepo", {"loss.p": 3}),
}
EXPERIMENT_LOSS = {
    "refa": "refa_dynamic",
    "alpha_dpo": "alpha_dpo",
    "lmpo": "lmpo",
    "simpo": "simpo",
    "swepo": "swepo",
}
# Published settings spot-checked: (loss keys, optimizer.lr), from the papers and official recipes.
PUBLISHED = {
    "simpo_mistral_base": ({"beta": 2.0, "gamma": 1.6}, 3e-7),
    "simpo_mistral_instruct": ({"beta": 2.5, "gamma": 0.25}, 5e-7),
    "simpo_llama3_base": ({"beta": 2.0, "gamma": 1.0}, 6e-7),
    "simpo_llama3_instruct": ({"beta": 2.5, "gamma": 1.375}, 1e-6),
    "lmpo_mistral_base": ({"beta": 2.0, "log_h": 1.6, "lam": 1.0}, 3e-7),
    "lmpo_mistral_instruct": ({"beta": 2.5, "log_h": 0.25, "lam": 0.2}, 5e-7),
    "lmpo_llama3_base": ({"beta": 2.0, "log_h": 1.0, "lam": 0.2}, 6e-7),
    "lmpo_llama3_instruct": ({"beta": 2.5, "log_h": 1.4, "lam": 0.2}, 1e-6),
    "alpha_dpo_mistral7b_instruct": ({"beta": 2.5, "gamma": 0.375, "alpha": 0.05}, 6e-7),
    "alpha_dpo_llama3_8b_instruct": ({"beta": 2.5, "gamma": 1.5, "alpha": 0.2}, 1e-6),
    "alpha_dpo_llama3_8b_instruct_v02": ({"beta": 10.0, "gamma": 4.0, "alpha": 0.2}, 1e-6),
    "alpha_dpo_gemma2_9b_it": ({"beta": 10.0, "gamma": 4.0, "alpha": 0.05}, 8e-7),
    "refa_mistral7b_base": ({"p": 2.0}, 3e-7),
    "swepo_mistral7b_base": ({"p": 1.0}, 5e-7),
    "swepo_llama3_8b_base": ({"p": 2.0}, 5e-7),
}
PAPER_EXPERIMENTS = sorted(
    p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "cpu_demo"
)


def _compose(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train", overrides=["run_dir=/tmp/x", *overrides], return_hydra_config=hydra_cfg
        )


def _commands(path: Path) -> list[list[str]]:
    """The ``python -m prefopt.train ...`` commands in a config's comments, as override lists."""
    cmds = re.findall(r"^#\s+python -m prefopt\.train (.*?)(?:\s+#.*)?$", path.read_text(), re.M)
    return [[a for a in shlex.split(c) if a != "-m"] for c in cmds]


def _header_ok(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("# @package _global_\n"), path
    assert _commands(path), f"{path}: no 'python -m prefopt.train ...' command in the comment"


def test_every_preset_and_experiment_is_listed_here():
    assert sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")) == sorted(SWEEPS)
    assert sorted(PUBLISHED) == PAPER_EXPERIMENTS


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_sweep_preset_composes_with_its_grid(name):
    loss, grid = SWEEPS[name]
    path = CONF / "sweep" / f"{name}.yaml"
    _header_ok(path)
    assert f"+sweep={name}" in path.read_text()
    cfg = _compose([f"+sweep={name}"], hydra_cfg=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert cfg.loss.name == loss and set(params) == set(grid)
    assert {k: len(str(v).split(",")) for k, v in params.items()} == grid
    for pick in (0, -1):  # every value must pass the loss schema: try the first and the last
        chosen = [f"{k}={str(v).split(',')[pick]}" for k, v in params.items()]
        assert _compose([f"+sweep={name}", *chosen]).loss.name == loss


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_experiment_composes_with_published_values(name):
    path = CONF / "experiment" / f"{name}.yaml"
    _header_ok(path)
    cfg = _compose([f"experiment={name}"])
    OmegaConf.resolve(cfg)
    family = next(f for f in EXPERIMENT_LOSS if name.startswith(f + "_"))
    assert cfg.loss.name == EXPERIMENT_LOSS[family]
    assert cfg.trainer.global_batch_groups == 128 and cfg.model.source == "hub"
    assert cfg.dataset.schema != "canonical"  # a paper dataset, not the CPU demo's
    values, lr = PUBLISHED[name]
    assert {k: cfg.loss[k] for k in values} == values
    assert math.isclose(cfg.optimizer.lr, lr)


def test_experiment_sets_exp_name_and_seed():
    cfg = _compose(["experiment=simpo_mistral_base"])
    assert cfg.exp_name == "simpo_mistral_base" and cfg.seed == 42


PRESETS = [
    *sorted((CONF / "sweep").glob("*.yaml")),
    *sorted((CONF / "experiment").glob("*_*.yaml")),
]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_commands_in_comments_compose(path):
    """Every command of the comment; ``experiment=<this file>`` alone is composed above."""
    for overrides in _commands(path):
        if overrides == [f"experiment={path.stem}"]:
            continue
        cfg = _compose(overrides, hydra_cfg=True)
        assert cfg.loss.name


def _run(args: list[str], env: dict[str, str], timeout: int = 240) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _table(report_md: str) -> list[list[str]]:
    rows = [r.strip("|").split("|") for r in report_md.splitlines() if r.startswith("| ")]
    return [[c.strip() for c in r] for r in rows[1:]]  # without the header


def test_real_multirun_and_report(tmp_path):
    """2 x 2 SimPO grid on the tiny model, report it, then lose one summary.json."""
    sweep = tmp_path / "sweep"
    env = {
        **os.environ,
        "PREFOPT_CACHE": str(tmp_path / "cache"),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    _run(
        [
            "-m",
            "prefopt.train",
            "-m",
            "model=tiny",
            "trainer=debug",
            "loss=simpo",
            "loss.beta=1,2",
            "loss.gamma=0.5,1",
            "trainer.max_steps=2",
            "trainer.eval_batch_groups=8",
            "dataset.max_train_examples=32",
            "dataset.max_eval_examples=8",
            "trainer.num_threads=1",
            f"hydra.sweep.dir={sweep}",
        ],
        env,
    )
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra" / "overrides.yaml").is_file())
    assert jobs == ["0", "1", "2", "3"]
    (sweep / "3" / "summary.json").unlink()  # a killed job: run dir, no summary
    stdout = _run(["-m", "prefopt.sweeps.report", str(sweep)], env)
    md = (sweep / "report.md").read_text()
    assert md in stdout
    head = next(r for r in md.splitlines() if r.startswith("| job"))
    assert "loss.beta" in head and "loss.gamma" in head and "trainer" not in head
    rows = _table(md)
    assert [r[:4] for r in rows] == [
        ["0", "ok", "1", "0.5"],
        ["1", "ok", "1", "1"],
        ["2", "ok", "2", "0.5"],
        ["3", "missing", "2", "1"],
    ]
    with (sweep / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "ok", "missing"]
    assert all(math.isfinite(float(r["eval/loss_final"])) for r in table[:3])
    assert table[3]["eval/loss_best"] == "nan"  # the summary is gone; final = last logged
    assert "job 3 (missing): no summary.json" in md
    for png in ("metric_vs_loss.beta.png", "metric_vs_loss.gamma.png", "training_curves.png"):
        assert (sweep / png).stat().st_size > 1000 and f"]({png})" in md


def test_optuna_search_instead_of_a_grid(tmp_path):
    """hydra/sweeper=search: Optuna trials minimise each job's returned held-out loss."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[optuna]'")
    from conftest import arithmetic_rows, write_jsonl

    train = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(12, seed=0))
    held = write_jsonl(tmp_path / "e.jsonl", arithmetic_rows(4, seed=1))
    sweep = tmp_path / "search"
    cmd = [
        sys.executable,
        "-m",
        "prefopt.train",
        "-m",
        "hydra/sweeper=search",
        "model=tiny",
        "trainer=debug",
        "loss=simpo",
        "loss.beta=interval(1.0,3.0)",
        "hydra.sweeper.n_trials=2",
        f"dataset.path={train}",
        f"dataset.eval_path={held}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "loss.beta" in results
    betas = [json.loads((sweep / j / "summary.json").read_text())["overrides"] for j in ("0", "1")]
    values = [float(o.split("=")[1]) for job in betas for o in job if o.startswith("loss.beta=")]
    assert len(values) == 2 and all(1.0 <= v <= 3.0 for v in values)
