"""Smoke tests of the lab Slurm cluster itself: two nodes in separate network namespaces, GPU
scheduling and accounting, and a real two-node torch.distributed (gloo) job."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<{path} missing>"


def test_sinfo_shows_both_nodes_idle(slurm_lab):
    slurm_lab.wait_nodes_idle(timeout=120)  # a concurrent session on this machine may be using them
    out = slurm_lab.cmd("sinfo", "-h", "-N", "-o", "%N %P %t %G").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert set(rows) == {"node1", "node2"}, out
    for node, (_, partition, state, gres) in rows.items():
        assert partition == "debug*", out  # the default partition
        assert state == "idle", out
        assert gres == "gpu:h100:2", out


def test_ensure_again_reuses_the_running_cluster(slurm_lab):
    before = slurm_lab._load_state()["pids"]
    code = "import slurmlab; lab = slurmlab.SlurmLab.ensure(); print(lab.reused, round(lab.start_seconds, 2))"
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(HERE)})
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split()[0] == "True", cp.stdout
    assert slurm_lab._load_state()["pids"] == before
    kinds = sorted(k for k in slurm_lab._our_processes().values() if k != "node")
    assert kinds == ["mariadb", "munged", "slurmctld", "slurmdbd"], kinds


def test_two_node_job_runs_in_separate_network_namespaces(slurm_lab, tmp_path):
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --time=5
        #SBATCH --output={tmp_path}/job-%j.out
        scontrol show hostnames "$SLURM_JOB_NODELIST" > {tmp_path}/hosts
        srun bash -c 'echo "$SLURMD_NODENAME $(ip -4 -o addr show eth0 | awk "{{print \\$4}}")"' \\
            > {tmp_path}/addrs
        """)
    job = slurm_lab.sbatch(script)
    state = slurm_lab.wait_job(job, timeout=120)
    log = _read(tmp_path / f"job-{job}.out")
    assert state == "COMPLETED", log
    assert _read(tmp_path / "hosts").split() == ["node1", "node2"]
    addrs = dict(line.split() for line in _read(tmp_path / "addrs").splitlines() if line.strip())
    assert addrs == {"node1": "10.77.0.11/24", "node2": "10.77.0.12/24"}, (addrs, log)


def test_gpu_job_is_scheduled_and_accounted(slurm_lab, tmp_path):
    out = tmp_path / "gpus.out"
    job = slurm_lab.sbatch(
        "#!/bin/bash\n"
        'srun bash -c \'echo "$SLURMD_NODENAME cvd=$CUDA_VISIBLE_DEVICES on_node=$SLURM_GPUS_ON_NODE"\'\n',
        "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2", f"--output={out}",
    )
    assert slurm_lab.wait_job(job, timeout=120) == "COMPLETED", _read(out)
    lines = sorted(line for line in _read(out).splitlines() if line.strip())
    assert lines == ["node1 cvd=0,1 on_node=2", "node2 cvd=0,1 on_node=2"], lines
    rows = slurm_lab.sacct(job, ["JobID", "State", "AllocTRES", "Elapsed"])
    assert len(rows) == 1, rows
    assert rows[0]["State"] == "COMPLETED"
    assert "gres/gpu=4" in rows[0]["AllocTRES"].split(","), rows
    # The same through the sacct command line.
    cp = slurm_lab.cmd("sacct", "-X", "-n", "-P", "-j", str(job), "-o", "AllocTRES")
    assert "gres/gpu=4" in cp.stdout


def test_sbatch_test_only(slurm_lab):
    cp = slurm_lab.cmd("sbatch", "--test-only", "--nodes=2", "--gpus-per-node=2", "--wrap", "true")
    assert "to start at" in cp.stderr and "node[1-2]" in cp.stderr, cp.stderr
    # A request the cluster cannot satisfy is refused.
    cp = slurm_lab.cmd("sbatch", "--test-only", "--nodes=2", "--gpus-per-node=3", "--wrap", "true", check=False)
    assert cp.returncode != 0, cp.stderr


def test_scontrol_and_sacct_helpers(slurm_lab, tmp_path):
    job = slurm_lab.sbatch("#!/bin/bash\nexit 7\n", f"--output={tmp_path}/fail-%j.out", "--job-name=lab-fail")
    assert slurm_lab.wait_job(job, timeout=60) == "FAILED"
    info = slurm_lab.scontrol_show_job(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "7:0" and info["JobName"] == "lab-fail", info
    assert info["Restarts"] == "0"
    rows = slurm_lab.sacct(job, "JobName,State,ExitCode", all_attempts=True)
    assert rows == [{"JobName": "lab-fail", "State": "FAILED", "ExitCode": "7:0"}]
    assert slurm_lab.scontrol_show_job(999999) == {}


def test_two_node_torch_gloo_all_reduce(slurm_lab, tmp_path):
    prog = tmp_path / "allreduce.py"
    prog.write_text(textwrap.dedent("""\
        import datetime, os
        import torch
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        print(f"rank={rank} node={os.environ['SLURMD_NODENAME']} sum={t.item():g}", flush=True)
        dist.destroy_process_group()
        """))
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --time=10
        #SBATCH --output={tmp_path}/gloo-%j.out
        set -euo pipefail
        export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
        export GLOO_SOCKET_IFNAME=eth0
        srun --ntasks-per-node=1 bash -c \\
            'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID exec {sys.executable} {prog}'
        """)
    job = slurm_lab.sbatch(script)
    state = slurm_lab.wait_job(job, timeout=300)
    log = _read(tmp_path / f"gloo-{job}.out")
    assert state == "COMPLETED", log
    lines = sorted(line for line in log.splitlines() if line.startswith("rank="))
    assert lines == ["rank=0 node=node1 sum=3", "rank=1 node=node2 sum=3"], log
