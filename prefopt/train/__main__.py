"""``python -m prefopt.train``: compose the config, then run the training loop.

    python -m prefopt.train                                   # embedded default (CPU, offline)
    python -m prefopt.train loss=simpo model=tiny trainer=debug
    python -m prefopt.train hydra.run.dir=outputs/refa_dynamic/<run>   # resume that run

Heavy modules (transformers, datasets, wandb, the loop) are imported after composition, inside
``train``, so ``--cfg job`` stays fast. ``--help`` is answered from the conf/ tree before Hydra
or torch is imported (``help_text``): Hydra's own listing composes the whole config again for each
of the ~120 config groups it lists (hydra and app groups alike), which took 4-5 s of a 2-core CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import string
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import prefopt.config  # noqa: F401  (schemas and resolvers; also where a submitit job unpickles)
from prefopt.checks import validate_config
from prefopt.errors import PrefoptError, report_user_errors

log = logging.getLogger("prefopt")
CONF = Path(__file__).resolve().parents[2] / "conf"
HELP_FLAGS = ("--help", "-h")  # Hydra's application help; --hydra-help stays Hydra's


def config_groups(conf: Path) -> str:
    """Hydra's ``$APP_CONFIG_GROUPS`` listing, read from the YAML files under ``conf``: one line
    per group, ``group: option, option``. Schemas (``_schema*``, registered in code) are not
    options a user picks, and hydra/ holds Hydra's own launchers and sweepers."""
    lines = []
    for folder in sorted(p for p in conf.rglob("*") if p.is_dir()):
        group = folder.relative_to(conf).as_posix()
        options = sorted(f.stem for f in folder.glob("*.yaml") if not f.name.startswith("_"))
        if options and group.split("/")[0] != "hydra":
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def help_text(conf: Path = CONF) -> str:
    """``--help``: conf/train.yaml's ``hydra.help.template`` with the group listing filled in."""
    template = OmegaConf.load(conf / "train.yaml").hydra.help.template
    return string.Template(template).safe_substitute(APP_CONFIG_GROUPS=config_groups(conf))


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
@report_user_errors  # a data/config/checkpoint mistake: one block on stderr, exit 2
def train(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a config mistake fails in seconds: torch not loaded
        validate_config(cfg)
    from prefopt import deps

    deps.check(*deps.CORE)  # from package metadata: still nothing imported
    from prefopt.train.optim import uses_torchao

    if not uses_torchao(cfg.optimizer._target_):  # nor its warnings, through transformers
        deps.keep_torchao_out(lora=cfg.model.lora is not None)

    from prefopt.model import parallel
    from prefopt.train.logger import SweepInfo
    from prefopt.train.loop import run

    if int(os.environ.get("RANK", "0")) > 0:  # one log: rank 0 speaks, the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    try:
        sweep = None
        if hydra_cfg.mode == RunMode.MULTIRUN:  # W&B: one group per sweep, the job's values as tags
            sweep = SweepInfo(
                group=f"{cfg.exp_name}/{Path(hydra_cfg.sweep.dir).name}",
                tags=[o[:64] for o in overrides],
            )
        metrics = run(cfg, overrides, sweep)
        # Every rank ends the run after the same step; leave together, so that no rank tears its
        # process group down while another still finishes its summary (a 2-rank gloo run once
        # aborted at exit that way). Only on success: a failed rank would leave the others here.
        parallel.barrier()
    except Exception as e:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # In a sweep one failed job must not stop the others: record it for the report.
        if isinstance(e, PrefoptError):  # the user's mistake: its message, not a stack
            log.error("job %s failed: %s", hydra_cfg.job.num, e)
        else:
            log.exception("job %s failed", hydra_cfg.job.num)
        if int(os.environ.get("RANK", "0")) == 0:  # one summary per job, not one per rank
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            failure = {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "overrides": overrides,
            }
            Path(cfg.run_dir, "summary.json").write_text(json.dumps(failure, indent=2))
        return math.nan
    finally:
        parallel.destroy()
    return metrics.get("loss", math.nan)


def main() -> None:
    """``--help`` from the conf/ tree; else register the schemas and let Hydra run ``train``."""
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print(help_text())
        return
    import prefopt.losses  # noqa: F401  (registers loss schemas before composition)

    train()


if __name__ == "__main__":
    main()
