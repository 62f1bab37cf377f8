# .venv/bin/pytest tests/test_configs.py -q
"""Every config composes; typos, wrong types and unknown names fail at composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from prefopt.losses import LOSSES, build_loss

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["run_dir=/tmp/x", *overrides])


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_loss_configs_match_registry():
    assert _options("loss") == sorted(LOSSES)


@pytest.mark.parametrize(
    ("group", "option"),
    [
        (g, o)
        for g in ("model", "dataset", "loss", "optimizer", "trainer", "logger", "experiment")
        for o in _options(g)
    ],
)
def test_every_option_composes(group, option):
    cfg = _compose(f"{group}={option}")
    if (group, option) != ("dataset", "local"):  # local has a required path
        OmegaConf.resolve(cfg)
    if group == "loss":
        spec, fn = build_loss(cfg.loss)
        assert spec.name == option and callable(fn)


def test_default_composition():
    cfg = _compose()
    assert cfg.model.source == "gguf" and cfg.loss.name == "refa_dynamic"
    assert Path(cfg.dataset.path).is_file() and Path(cfg.dataset.eval_path).is_file()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.betta=0.1", "betta"),  # typo in a loss key
        ("loss.beta=abc", "beta"),  # wrong type
        ("trainer.max_stepz=3", "max_stepz"),
        ("model.dtyp=bfloat16", "dtyp"),
        ("dataset.max_length=long", "max_length"),
        ("optimizer.momentum=0.9", "momentum"),  # "+optimizer.x=..." adds a _target_ kwarg
    ],
)
def test_bad_keys_fail_at_composition(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(override)
    assert key in str(err.value) + str(err.value.__cause__)


def test_unknown_loss_and_model_names_fail_clearly():
    with pytest.raises(ConfigCompositionException, match="loss"):
        _compose("loss=nope")
    with pytest.raises(ConfigCompositionException, match="model"):
        _compose("model=nope")


def test_registry_error_lists_losses():
    from prefopt.losses import get_spec

    with pytest.raises(KeyError, match="refa_dynamic"):
        get_spec("nope")


def test_the_default_model_brings_the_cpu_demo_and_explicit_values_win():
    # the recipe of model=smollm2_135m (conf/recipe/); tests/test_recipes.py covers the others
    assert _compose().optimizer.lr == 3e-4
    assert _compose("optimizer.lr=1e-6").optimizer.lr == 1e-6
