"""Every DeepSpeed config launcher can emit, checked by DeepSpeed itself (not by reading our JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("ds_probe.py")
pytestmark = pytest.mark.integration


def probe(mode: str, processes: int = 1) -> list[dict]:
    """The probe's rows; with processes > 1, that many probes at once, each taking every n-th case (the
    steps are one core's work each: deepspeed.initialize is Python)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    shares = [[f"{k}/{processes}"] for k in range(processes)] if processes > 1 else [[]]
    errs = [tempfile.TemporaryFile("w+") for _ in shares]  # DeepSpeed's logs: no pipe to fill while we wait
    procs = [subprocess.Popen([sys.executable, str(PROBE), mode, *share], stdout=subprocess.PIPE, stderr=err,
                              text=True, env=env, cwd=ROOT) for share, err in zip(shares, errs)]
    rows = []
    for proc, err in zip(procs, errs):
        out, _ = proc.communicate(timeout=1500)
        part = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        err.seek(0)
        assert part, f"probe {mode} printed nothing (exit {proc.returncode}):\n{err.read()[-3000:]}"
        rows += part
    return rows


def test_every_config_is_accepted_by_deepspeed_config_at_its_world_size():
    rows = probe("accept")
    preset_rows = [r for r in rows if "preset" in r]
    rows = [r for r in rows if "preset" not in r]
    # 48 stage x offload x precision combinations x 4 world sizes
    assert len(rows) == 48 * 4
    for r in preset_rows:  # presets omit train_batch_size: DeepSpeed derives it at any world size
        assert r["world_seen"] == r["world"] and r["train_batch_size"] == r["micro"] * r["accum"] * r["world"], r
    assert len(preset_rows) == 2 * 13
    for r in rows:
        assert r["ok"], r
        assert r["world_seen"] == r["world"], r  # DeepSpeed really counted the intended world size
        assert r["train_batch_size"] == r["micro"] * r["accum"] * r["world"] == r["plan_global"], r
        assert r["zero_stage"] == r["stage"], r
        assert (r["bf16"], r["fp16"]) == (r["precision"] == "bf16", r["precision"] == "fp16"), r


def _cpu_has_fp16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


def test_every_stage_offload_precision_initializes_and_steps_on_cpu():
    """One real deepspeed.initialize + optimizer steps for each combination (NVMe offload writes
    to a temporary folder through DeepSpeed's async_io op, built on first use; needs libaio)."""
    rows = probe("steps", processes=2)
    assert len(rows) == 48
    fp16_ok = _cpu_has_fp16()
    for r in rows:
        if r["precision"] == "fp16" and not fp16_ok:
            # DeepSpeed's CPU accelerator refuses fp16 without mkldnn fp16: the refusal is the check.
            assert not r["ok"] and "fp16 is not supported" in r["error"], r
            continue
        assert r["ok"], r
        assert r["global_steps"] == 2, r
        # the plan's optimizer on CPU ranks: torch's fused AdamW, or DeepSpeed's CPU Adam with offload
        expected = "DeepSpeedCPUAdam" if r["offload_optimizer"] != "none" else "AdamW"
        assert r["optimizer"] == expected, r
        if r["weights_moved"] is not None:
            assert r["weights_moved"], r
