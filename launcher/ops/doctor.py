"""`launcher doctor`: the environment on each node, as a job sees it, before a real job finds out.

One task per node (`srun --nodes=N --ntasks-per-node=1`) runs the probe of this module,
`python -m launcher.ops.doctor probe OUT_DIR --id ID ...`, which prints one JSON record (in short numbered
lines, record_lines): hostname, Python and package versions, torch/CUDA/NCCL versions, whether flash_attn
imports and bitsandbytes' CUDA library loads with this torch, whether DeepSpeed can compile its CPU Adam
(optimizer offload), the GPUs, free disk under the output dir, whether that dir is shared (each node writes a
token file there and reads the others'), and the network interface that carries the route to the first node
(what NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME must name). The command gathers the lines, compares the nodes
and reports; a failed check (versions that differ or lie below launcher's floors, a CPU-only torch or fewer
GPUs than the partition has, a dir that is not shared, a node that did not answer, srun that failed, a kernel
library that does not load) makes it exit 1.

Stdlib only at import; the probe imports torch (and bitsandbytes, flash_attn on CUDA nodes) itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from launcher import __version__, assets, identity
from launcher import requirements
from launcher.requirements import first_line, flash_attn_import_error
from launcher.rundir import manifest as manifest_file

PREFIX = "LAUNCHER-DOCTOR "  # the probe's result lines; anything else a node prints is ignored
# srun forwards a task's output in messages of at most 1024 bytes: a longer line from one node can be cut
# and interleaved with another node's (seen on the lab cluster). The record goes out in numbered pieces,
# each line well under that.
PIECE = 800
PIECE_LINE = re.compile(r"(?P<key>\S+) (?P<i>\d+)/(?P<n>\d+) (?P<piece>.*)$")
PACKAGES = ("launcher", "torch", "deepspeed", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
            "huggingface_hub", "flash_attn")
TOKEN_DIR = ".launcher-doctor-{id}"
_PACKAGE_ROOT = assets.PACKAGE_PARENT


# =========================================================================== the probe (on each node)

def package_versions() -> dict[str, str | None]:
    out = manifest_file.package_versions(PACKAGES, missing=True)
    out["launcher"] = __version__  # the code the node runs, installed or not
    return out


def torch_info() -> dict[str, Any]:
    """torch, CUDA and NCCL versions, the GPUs (name, memory), or the error importing torch."""
    try:
        import torch
    except Exception as exc:  # a node without torch, or a broken one: reported, not raised
        return {"error": first_line(exc)}
    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda, "nccl": None,
                            "cuda_available": False, "gpus": []}
    try:
        if torch.version.cuda and hasattr(torch.cuda, "nccl"):
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:
        info["nccl"] = f"error: {first_line(exc)}"
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if info["cuda_available"] else 0):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}"})
    except Exception as exc:
        info["cuda_error"] = first_line(exc)
    return info


def flash_attn_status(installed: bool) -> str:
    """'ok <version>', 'not installed', or 'error: ...' (installed but does not import: an ABI mismatch
    with this torch, the usual way it breaks)."""
    if not installed:
        return "not installed"
    error = flash_attn_import_error()
    if error:
        return f"error: {error}"
    import flash_attn

    return f"ok {getattr(flash_attn, '__version__', '')}".strip()


def bitsandbytes_status(cuda: bool, installed: bool) -> str:
    """'no CUDA' on a node without a usable GPU; else whether bitsandbytes' CUDA library loads with this
    torch and runs a 4-bit quantization: 'ok (...)' or 'error: ...'."""
    if not cuda:
        return "no CUDA"
    if not installed:
        return "not installed"
    try:
        import torch
        from bitsandbytes import cextension, functional

        lib = cextension.lib
        mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", ())
        if mock and isinstance(lib, mock):
            return f"error: the CUDA library did not load: {str(getattr(lib, 'error_msg', '')).splitlines()[0][:300]}"
        x = torch.ones(64, 64, device="cuda", dtype=torch.float16)
        q, state = functional.quantize_4bit(x)
        functional.dequantize_4bit(q, state)
        torch.cuda.synchronize()
        return f"ok ({type(lib).__name__}, {cextension.BNB_BACKEND})"
    except Exception as exc:
        return f"error: {first_line(exc)}"


def op_build_status(cuda: bool) -> dict[str, Any]:
    """Whether DeepSpeed can compile its CPU Adam here, as optimizer offload does on first use (no build is
    run: it takes minutes): ninja, a C++ compiler and, with a CUDA torch, the toolkit's nvcc; whether it is
    already built in the extensions folder; and lock files left there, on which a rank building the op
    would wait until the watchdog fires."""
    info: dict[str, Any] = {"missing": [], "built": False, "locks": []}
    try:
        from torch.utils import cpp_extension

        root = Path(cpp_extension.get_default_build_root())
        cuda_home = cpp_extension.CUDA_HOME
    except Exception as exc:
        return {"error": first_line(exc)}
    info["dir"] = str(root)
    if not (shutil.which("ninja") or cpp_extension.is_ninja_available()):
        info["missing"].append("ninja (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if not shutil.which(cxx):
        info["missing"].append(f"a C++ compiler ({cxx}; install g++)")
    if cuda and not (cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file()):
        info["missing"].append("the CUDA toolkit's nvcc (CUDA_HOME unset or without bin/nvcc; module load cuda)")
    try:
        info["built"] = any(root.glob("*/cpu_adam/*.so"))
        info["locks"] = sorted(str(p) for p in root.glob("*/*/lock"))[:10]
    except OSError:
        pass
    return info


def op_build_summary(info: dict[str, Any]) -> str:
    """One cell of the report: built, can build, or what is missing."""
    if info.get("error"):
        return f"error: {info['error']}"
    if info.get("built"):
        return f"built ({info.get('dir')})"
    return "can build" if not info.get("missing") else "cannot build: no " + ", no ".join(info["missing"])


def first_node() -> str | None:
    """The first host of this step's (or job's) allocation, as the batch scripts take MASTER_ADDR."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return re.split(r"[,\[]", nodelist, maxsplit=1)[0]  # 'node1,node2' or 'node[1-2]' without scontrol


def _ipv4_addresses() -> dict[str, str]:
    """interface -> IPv4 address, for every interface that has one (SIOCGIFADDR, no `ip` binary needed)."""
    import fcntl
    import struct

    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                out[name] = socket.inet_ntoa(packed[20:24])
            except OSError:
                continue
    return out


def route_interface(target: str | None) -> dict[str, Any]:
    """The interface and local address this node uses to reach `target` (the first node; None: the default
    route). The source address of a UDP 'connection' (no packet is sent) is the one routing picks; the
    interface is the one that holds it. On the first node itself that is its own address's interface."""
    info: dict[str, Any] = {"target": target, "address": None, "local_address": None, "ifname": None}
    try:
        addr = socket.getaddrinfo(target, None, socket.AF_INET)[0][4][0] if target else "192.0.2.1"
        info["address"] = addr if target else None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            local = s.getsockname()[0]
        info["local_address"] = local
        info["ifname"] = next((n for n, a in _ipv4_addresses().items() if a == local), None)
        if info["ifname"] is None and local.startswith("127."):
            info["ifname"] = "lo"
    except OSError as exc:
        info["error"] = first_line(exc)
    return info


def shared_dir_check(out_dir: Path, run_id: str, index: int, expect: int, wait_s: float) -> dict[str, Any]:
    """Write OUT/.launcher-doctor-ID/node-INDEX.token (INDEX: the srun task, one per node), then read every other node's token (by name, which
    a network file system answers more promptly than a listing) until all are there or wait_s passes."""
    d = out_dir / TOKEN_DIR.format(id=run_id)
    info: dict[str, Any] = {"dir": str(d), "index": index, "expect": expect, "seen": {}}
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".node-{index}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"node": identity.current().node, "run": run_id}) + "\n")
        os.replace(tmp, d / f"node-{index}.token")
    except OSError as exc:
        info["error"] = f"cannot write in {out_dir}: {first_line(exc)}"
        return info
    deadline = time.monotonic() + wait_s
    while True:
        for i in range(expect):
            if str(i) in info["seen"]:
                continue
            try:
                rec = json.loads((d / f"node-{i}.token").read_text())
            except (OSError, ValueError):
                continue
            if rec.get("run") == run_id:
                info["seen"][str(i)] = rec.get("node")
        if len(info["seen"]) >= expect or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return info


def probe(out_dir: str | os.PathLike[str], run_id: str, expect: int = 1, wait_s: float = 60,
          index: int | None = None) -> dict[str, Any]:
    """Everything `launcher doctor` asks of one node, as a JSON-ready dict."""
    out = Path(out_dir).expanduser()
    idx = index if index is not None else int(os.environ.get("SLURM_PROCID") or os.environ.get("SLURM_NODEID") or 0)
    rec: dict[str, Any] = {"node": identity.current().node, "hostname": socket.gethostname(), "index": idx,
                           "python": platform.python_version(), "executable": sys.executable}
    # the shared-dir check first: the nodes reach it together, before the slow imports below
    rec["shared"] = shared_dir_check(out, run_id, idx, expect, wait_s)
    rec["packages"] = package_versions()
    rec["torch"] = torch_info()
    cuda = bool(rec["torch"].get("cuda_available"))
    rec["flash_attn"] = flash_attn_status(rec["packages"].get("flash_attn") is not None)
    rec["bitsandbytes_cuda"] = bitsandbytes_status(cuda, rec["packages"].get("bitsandbytes") is not None)
    rec["op_build"] = op_build_status(cuda)
    try:
        rec["disk_free_bytes"] = shutil.disk_usage(out).free
    except OSError as exc:
        rec["disk_free_bytes"], rec["disk_error"] = None, first_line(exc)
    rec["out_dir"] = str(out)
    rec["net"] = route_interface(first_node())
    return rec


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher.ops.doctor")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="probe this node and print its JSON record")
    p.add_argument("out", metavar="OUT_DIR", help="output dir whose free disk and sharing are checked")
    p.add_argument("--id", required=True, help="this doctor run's id (names the token folder)")
    p.add_argument("--expect", type=int, default=1, help="how many nodes take part")
    p.add_argument("--wait", type=float, default=60, help="seconds to wait for the other nodes' tokens")
    args = ap.parse_args(argv)
    rec = probe(args.out, args.id, args.expect, args.wait)
    sys.stdout.write("".join(record_lines(rec)))
    sys.stdout.flush()
    return 0


def record_lines(rec: dict[str, Any]) -> list[str]:
    """The probe's record as lines `PREFIX KEY I/N PIECE`: the JSON text (ASCII) in pieces of PIECE bytes, KEY
    naming this task (node index, host and pid), so that parse_lines joins each node's pieces whatever srun
    interleaved."""
    text = json.dumps(rec, default=str)  # ensure_ascii: one byte per character
    key = f"{rec.get('index', 0)}:{socket.gethostname()}:{os.getpid()}"
    pieces = [text[i:i + PIECE] for i in range(0, len(text), PIECE)] or [""]
    return [f"{PREFIX}{key} {n + 1}/{len(pieces)} {piece}\n" for n, piece in enumerate(pieces)]


# =========================================================================== the command (on the submit host)

@dataclass
class Target:
    """Where the probe runs: the partition, account and QoS (from --partition or the cluster profile),
    nodes, GPUs per node to request (so that the job sees them) and the expected NIC (profile)."""

    nodes: int = 2
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    net_ifname: str | None = None
    time_min: int = 10
    container: Any = None  # the profile's ContainerSpec: the probe runs inside it, as the ranks do


# The interpreter inside a container: whatever its PATH puts first (as the batch scripts take it).
CONTAINER_PYTHON = "python3"


def srun_command(t: Target, out_dir: Path, run_id: str, python: str = sys.executable,
                 wait_s: float = 60) -> list[str]:
    """The srun line: one probe task on each of N nodes. Pure."""
    argv = ["srun", f"--nodes={t.nodes}", "--ntasks-per-node=1", f"--ntasks={t.nodes}", f"--time={t.time_min}",
            "--job-name=launcher-doctor", "--kill-on-bad-exit=0"]
    if t.partition:
        argv.append(f"--partition={t.partition}")
    if t.account:
        argv.append(f"--account={t.account}")
    if t.qos:
        argv.append(f"--qos={t.qos}")
    if t.gpus_per_node:
        argv.append(f"--gpus-per-node={t.gpus_per_node}")
    ct = t.container
    if ct is not None:
        # inside the ranks' container: the output dir and this launcher's source mounted at their own paths
        mounts = ",".join([f"{out_dir}:{out_dir}", f"{_PACKAGE_ROOT}:{_PACKAGE_ROOT}", *ct.mounts])
        python = CONTAINER_PYTHON
        if ct.runtime == "pyxis":
            argv += [f"--container-image={ct.image}", f"--container-mounts={mounts}"]
        else:
            argv += ["apptainer", "exec", *(["--nv"] if t.gpus_per_node else []), "--bind", mounts, ct.image]
    return argv + [python, "-m", "launcher.ops.doctor", "probe", str(out_dir), "--id", run_id,
                   "--expect", str(t.nodes), "--wait", str(wait_s)]


def parse_lines(text: str) -> list[dict[str, Any]]:
    """The probe's records in `text` (srun's merged output, record_lines' pieces in any order among other
    lines), one dict per node that sent every piece, by node index."""
    pieces: dict[str, dict[int, str]] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        i = line.find(PREFIX)
        m = PIECE_LINE.match(line[i + len(PREFIX):]) if i >= 0 else None
        if m:
            pieces.setdefault(m["key"], {})[int(m["i"])] = m["piece"]
            counts[m["key"]] = int(m["n"])
    out = []
    for key, got in pieces.items():
        if sorted(got) != list(range(1, counts[key] + 1)):
            continue  # a node cut off mid-record: it did not answer
        try:
            rec = json.loads("".join(got[n] for n in sorted(got)))
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return sorted(out, key=lambda r: (int(r.get("index", 0) or 0), str(r.get("node"))))


@dataclass
class Report:
    mode: str  # "srun" | "local"
    command: list[str]
    out_dir: str
    nodes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    expected: int = 1
    partition: str | None = None
    gpus_per_node: int = 0  # what the partition has (--gpus-per-node or the profile): torch must see them

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "mode": self.mode, "partition": self.partition, "gpus_per_node": self.gpus_per_node,
                "command": self.command,
                "out_dir": self.out_dir, "expected_nodes": self.expected, "nodes": self.nodes,
                "problems": self.problems, "notes": self.notes, "net_ifname": _common_ifname(self.nodes),
                "shared": _shared(self.nodes, self.expected) if self.mode == "srun" else None}


