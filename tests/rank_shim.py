"""torchrun's script in tests/test_launch.py: ``python -m prefopt.train <args>`` as each rank
runs it, after test-only delays read from the environment (the shipped code is not changed):

  SHIM_START_DELAY_S=d     rank r sleeps r * d seconds before Hydra starts (ranks start apart)
  SHIM_PREPARE_DELAY_S=d   rank 0's data preparation takes d seconds longer
  SHIM_PREPARE_EXIT=1      rank 0 dies (exit 1) while it prepares the data
  SHIM_WAIT_LOG_EVERY_S=d  a waiting rank logs its progress every d seconds (60 s shipped)
"""

from __future__ import annotations

import os
import runpy
import sys
import time

rank = int(os.environ["RANK"])
time.sleep(rank * float(os.environ.get("SHIM_START_DELAY_S", "0")))

if rank == 0 and ("SHIM_PREPARE_DELAY_S" in os.environ or "SHIM_PREPARE_EXIT" in os.environ):
    import prefopt.train.loop as loop

    prepare = loop.prepare_data

    def slow_prepare(*args, **kwargs):
        if os.environ.get("SHIM_PREPARE_EXIT"):
            os._exit(1)
        time.sleep(float(os.environ["SHIM_PREPARE_DELAY_S"]))
        return prepare(*args, **kwargs)

    loop.prepare_data = slow_prepare

if "SHIM_WAIT_LOG_EVERY_S" in os.environ:
    import prefopt.model.parallel as parallel

    parallel.WAIT_LOG_EVERY_S = float(os.environ["SHIM_WAIT_LOG_EVERY_S"])

sys.argv = ["prefopt.train", *sys.argv[1:]]
runpy.run_module("prefopt.train", run_name="__main__", alter_sys=True)
