"""The typed config: the entry points turn the composed config into the schema's dataclasses once,
every ``choice`` field refuses a value its ``Literal`` lacks (naming the key), and a pinned paper
run restates no value its recipes already give."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import prefopt.losses  # noqa: F401  (registers the loss schemas)
import prefopt.train  # noqa: F401  (registers the benchmark's data schema)
from prefopt.checks import typed, validate_config
from prefopt.config import (
    DatasetConfig,
    GenerateConfig,
    LoggerConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
)
from prefopt.errors import ConfigError
from prefopt.losses import LOSSES

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["model=tiny", "trainer=debug", "run_dir=/r", "cache_dir=/c"]


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_the_composed_config_becomes_the_schema_dataclasses():
    cfg = validate_config(_compose("train", *TINY, "loss=simpo"))
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.trainer, TrainerConfig)
    assert type(cfg.loss) is LOSSES["simpo"].config_cls  # the loss node: its own dataclass
    gen = typed(_compose("generate", "out_dir=/o", "cache_dir=/c"), GenerateConfig)
    assert isinstance(gen, GenerateConfig) and isinstance(gen.model, ModelConfig)


def _choice_fields(schema: type, prefix: str) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for f in dataclasses.fields(schema):
        if "choices" in f.metadata:
            out.append((prefix + f.name, f.metadata["choices"]))
    return out


CHOICES = [
    *_choice_fields(ModelConfig, "model."),
    *_choice_fields(DatasetConfig, "dataset."),
    *_choice_fields(TrainerConfig, "trainer."),
    *_choice_fields(LoggerConfig, "logger."),
]


@pytest.mark.parametrize(("key", "allowed"), CHOICES, ids=[k for k, _ in CHOICES])
def test_every_choice_field_refuses_a_value_it_does_not_declare(key, allowed):
    message = f"{key}='bogus': expected one of {allowed!r}"
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate_config(_compose("train", *TINY, f"{key}=bogus"))


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_paper_run_restates_no_value_its_recipes_give(path):
    """Each published value lives in one file: the model's recipe or the loss's recipe for that
    model. An experiment that selects both sets only what differs (a value equal to the
    recipes' would be a second copy to keep in step)."""
    data = yaml.safe_load(path.read_text())
    groups = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            ((key, value),) = entry.items()
            groups[key.removeprefix("override /")] = value
    if "model" not in groups or "loss" not in groups:
        pytest.skip("selects no model and loss: no recipe to restate")
    given: dict[str, object] = {}
    for recipe in (
        CONF / "recipe" / f"{groups['model']}.yaml",
        CONF / "recipe" / "loss" / f"{groups['loss']}_{groups['model']}.yaml",
    ):
        if recipe.is_file():
            given |= _leaves({k: v for k, v in yaml.safe_load(recipe.read_text()).items()})
    given["optimizer.lr"] = given.get("recipe.lr")  # the recipes set it as ${recipe.lr}
    mine = _leaves({k: v for k, v in data.items() if k != "defaults"})
    restated = {k: v for k, v in mine.items() if k in given and given[k] == v}
    assert not restated, f"{path.name} restates its recipes' values: {restated}"