def _versions(rec: dict[str, Any]) -> dict[str, Any]:
    t = rec.get("torch") or {}
    v = {"python": rec.get("python"), **(rec.get("packages") or {})}
    v.update({"torch CUDA": t.get("cuda"), "NCCL": t.get("nccl")})
    return v


def _common_ifname(nodes: list[dict[str, Any]]) -> str | None:
    names = {(n.get("net") or {}).get("ifname") for n in nodes}
    return names.pop() if len(names) == 1 else None


def _shared(nodes: list[dict[str, Any]], expected: int) -> bool:
    return bool(nodes) and all(_seen(n) >= expected for n in nodes)


def analyze(report: Report, profile_ifname: str | None = None) -> Report:
    """Fill report.problems and report.notes from the nodes' records."""
    nodes = report.nodes
    if report.mode == "srun" and len(nodes) < report.expected:
        report.problems.append(f"{report.expected - len(nodes)} of {report.expected} node(s) did not answer")
    # versions: every node alike
    if len(nodes) > 1:
        keys = list(_versions(nodes[0]))
        for k in keys:
            seen = {str(_versions(n).get(k)) for n in nodes}
            if len(seen) > 1:
                where = ", ".join(f"{n.get('node')}: {_versions(n).get(k)}" for n in nodes)
                report.problems.append(f"{k} differs between nodes ({where})")
    for n in nodes:
        who = n.get("node")
        t = n.get("torch") or {}
        if t.get("error"):
            report.problems.append(f"{who}: torch does not import: {t['error']}")
        report.problems += [f"{who}: {line}" for line in requirements.version_problems(n.get("packages") or {})]
        report.problems += _gpu_problems(who, t, report.gpus_per_node)
        build = n.get("op_build") or {}
        if build.get("missing"):
            report.notes.append(f"{who}: DeepSpeed cannot compile its CPU Adam here ({op_build_summary(build)}): a run "
                                f"with optimizer offload would fail at its first step; install what is missing, or "
                                f"build it once in a prep job")
        if build.get("locks"):
            report.notes.append(f"{who}: lock files left in the torch extensions folder ({', '.join(build['locks'])}): "
                                f"a rank building an op there waits on them until the watchdog fires; delete them if no "
                                f"build is running")
        if str(n.get("flash_attn", "")).startswith("error"):
            report.problems.append(f"{who}: flash_attn is installed but does not import: {n['flash_attn'][7:]}")
        if str(n.get("bitsandbytes_cuda", "")).startswith("error"):
            report.problems.append(f"{who}: bitsandbytes' CUDA library does not work with this torch: "
                                   f"{n['bitsandbytes_cuda'][7:]}")
        sh = n.get("shared") or {}
        if sh.get("error"):
            report.problems.append(f"{who}: {sh['error']}")
        net = n.get("net") or {}
        if net.get("error"):
            report.notes.append(f"{who}: no route to {net.get('target') or 'a default gateway'}: {net['error']}")
        elif report.mode == "srun" and (net.get("ifname") == "lo" or str(net.get("address", "")).startswith("127.")):
            report.problems.append(f"{who}: the first node's name {net.get('target')!r} resolves to "
                                   f"{net.get('address')} here (loopback): a rendezvous at MASTER_ADDR would "
                                   f"connect to itself; fix its entry in /etc/hosts or DNS")
        if n.get("disk_error"):
            report.problems.append(f"{who}: cannot read free disk of {n.get('out_dir')}: {n['disk_error']}")
    if report.mode == "srun" and nodes and not _shared(nodes, report.expected):
        missing = "; ".join(f"{n.get('node')} sees {_seen(n)} of {report.expected}" for n in nodes)
        report.problems.append(f"the output dir {report.out_dir} is not shared between the nodes ({missing}): "
                               f"run dirs, checkpoints and markers must be on a shared file system")
    names = {(n.get("net") or {}).get("ifname") for n in nodes} - {None}
    if len(names) > 1:
        report.notes.append(f"the nodes reach the first node over different interfaces ({', '.join(sorted(names))}); "
                            f"NCCL_SOCKET_IFNAME takes a comma list: --net-ifname {','.join(sorted(names))}")
    common = _common_ifname(nodes)
    if common and profile_ifname and profile_ifname != common:
        report.notes.append(f"the cluster profile's net_ifname is {profile_ifname}, but the route to the first node "
                            f"goes over {common}")
    return report


