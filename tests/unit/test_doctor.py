"""`launcher doctor` without a cluster: the srun line, the probe on this machine, and the checks that make
it exit 1 (versions that differ, a dir that is not shared, a node that did not answer, srun that failed),
from fabricated node records. The cluster test (tests/cluster/test_watchdog_doctor.py) runs it for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from launcher.ops import doctor

ROOT = Path(__file__).resolve().parents[2]


def node(name: str, index: int, torch: str = "2.13.0", seen: int = 2, ifname: str = "eth0") -> dict:
    return {"node": name, "hostname": "vm", "index": index, "python": "3.11.7",
            "packages": {"launcher": "0.1.0", "torch": torch, "deepspeed": "0.19.8", "flash_attn": None},
            "torch": {"version": torch, "cuda": "12.8", "nccl": "2.27.3", "cuda_available": True,
                      "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "capability": "9.0"}]},
            "flash_attn": "not installed", "bitsandbytes_cuda": "ok (CudaBNBNativeLibrary, CUDA)",
            "disk_free_bytes": 5 * 2**40, "out_dir": "/shared/runs",
            "shared": {"seen": {str(i): f"n{i}" for i in range(seen)}},
            "net": {"target": "n0", "address": "10.0.0.10", "local_address": f"10.0.0.{10 + index}", "ifname": ifname}}


def report(*nodes: dict, expected: int = 2) -> doctor.Report:
    r = doctor.Report("srun", ["srun"], "/shared/runs", nodes=list(nodes), expected=expected, partition="gpu")
    return doctor.analyze(r)


def test_srun_line_runs_one_probe_per_node_with_the_profile_settings():
    t = doctor.Target(nodes=4, partition="gpu", account="ml", qos="high", gpus_per_node=8)
    argv = doctor.srun_command(t, Path("/shared/runs"), "abc", python="/venv/bin/python")
    assert argv[:7] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--ntasks=4", "--time=10",
                        "--job-name=launcher-doctor", "--kill-on-bad-exit=0"]
    assert {"--partition=gpu", "--account=ml", "--qos=high", "--gpus-per-node=8"} <= set(argv)
    # the rank entry points' one style: MODULE VERB PATH [options] (launcher train SPEC, bench.probe rank SPEC)
    assert argv[-11:] == ["/venv/bin/python", "-m", "launcher.ops.doctor", "probe", "/shared/runs",
                          "--id", "abc", "--expect", "4", "--wait", "60"]


def test_the_probe_runs_inside_the_profiles_container_where_the_ranks_run():
    from launcher.config.spec import ContainerSpec

    pyxis = ContainerSpec(runtime="pyxis", image="nvcr.io#nvidia/pytorch:25.01-py3", mounts=["/data:/data"])
    t = doctor.Target(nodes=2, partition="gpu", gpus_per_node=8, container=pyxis)
    argv = doctor.srun_command(t, Path("/shared/runs"), "abc", python="/venv/bin/python")
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in argv
    [mounts] = [a.split("=", 1)[1] for a in argv if a.startswith("--container-mounts=")]
    assert mounts.split(",")[0] == "/shared/runs:/shared/runs" and mounts.endswith(",/data:/data")
    assert argv[argv.index("-m") - 1] == "python3"  # the container's interpreter, not this host's
    apptainer = ContainerSpec(runtime="apptainer", image="/images/train.sif")
    argv = doctor.srun_command(doctor.Target(nodes=1, gpus_per_node=8, container=apptainer), Path("/o"), "abc")
    i = argv.index("apptainer")
    assert argv[i:i + 3] == ["apptainer", "exec", "--nv"] and argv[i + 5:i + 7] == ["/images/train.sif", "python3"]


def test_healthy_nodes_pass_and_the_table_names_the_interface():
    r = report(node("n0", 0), node("n1", 1))
    assert r.ok, r.problems
    d = r.to_dict()
    assert d["shared"] is True and d["net_ifname"] == "eth0"
    text = "\n".join(doctor.format_report(r))
    assert "NVIDIA H100 80GB HBM3 79.1 GiB" in text and "yes (sees 2/2)" in text
    assert text.splitlines()[-1] == ("ok: versions agree, the output dir is shared; network interface eth0 "
                                     "(--net-ifname eth0)")


def test_each_failed_check_is_a_problem():
    r = report(node("n0", 0), node("n1", 1, torch="2.12.0"))
    assert any(p.startswith("torch differs between nodes (n0: 2.13.0, n1: 2.12.0)") for p in r.problems), r.problems
    assert "* torch" in "\n".join(doctor.format_report(r))  # the differing row is marked

    r = report(node("n0", 0, seen=1), node("n1", 1, seen=1))
    assert any("is not shared between the nodes" in p for p in r.problems) and r.to_dict()["shared"] is False

    r = report(node("n0", 0), expected=2)
    assert "1 of 2 node(s) did not answer" in r.problems

    broken = node("n1", 1)
    broken["bitsandbytes_cuda"] = "error: the CUDA library did not load: libcudart.so.13: cannot open"
    broken["flash_attn"] = "error: ImportError: undefined symbol: _ZN3c10"
    r = report(node("n0", 0), broken)
    assert any("bitsandbytes' CUDA library does not work" in p for p in r.problems)
    assert any("flash_attn is installed but does not import" in p for p in r.problems)

    loop = node("n1", 1, ifname="lo")
    loop["net"]["address"] = "127.0.0.1"
    r = report(node("n0", 0), loop)
    assert any("resolves to 127.0.0.1 here (loopback)" in p for p in r.problems)


def test_different_interfaces_are_a_note_with_the_comma_list():
    r = report(node("n0", 0), node("n1", 1, ifname="ens5"))
    assert r.ok and any("--net-ifname ens5,eth0" in n for n in r.notes)


def test_probe_lines_are_found_among_other_output():
    a, b = node("n0", 0), node("n1", 1)
    text = f"warning: kernels missing\n1: {''.join(doctor.record_lines(b))}0: {''.join(doctor.record_lines(a))}noise"
    assert [r["node"] for r in doctor.parse_lines(text)] == ["n0", "n1"]


def test_long_records_cut_into_pieces_come_back_whole_whatever_the_interleaving():
    """srun forwards output in messages of at most 1024 bytes, so a longer line from one node can be cut and
    interleaved with another's (seen on the lab cluster: "2 of 2 node(s) did not answer"). Each record goes out
    in short numbered lines; pieces in any order, among other nodes' pieces and noise, join up again; a node
    whose pieces did not all arrive did not answer."""
    a, b = node("n0", 0), node("n1", 1)
    for rec in (a, b):
        rec["notes"] = "x" * 3000  # several pieces each
    la, lb = doctor.record_lines(a), doctor.record_lines(b)
    assert len(la) >= 4 and all(len(x.encode()) < 1024 for x in la + lb)
    mixed = [x for pair in zip(reversed(lb), la) for x in pair] + la[len(lb):] + ["srun: warning\n"]
    assert doctor.parse_lines("".join(mixed)) == [a, b]
    assert doctor.parse_lines("".join(la[:-1] + lb)) == [b]  # n0's last piece never came


def test_probe_on_this_machine_and_the_token_it_leaves(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher.ops.doctor", "probe", str(tmp_path), "--id", "t1",
                           "--wait", "0"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    [rec] = doctor.parse_lines(proc.stdout)
    assert rec["python"] == ".".join(map(str, sys.version_info[:3]))
    assert rec["packages"]["launcher"] and rec["packages"]["torch"] and rec["torch"]["version"]
    assert rec["shared"]["seen"] == {"0": rec["node"]} and (tmp_path / ".launcher-doctor-t1" / "node-0.token").is_file()
    assert rec["disk_free_bytes"] > 0
    import torch

    if not torch.cuda.is_available():
        assert rec["bitsandbytes_cuda"] == "no CUDA" and rec["torch"]["gpus"] == []


def test_doctor_without_srun_probes_here_once_and_says_so(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-m", "launcher", "doctor", "--out", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["mode"] == "local" and len(rep["nodes"]) == 1 and rep["ok"]
    assert any("srun is not on the PATH: probed this machine once" in n for n in rep["notes"])
    assert not list(tmp_path.glob(".launcher-doctor-*"))


def test_a_failing_srun_exits_1_with_its_message(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\necho 'srun: error: Invalid partition name specified' >&2\nexit 1\n")
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "launcher", "doctor", "--partition", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "srun exited 1: srun: error: Invalid partition name specified" in proc.stdout
    assert "2 of 2 node(s) did not answer" in proc.stdout
