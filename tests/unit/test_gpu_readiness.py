"""What a CPU-only suite cannot see on a GPU cluster, through the real code paths with CUDA mocked only where
there is no GPU: a flash_attn that is installed but does not load, version floors, what `doctor` flags on a
GPU partition, and how a collective timeout that NCCL's watchdog aborts is classified."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from launcher import requirements
from launcher.config.spec import validate
from launcher.errors import UserError
from test_preflight import run_cli

ROOT = Path(__file__).resolve().parents[2]
ABI_ERROR = ("/venv/lib/python3.11/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
             "undefined symbol: _ZN3c104cuda9SetDeviceEib")


@pytest.fixture
def broken_flash_attn(tmp_path, monkeypatch):
    """A flash_attn package that is found but raises on import, as one built for another torch does."""
    stub = tmp_path / "stub"
    (stub / "flash_attn").mkdir(parents=True)
    (stub / "flash_attn" / "__init__.py").write_text(f"raise ImportError({ABI_ERROR!r})\n")
    monkeypatch.syspath_prepend(str(stub))
    monkeypatch.setenv("PYTHONPATH", f"{stub}:{ROOT}")  # the child process pre-flight asks
    sys.modules.pop("flash_attn", None)
    return stub


@pytest.fixture
def cuda_h100(monkeypatch):
    """torch as an H100 node shows it (this machine has no GPU)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


# --------------------------------------------------------------------------- 3. flash_attn found but broken

def test_auto_attention_falls_back_to_sdpa_when_flash_attn_does_not_import(broken_flash_attn, cuda_h100):
    from launcher.model.load import choose_attn, flash2_problems

    spec = validate({"model": {"attn": "auto"}, "precision": "bf16", "cluster": {"gpus_per_node": 1}})
    assert choose_attn(spec) == "sdpa"
    assert any("undefined symbol" in p for p in flash2_problems("bf16"))


def test_explicit_flash2_that_does_not_import_is_refused_on_the_rank_with_the_import_error(broken_flash_attn,
                                                                                          cuda_h100):
    from launcher.model.load import choose_attn

    spec = validate({"model": {"attn": "flash2"}, "precision": "bf16", "cluster": {"gpus_per_node": 1}})
    with pytest.raises(UserError, match="undefined symbol: _ZN3c104cuda9SetDeviceEib"):
        choose_attn(spec)


def test_flash_attn_that_imports_still_needs_transformers_availability_check(tmp_path, monkeypatch, cuda_h100):
    # imports fine, but no flash-attn distribution (transformers' check looks at the package metadata)
    stub = tmp_path / "ok"
    (stub / "flash_attn").mkdir(parents=True)
    (stub / "flash_attn" / "__init__.py").write_text("__version__ = '2.8.3'\n")
    monkeypatch.syspath_prepend(str(stub))
    sys.modules.pop("flash_attn", None)
    from launcher.model import load

    monkeypatch.setattr(load, "_transformers_flash2_available", lambda: False)
    spec = validate({"model": {"attn": "auto"}, "precision": "bf16", "cluster": {"gpus_per_node": 1}})
    assert load.choose_attn(spec) == "sdpa"
    assert any("is_flash_attn_2_available" in p for p in load.flash2_problems("bf16"))
    monkeypatch.setattr(load, "_transformers_flash2_available", lambda: True)
    assert load.choose_attn(spec) == "flash_attention_2"


def test_explicit_flash2_that_does_not_import_is_exit_2_in_preflight(broken_flash_attn, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["slurm", "--out", out, "--dry-run", "--gpus-per-node", 8, "--precision", "bf16",
                                 "--attn", "flash2"], capsys)
    assert code == 2, err
    assert "model.attn=flash2" in err and "undefined symbol: _ZN3c104cuda9SetDeviceEib" in err and "--attn sdpa" in err
    assert "Traceback" not in err and not out.exists() and stdout == ""
    # auto is not refused: the ranks fall back to sdpa
    code, stdout, err = run_cli(["slurm", "--out", out, "--dry-run", "--gpus-per-node", 8, "--precision", "bf16"],
                                capsys)
    assert code == 0, err