def _gpu_problems(who: Any, t: dict[str, Any], gpus_per_node: int) -> list[str]:
    """A GPU partition's node whose torch cannot use its GPUs: a CPU-only build, no device, or fewer than
    the partition has."""
    if gpus_per_node <= 0 or t.get("error"):
        return []
    if not t.get("cuda"):
        return [f"{who}: torch {t.get('version')} is a CPU-only build (torch.version.cuda is None) on a partition with "
                f"{gpus_per_node} GPU(s) per node: install a CUDA build of torch (pip install torch --index-url "
                f"https://download.pytorch.org/whl/cuXXX, for the node's driver)"]
    if not t.get("cuda_available"):
        why = f": {t['cuda_error']}" if t.get("cuda_error") else ""
        return [f"{who}: torch {t.get('version')} (CUDA {t.get('cuda')}) sees no usable GPU{why}; the partition has "
                f"{gpus_per_node} per node: check the driver (nvidia-smi) and that the job asked for GPUs"]
    seen = len(t.get("gpus") or [])
    if seen < gpus_per_node:
        return [f"{who}: torch sees {seen} GPU(s), the partition has {gpus_per_node} per node (--gpus-per-node "
                f"{gpus_per_node}): the job was given fewer (CUDA_VISIBLE_DEVICES, gres) or a GPU is down"]
    return []


