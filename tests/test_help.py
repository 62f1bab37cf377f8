# pytest tests/test_help.py -q
"""``python -m prefopt.train --help`` lists every config group and its options (read from conf/
without Hydra composing anything), the same options Hydra itself would offer."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import prefopt.config  # noqa: F401  (the schemas Hydra lists next to the files)
import prefopt.losses  # noqa: F401
from prefopt.train.__main__ import CONF, config_groups


def _help(*flags: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "prefopt.train", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_help_lists_the_groups_and_points_to_cfg_job():
    text = _help("--help")
    assert text.startswith("python -m prefopt.train [group=option ...] [key=value ...]")
    lines = dict(line.split(": ", 1) for line in text.splitlines() if line.count(": ") == 1)
    assert lines["loss"].split(", ")[:3] == ["alpha_dpo", "cpo", "dpo"]
    assert "refa_dynamic" in lines["loss"].split(", ")
    assert lines["trainer"] == "debug, default, gpu"
    assert lines["logger"] == "none, wandb"
    assert lines["model/lora"] == "default"
    assert "_schema" not in text  # schemas are not choices
    assert "hydra/launcher" not in lines  # Hydra's own groups: --hydra-help lists them
    assert "--cfg job prints the composed config" in text
    assert "$APP_CONFIG_GROUPS" not in text
    assert _help("model=mistral7b", "-h") == text  # -h too, and overrides do not change it


def test_help_offers_what_hydra_would_offer():
    """The listing from the files equals Hydra's own (its config loader, minus the schemas
    registered in code), for every group that is not Hydra's."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        expected = []

        def walk(parent: str) -> None:
            for name in sorted(loader.list_groups(parent)):
                group = f"{parent}/{name}" if parent else name
                if group == "hydra":
                    continue
                options = sorted(o for o in loader.get_group_options(group) if o[0] != "_")
                if options:
                    expected.append((group, f"{group}: {', '.join(options)}"))
                walk(group)

        walk("")
    assert config_groups(CONF).splitlines() == [line for _, line in sorted(expected)]