# --------------------------------------------------------------------------- 2. version floors

def _pyproject_floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_-]+)>=([0-9.]+)"', deps)}


def _constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "tests" / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        out[name.strip().lower()] = version.strip()
    return out


def test_floors_are_pyprojects_and_the_versions_the_suite_runs_on():
    floors = _pyproject_floors()
    pins = _constraints()
    for name, (floor, why) in requirements.FLOORS.items():
        assert floors[name] == floor, f"pyproject.toml's {name} floor differs from launcher/requirements.py"
        assert pins[name] == floor, f"tests/constraints.txt proves {name}=={pins[name]}, the floor says {floor}"
        assert why
    # the known breakages lie below the floors
    assert requirements.below_floor("torch", "2.8.0+cu128") and "--signals-to-handle" in \
        requirements.below_floor("torch", "2.8.0+cu128")
    assert "PR 8148" in requirements.below_floor("deepspeed", "0.19.2")
    assert "transformers 5" in requirements.below_floor("transformers", "4.57.1")
    assert requirements.below_floor("torch", "2.13.0+cu130") is None
    assert requirements.below_floor("deepspeed", "0.20.0rc1") is None
    assert requirements.below_floor("torch", "2.13.0a0") is None  # a nightly of the floor's release
    assert requirements.below_floor("torch", None) is None  # not installed: said elsewhere


def test_preflight_refuses_old_packages_in_the_python_the_ranks_run(tmp_path, capsys, monkeypatch):
    from launcher.submit import preflight

    monkeypatch.setattr(requirements, "installed_versions",
                        lambda: {"torch": "2.4.1", "deepspeed": "0.19.2", "transformers": "5.23.0"})
    out = tmp_path / "run"
    code, stdout, err = run_cli(["slurm", "--out", out, "--dry-run"], capsys)
    assert code == 2 and "torch 2.4.1 is older than launcher's floor 2.13.0" in err, err
    assert "deepspeed 0.19.2" in err and "pip install 'deepspeed>=0.19.8'" in err and "transformers" not in err
    assert not out.exists() and "Traceback" not in err
    # set-up lines or a container bring another Python: pre-flight cannot see it and says where it is checked
    spec = validate({"cluster": {"setup": ["source /opt/env/bin/activate"]}, "output": {"dir": str(out)}})
    notes = preflight.check(spec, slurm=True)
    assert any("launcher doctor" in n for n in notes)


# --------------------------------------------------------------------------- 5. doctor on a GPU partition

def _probe_here(tmp_path):
    from launcher.ops import doctor

    return doctor.probe(tmp_path, "t", wait_s=0)


def test_doctor_flags_a_cpu_only_torch_on_a_gpu_partition(tmp_path):
    """This machine's own probe (torch is a CPU build here) against a partition with 2 GPUs per node."""
    from launcher.ops import doctor

    rec = _probe_here(tmp_path)
    import torch

    if torch.version.cuda:
        pytest.skip("this torch is a CUDA build; the fabricated cases below still run")
    r = doctor.analyze(doctor.Report("local", ["probe"], str(tmp_path), nodes=[rec], gpus_per_node=2))
    assert not r.ok and any("is a CPU-only build" in p and "2 GPU(s) per node" in p for p in r.problems), r.problems
    text = "\n".join(doctor.format_report(r))
    assert "no (CPU-only build)" in text and "bitsandbytes CUDA lib" in text and "DeepSpeed CPU Adam" in text
    # the same probe on a CPU partition is fine
    assert doctor.analyze(doctor.Report("local", ["probe"], str(tmp_path), nodes=[rec], gpus_per_node=0)).ok