def collect(target: Target, out_dir: str | os.PathLike[str], *, timeout_s: float = 300,
            srun: str | None = None) -> Report:
    """Run the probe on `target.nodes` nodes through srun (or here once when srun is not on the PATH),
    gather and analyze. Removes its token folder afterwards."""
    out = Path(out_dir).expanduser().resolve()
    run_id = uuid.uuid4().hex[:12]
    env = dict(os.environ)
    # the nodes run this very package, installed or not (as `launcher run` does for its ranks)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if x)
    srun = srun if srun is not None else shutil.which("srun")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from launcher.errors import UserError

        raise UserError(f"--out {out}: cannot create it ({exc}); give a folder on the file system the runs use")
    if srun is None:
        argv = [sys.executable, "-m", "launcher.ops.doctor", "probe", str(out), "--id", run_id,
                "--expect", "1", "--wait", "0"]
        report = Report("local", argv, str(out), expected=1, gpus_per_node=target.gpus_per_node)
        report.notes.append("srun is not on the PATH: probed this machine once (no Slurm, so no node comparison "
                            "and no shared-dir check)")
    else:
        argv = srun_command(target, out, run_id)
        argv[0] = srun
        report = Report("srun", argv, str(out), expected=target.nodes, partition=target.partition,
                        gpus_per_node=target.gpus_per_node)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
        report.nodes = parse_lines(proc.stdout)
        if proc.returncode != 0:
            tail = " | ".join(ln for ln in proc.stderr.strip().splitlines()[-5:] if ln.strip())
            report.problems.append(f"{'srun' if report.mode == 'srun' else 'the probe'} exited {proc.returncode}: "
                                   f"{tail or '(no message)'}")
    except subprocess.TimeoutExpired:
        report.problems.append(f"{'srun' if report.mode == 'srun' else 'the probe'} did not finish within "
                               f"{timeout_s:.0f} s (still queued? see `squeue`; raise --timeout)")
    finally:
        shutil.rmtree(out / TOKEN_DIR.format(id=run_id), ignore_errors=True)
    return analyze(report, target.net_ifname)


