"""Helpers the integration tests share: the environment runs see, `python -m launcher` in a subprocess,
several trainings in one process (the imports paid once), and the merged-vs-adapter logits comparison.

They are fixtures (pytest imports conftest files under one module name, so test modules cannot import
from them reliably); `env` is module-scoped: each test module gets its own tokenized-data cache.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.testing.faults import FAULT_ENV, TEST_DUMP_ENV, TEST_DUMP_START_ENV

ROOT = Path(__file__).resolve().parents[2]
TEST_ONLY_ENV = (TEST_DUMP_ENV, TEST_DUMP_START_ENV, FAULT_ENV)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """This interpreter's environment with the checkout importable, a fresh data cache for the module and
    none of the test-only fault or dump variables (a test sets those per run)."""
    e = dict(os.environ)
    e["LAUNCHER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), e.get("PYTHONPATH", "")) if x)
    e["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    for k in TEST_ONLY_ENV:
        e.pop(k, None)
    return e


def run_launcher(args: list[Any], env: dict[str, str], timeout: float = 900, expect: int | None = None,
                 **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` from the checkout; `.seconds` is its wall time. With `expect`, asserts
    that exit code and shows the output's tail when it differs."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**env, **extra_env})
    proc.seconds = time.monotonic() - t0
    if expect is not None:
        assert proc.returncode == expect, (f"launcher {' '.join(map(str, args[:2]))}: exit {proc.returncode} "
                                           f"(wanted {expect})\n--- stdout\n{proc.stdout[-6000:]}\n"
                                           f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def launcher():
    return run_launcher


# Each case through the per-rank entry point (`loop.train` on a run dir made by `launch.prepare_run`, as
# `launcher run` makes it), one after another in one process. By default every run dir (and its tiny base)
# is made first: a base written after a ZeRO-3 run in this process would be created under that run's
# zero.Init and saved as empty shards. "each" prepares a case just before it trains (its model may be
# an earlier case's output). A failing case is reported and the next one runs.
_TRAIN_ALL = r"""
import json, os, sys, traceback
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[1])
from launcher.config.spec import validate
from launcher.rank import loop
from launcher.submit import local as launch
cases, each = json.loads(sys.argv[2]), sys.argv[3] == "each"
prepare = lambda tree: launch.prepare_run(validate(tree), tree["output"]["dir"])[1]
specs = {} if each else {name: prepare(tree) for name, tree in cases}
for name, tree in cases:
    print(f"@@ begin {name}", flush=True)
    try:
        loop.train(specs[name] if not each else prepare(tree))
        print(f"@@ ok {name}", flush=True)
    except BaseException as exc:
        traceback.print_exc(file=sys.stdout)
        print(f"@@ failed {name}: {type(exc).__name__}: {exc}", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_one_rank(cases: list[tuple[str, dict[str, Any]]], env: dict[str, str], timeout: float = 900,
                   prepare: str = "first") -> tuple[dict[str, str], subprocess.CompletedProcess]:
    """Train each (name, resolved spec tree) on one rank in one subprocess. Returns each case's output
    (ending "@@ ok NAME" when it trained) and the process. `prepare="each"`: a case's run dir is made just
    before it trains (its model is an earlier case's output)."""
    proc = subprocess.run([sys.executable, "-c", _TRAIN_ALL, str(free_port()), json.dumps(cases), prepare],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    sections = re.split(r"^@@ begin (\w+)\n", proc.stdout, flags=re.M)
    return {sections[k]: sections[k + 1] for k in range(1, len(sections) - 1, 2)}, proc


@pytest.fixture(scope="session")
def train_cases():
    return train_one_rank


def merge_error(adapted: Any, merged: Any, vocab: int = 4000) -> tuple[Any, Any]:
    """|adapter model's logits - merged model's| and |adapter's - its base's (adapter disabled)| on one
    fixed random batch, in fp32: the merge error and the adapter's own effect it must keep."""
    import torch

    x = torch.randint(5, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapted(input_ids=x).logits.float(), merged(input_ids=x).logits.float()
        with adapted.disable_adapter():
            a0 = adapted(input_ids=x).logits.float()
    return (a - b).abs(), (a - a0).abs()


@pytest.fixture(scope="session")
def merge_errors():
    return merge_error


def sets_of(res: dict[str, Any], kind: str) -> dict[str, Any]:
    """The one evaluation set of `kind` in a `launcher eval` result."""
    (entry,) = [e for e in res["sets"] if e["kind"] == kind]
    return entry


@pytest.fixture(scope="session")
def by_kind():
    return sets_of