def _node(**torch_info):
    t = {"version": "2.13.0+cu128", "cuda": "12.8", "nccl": "2.27.3", "cuda_available": True,
         "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "capability": "9.0"}] * 2}
    t.update(torch_info)
    return {"node": "gpu1", "index": 0, "python": "3.11.7", "torch": t, "shared": {"seen": {"0": "gpu1"}},
            "packages": {"torch": t["version"], "deepspeed": "0.19.8", "transformers": "5.23.0"},
            "flash_attn": "not installed", "bitsandbytes_cuda": "ok (CudaBNBNativeLibrary, CUDA)",
            "op_build": {"missing": [], "built": True, "dir": "/tmp/x", "locks": []}, "net": {}}


def test_doctor_flags_missing_gpus_old_packages_and_what_cannot_build():
    from launcher.ops import doctor

    def problems(rec, gpus=2):
        return doctor.analyze(doctor.Report("local", ["p"], "/o", nodes=[rec], gpus_per_node=gpus))

    assert problems(_node()).ok
    r = problems(_node(cuda_available=False, gpus=[], cuda_error="RuntimeError: no CUDA-capable device"))
    assert any("sees no usable GPU: RuntimeError: no CUDA-capable device" in p for p in r.problems)
    r = problems(_node(gpus=[{"name": "H100", "memory_gib": 79.1, "capability": "9.0"}]))
    assert any("torch sees 1 GPU(s), the partition has 2 per node" in p for p in r.problems)
    old = _node(version="2.8.0+cu128")
    old["packages"].update(torch="2.8.0+cu128", deepspeed="0.19.2")
    r = problems(old)
    assert any("gpu1: torch 2.8.0+cu128 is older than launcher's floor 2.13.0" in p for p in r.problems)
    assert any("deepspeed 0.19.2" in p and "PR 8148" in p for p in r.problems)
    stuck = _node()
    stuck["op_build"] = {"missing": ["the CUDA toolkit's nvcc (CUDA_HOME unset or without bin/nvcc; module load cuda)"],
                         "built": False, "dir": "/home/u/.cache/torch_extensions",
                         "locks": ["/home/u/.cache/torch_extensions/py311_cu128/cpu_adam/lock"]}
    r = problems(stuck)
    assert r.ok  # only runs with optimizer offload need the build: said, not failed
    assert any("cannot compile its CPU Adam" in n and "nvcc" in n for n in r.notes)
    assert any("cpu_adam/lock" in n and "until the watchdog fires" in n for n in r.notes)


def test_the_watchdog_names_the_extension_lock_a_rank_waits_on(tmp_path):
    import threading

    from torch.utils.file_baton import FileBaton

    from launcher.rank import watchdog

    lock = tmp_path / "py311_cu128" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    t = threading.Thread(target=FileBaton(str(lock), wait_seconds=0.01).wait, daemon=True)
    t.start()
    try:
        import time

        for _ in range(100):
            frame = sys._current_frames().get(t.ident)
            if watchdog.lock_file_waited_on(frame):
                break
            time.sleep(0.01)
        assert watchdog.lock_file_waited_on(frame) == str(lock)
        assert watchdog.lock_file_waited_on(sys._getframe()) is None
    finally:
        lock.unlink()
        t.join(5)


# --------------------------------------------------------------------------- 8. NCCL aborts and the two timeouts

def test_nccls_abort_lines_alone_say_collective_timeout():
    from launcher.ops import reasons

    log = ("[rank3]:[E1205 10:31:02.346100 77 torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:681] [Rank 3] To avoid "
           "data inconsistency, we are taking the entire process down.\n[rank3]:Fatal Python error: Aborted\n")
    assert reasons.classify("FAILED", 1, None, log)[0] == reasons.COLLECTIVE_TIMEOUT


def test_the_hang_watchdog_fires_before_the_collective_timeout_by_default(tmp_path):
    from launcher.submit import preflight

    c = validate({}).cluster
    assert c.hang_timeout_s + 60 < c.nccl.timeout_s  # + the grace a rank blocked in a collective gets
    same = validate({"cluster": {"hang_timeout_s": 1800}, "output": {"dir": str(tmp_path / "r")}})
    assert any("the collective timeout fires first" in n for n in preflight.check(same))
    assert not any("fires first" in n for n in preflight.check(validate({"output": {"dir": str(tmp_path / "s")}})))