def _gib(n: Any) -> str:
    return "-" if not isinstance(n, (int, float)) else f"{n / 2**30:,.1f} GiB"


def _seen(rec: dict[str, Any]) -> int:
    return len((rec.get("shared") or {}).get("seen") or {})


def _gpus(rec: dict[str, Any]) -> str:
    gpus = (rec.get("torch") or {}).get("gpus") or []
    return ", ".join(f"{g['name']} {g['memory_gib']} GiB" for g in gpus) or "none"


def _cuda_cell(rec: dict[str, Any]) -> str:
    t = rec.get("torch") or {}
    if not t.get("cuda"):
        return "no (CPU-only build)"
    return f"{t['cuda']}, {len(t.get('gpus') or [])} GPU(s) usable" if t.get("cuda_available") else f"{t['cuda']}, no GPU"


def _rows(report: Report) -> list[tuple[str, list[str]]]:
    nodes, n_exp = report.nodes, report.expected
    rows: list[tuple[str, list[str]]] = [("hostname", [str(n.get("hostname")) for n in nodes])]
    for k in _versions(nodes[0]) if nodes else []:
        rows.append((k, [str(_versions(n).get(k) or "-") for n in nodes]))
    rows.append(("GPUs", [_gpus(n) for n in nodes]))
    rows.append(("CUDA in torch", [_cuda_cell(n) for n in nodes]))
    rows.append(("flash_attn imports", [str(n.get("flash_attn")) for n in nodes]))
    rows.append(("DeepSpeed CPU Adam", [op_build_summary(n.get("op_build") or {}) for n in nodes]))
    rows.append(("bitsandbytes CUDA lib", [str(n.get("bitsandbytes_cuda")) for n in nodes]))
    rows.append(("free disk", [_gib(n.get("disk_free_bytes")) for n in nodes]))
    if report.mode == "srun":
        rows.append(("shared out dir", [f"{'yes' if _seen(n) >= n_exp else 'NO'} (sees {_seen(n)}/{n_exp})"
                                        for n in nodes]))
    rows.append(("NCCL/gloo interface", [f"{(n.get('net') or {}).get('ifname') or '?'} "
                                         f"({(n.get('net') or {}).get('local_address') or '-'})" for n in nodes]))
    return rows


