# .venv/bin/pytest tests/test_offline.py -q
"""No network: the memory plan of every recipe and experiment runs on the shipped shapes; the dry
run of every recipe model shows its plan, then one clear error naming what to download; a Hub
dataset likewise. Run in one fresh process with HF_HUB_OFFLINE=1 and an empty HF_HOME."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from prefopt.errors import HubError, hub_download, is_offline_error

SCRIPT_PATH = REPO / "experiments" / "model_configs.py"
spec = importlib.util.spec_from_file_location("model_configs", SCRIPT_PATH)
model_configs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_configs)

RECIPE_IDS = model_configs.recipe_hub_ids()  # Hub id -> the model= / experiment= options


def test_every_recipe_hub_model_has_its_shapes_shipped():
    shipped = {p.stem.replace("--", "/") for p in model_configs.SHIPPED_CONFIGS.glob("*.json")}
    assert shipped == set(RECIPE_IDS)
    assert len(RECIPE_IDS) >= 7


@pytest.mark.parametrize("repo_id", sorted(RECIPE_IDS))
def test_shipped_shapes_give_the_parameter_count_the_hub_reports(repo_id):
    """Built on the meta device from the shipped keys, each model has the parameter count of its
    safetensors files on the Hub (``_parameters``): an independent check of the shapes."""
    from transformers import AutoModelForCausalLM

    from prefopt.config import ModelConfig
    from prefopt.model.load import shipped_config

    path = model_configs.shipped_path(repo_id)
    published = json.loads(path.read_text())["_parameters"]
    config = shipped_config(ModelConfig(name_or_path=repo_id, source="hub"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == published
    assert set(json.loads(path.read_text())) - {"_source", "_parameters"} <= set(
        model_configs.SHAPE_KEYS
    )


def test_offline_detection_follows_the_exception_chain():
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        try:
            raise LocalEntryNotFoundError("not cached")
        except LocalEntryNotFoundError as e:
            raise OSError("cannot load the tokenizer") from e
    except OSError as e:
        assert is_offline_error(e)
    assert not is_offline_error(ValueError("bad value"))
    response = type("R", (), {"headers": {}, "status_code": 404, "request": None})()
    assert not is_offline_error(RepositoryNotFoundError("no such repo", response=response))
    missing = pytest.raises(HubError, match="model 'org/m' is not in the local")
    with missing as e, hub_download("model", "org/m"):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    assert "hf download org/m" in e.value.fix and "HF_HUB_OFFLINE=1" in e.value.fix
    with pytest.raises(ValueError, match="bad value"), hub_download("model", "org/m"):
        raise ValueError("bad value")  # not an offline error: left as it is


# Runs in a fresh process, after HF_HUB_OFFLINE=1 and HF_HOME are set (huggingface_hub and
# datasets read them at import): the plan CLI per option, the dry run per recipe model, one run
# on a Hub dataset. Prints {label: [exit code, output]} as JSON.
SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from doc_commands import run_module
runs = json.loads(sys.argv[2])
print(json.dumps({label: run_module(m, args, sys.argv[3]).__dict__ for label, (m, args) in
    runs.items()}))
"""


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    (tmp / "hf_home").mkdir()
    runs = {}
    for options in RECIPE_IDS.values():
        for option in options:
            runs[f"plan {option}"] = ("prefopt.train.plan", [option, "--world-size", "8"])
        model = next(o for o in options if o.startswith("model="))
        runs[f"dry run {model}"] = ("prefopt.train", [model, "trainer.dry_run=true"])
    tiny = ["model=tiny", "trainer=debug", "logger=none"]
    runs["hub dataset"] = ("prefopt.train", [*tiny, "dataset=ultrafeedback"])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf_home"),
        "PREFOPT_CACHE": str(tmp / "cache"),
    }
    cmd = [sys.executable, "-c", SCRIPT, str(REPO / "tests"), json.dumps(runs), str(tmp)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_plan_of_every_recipe_and_experiment_runs_offline(offline_runs):
    plans = {k: v for k, v in offline_runs.items() if k.startswith("plan ")}
    assert len(plans) == sum(len(o) for o in RECIPE_IDS.values())
    for label, run in plans.items():
        assert run["code"] in (0, 1), (label, run["out"][-2000:])  # fits / does not fit
        assert "total per GPU" in run["out"] and "Traceback" not in run["out"], label


@pytest.mark.parametrize("repo_id", sorted(RECIPE_IDS))
def test_an_offline_dry_run_shows_the_plan_then_names_what_to_download(offline_runs, repo_id):
    model = next(o for o in RECIPE_IDS[repo_id] if o.startswith("model="))
    run = offline_runs[f"dry run {model}"]
    assert run["code"] == 2, run["out"][-2000:]
    out = run["out"]
    assert "memory plan per GPU" in out and "total per GPU" in out
    assert f"prefopt hub error: the tokenizer of model '{repo_id}' is not in the local" in out
    assert f"`hf download {repo_id}`" in out and "HF_HUB_OFFLINE=1" in out
    assert "Traceback" not in out


def test_an_offline_hub_dataset_names_the_dataset_and_the_download(offline_runs):
    run = offline_runs["hub dataset"]
    assert run["code"] == 2, run["out"][-2000:]
    assert "prefopt hub error: dataset 'openbmb/UltraFeedback' is not in the local" in run["out"]
    assert "`hf download --repo-type dataset openbmb/UltraFeedback`" in run["out"]
    assert "Traceback" not in run["out"]
