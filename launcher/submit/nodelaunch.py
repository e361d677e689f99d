"""DeepSpeed's per-node launcher as `launcher run` starts it: `python -m launcher.submit.nodelaunch ARGS` runs
`deepspeed.launcher.launch` as __main__ with the same ARGS, after keeping mlflow out of the process.

Importing deepspeed imports mlflow whenever it is installed (deepspeed.runtime.config -> deepspeed.autotuning,
for its autotuner): 1.6 s before the first rank starts, in a process that only spawns and watches the ranks.
A None entry in sys.modules makes that import fail as if mlflow were not installed (DeepSpeed then goes
without); the ranks are new processes and keep it or not by their run's trackers (rank/trackers.py).
"""

from __future__ import annotations

import runpy
import sys

DEEPSPEED_LAUNCH = "deepspeed.launcher.launch"


def main() -> None:
    sys.modules.setdefault("mlflow", None)  # type: ignore[arg-type]
    runpy.run_module(DEEPSPEED_LAUNCH, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