def format_report(report: Report) -> list[str]:
    """The table `launcher doctor` prints: one column per node, rows that differ marked '*'."""
    where = (f"{report.expected} node(s)" + (f" of partition {report.partition}" if report.partition else "")
             + " through srun") if report.mode == "srun" else "this machine (no srun)"
    lines = [f"launcher doctor: {where}; output dir {report.out_dir}"]
    if report.nodes:
        rows = [("", [str(n.get("node")) for n in report.nodes])] + _rows(report)
        w0 = max(len(r[0]) for r in rows) + 2
        widths = [max(len(r[1][i]) for r in rows) for i in range(len(report.nodes))]
        for label, vals in rows:
            mark = "*" if label and len(set(vals)) > 1 and label not in ("hostname", "free disk", "NCCL/gloo interface",
                                                                       "shared out dir") else " "
            lines.append(f"{mark} {label.ljust(w0)}" + "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip())
    for note in report.notes:
        lines.append(f"note: {note}")
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines += [f"  - {p}" for p in report.problems]
    else:
        ifname = _common_ifname(report.nodes)
        tail = f"; network interface {ifname} (--net-ifname {ifname})" if ifname and ifname != "lo" else ""
        shared = ", the output dir is shared" if report.mode == "srun" else ""
        lines.append(f"ok: versions agree{shared}{tail}" if report.mode == "srun" else f"ok{tail}")
    return lines


if __name__ == "__main__":
    sys.exit(_main())
