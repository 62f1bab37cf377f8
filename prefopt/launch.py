"""What every rank of a job must agree on before its process group exists: the time in the run
dir's name (``${prefopt.now:...}`` in ``hydra.run.dir``, resolved by each rank on its own).

torch is imported only for a multi-rank job, so composing a config stays light.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from prefopt.errors import ConfigError


def job_start(pattern: str) -> str:
    """``${prefopt.now:%Y-%m-%d_%H-%M-%S}`` in run dir names: Hydra's ``now`` for one process;
    under torchrun the time the job's first rank started, so that every rank names one dir."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return datetime.now().strftime(pattern)
    return shared_start_time().strftime(pattern)


def shared_start_time() -> datetime:
    """The time the first rank of this torchrun job asked, the same on every rank.

    Each rank resolves ``hydra.run.dir`` (``${prefopt.now:...}``) on its own before the process
    group exists; ranks that start in different seconds would otherwise write their checkpoint
    shards to different directories. torchrun's agent hosts a store at ``MASTER_ADDR:MASTER_PORT``
    (``TORCHELASTIC_USE_AGENT_STORE``) from before the workers start: the first rank to ask sets
    its time there, and every rank reads that one.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise ConfigError(
            f"{os.environ.get('WORLD_SIZE')} ranks started without torchrun's store: they cannot "
            "agree on a run dir named by the time",
            fix="pass hydra.run.dir=<dir>, the same on every rank, or launch with torchrun",
        )
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=60),
    )
    key = f"prefopt/start_time/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    mine = datetime.now().isoformat()
    return datetime.fromisoformat(store.compare_set(key, "", mine).decode())
