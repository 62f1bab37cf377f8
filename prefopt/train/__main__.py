"""``python -m prefopt.train``: compose the config, then run the training loop.

    python -m prefopt.train                                   # embedded default (CPU, offline)
    python -m prefopt.train loss=simpo model=tiny trainer=debug
    python -m prefopt.train hydra.run.dir=outputs/refa_dynamic/<run>   # resume that run

Heavy modules (torch, transformers, datasets, wandb) are imported after composition, inside
``main``, so ``--help`` and ``--cfg job`` stay fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import prefopt.config  # noqa: F401  (registers the group schemas before composition)
import prefopt.losses  # noqa: F401  (registers loss schemas before composition)
from prefopt.checks import validate_config
from prefopt.errors import PrefoptError, report_user_errors

log = logging.getLogger("prefopt")


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
@report_user_errors  # a data/config/checkpoint mistake: one block on stderr, exit 2
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a config mistake fails in seconds: torch not loaded
        validate_config(cfg)

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


if __name__ == "__main__":
    main()
