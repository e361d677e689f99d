"""Build DeepSpeed's JIT ops that the suite's CPU ranks load, ahead of the tests that first need them.

    python tests/prebuild_ops.py [BUILDER ...]

Default: every builder of OPS, in that order, the ones the earliest tests load first (shared-memory comm:
every DeepSpeed process group on CPU; CPU Adam and pinned memory: optimizer offload; async_io: NVMe offload).

tests/run.sh starts this before the tests (it says how), so the builds (about 4 minutes of compiling on 2
cores with an empty ~/.cache/torch_extensions) take cycles the suite leaves idle (a test waiting on a Slurm
job, a rank waiting on its peer) instead of stalling the first test that needs each op. A test that needs
an op while it is still building waits on torch's build lock and then loads the built module; one already
built loads in a second. Nothing here is required: an op this machine cannot build (async_io without
libaio) fails here as it would in the test, which then reports it.
"""

from __future__ import annotations

import sys
import time

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "PinMemoryBuilder", "AsyncIOBuilder")


def main(names: list[str]) -> int:
    from deepspeed.accelerator import get_accelerator

    failed = 0
    for name in names or OPS:
        start = time.monotonic()
        try:
            builder = get_accelerator().create_op_builder(name)
            if builder is None:
                print(f"prebuild_ops: {name}: none for this accelerator", flush=True)
                continue
            builder.load()
            print(f"prebuild_ops: {name} ready in {time.monotonic() - start:.0f} s", flush=True)
        except Exception as e:  # the test that loads it reports the same failure
            failed += 1
            print(f"prebuild_ops: {name} failed after {time.monotonic() - start:.0f} s: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
