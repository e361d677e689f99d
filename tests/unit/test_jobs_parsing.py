"""launcher/jobs on recorded output of Slurm 22.05's tools (the lab cluster's, copied verbatim) and
recorded job logs: parsers, the reason classifier, status from each source, cost arithmetic,
cluster check differences, log attribution and following. No Slurm needed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from launcher.config.profiles import Partition, Profile
from launcher.errors import UserError
from launcher.ops import cluster_check
from launcher.ops import cost
from launcher.ops import logs
from launcher.ops import reasons
from launcher.ops import slurmtools as st
from launcher.ops import status
from launcher.ops.sources import Sources
from launcher.rundir import markers, metrics
from launcher.rundir.jobs import record_job
from launcher.rundir.layout import RunDir

# --------------------------------------------------------------------------- recorded tool output

# sacct -n -P -D -X -j 36,39,40,42 --format=<st.SACCT_FIELDS>: a requeued GPU job, a cancelled, a
# timed-out and a completed CPU job. Attempts of one job are not adjacent.
SACCT = """\
36|36|REQUEUED|0:0|0:0|00:00:07|7|billing=2,cpu=2,gres/gpu=4,node=2|2|2|node[1-2]|debug|2026-11-24T04:47:09|2026-11-24T04:47:16|2026-11-24T04:47:07|00:10:00|/work/main|gpu2x2
39|39|CANCELLED by 0|0:0|0:0|00:01:26|86|billing=1,cpu=1,node=1|1|1|node2|debug|2026-11-24T04:47:16|2026-11-24T04:48:42|2026-11-24T04:47:08|UNLIMITED|/tmp/x/cancelled|cancelled
40|40|TIMEOUT|0:0|0:0|00:01:10|70|billing=1,cpu=1,node=1|1|1|node2|debug|2026-11-24T04:47:16|2026-11-24T04:48:26|2026-11-24T04:47:09|00:01:00|/tmp/x/timeout|timeout
42|42|COMPLETED|0:0|0:0|00:00:43|43|billing=1,cpu=1,node=1|1|1|node1|debug|2026-11-24T04:48:39|2026-11-24T04:49:22|2026-11-24T04:47:15|00:10:00|/work/main|tiny|with|bars
36|36|COMPLETED|0:0|0:15|00:00:12|12|billing=2,cpu=2,gres/gpu=4,node=2|2|2|node[1-2]|debug|2026-11-24T04:48:26|2026-11-24T04:48:38|2026-11-24T04:47:25|00:10:00|/work/main|gpu2x2
"""

# scontrol show job -o 2 (a failed job the controller still remembers)
SCONTROL_FAILED = (
    "JobId=2 JobName=f.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901758 Nice=0 Account=root "
    "QOS=normal JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=1:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-11-24T04:38:52 "
    "EligibleTime=2026-11-24T04:38:52 AccrueTime=2026-11-24T04:38:52 StartTime=2026-11-24T04:38:53 "
    "EndTime=2026-11-24T04:38:53 Deadline=N/A SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-11-24T04:38:53 "
    "Scheduler=Main Partition=debug AllocNode:Sid=localhost:18092 ReqNodeList=(null) ExcNodeList=(null) "
    "NodeList=node1 BatchHost=node1 NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* "
    "TRES=cpu=1,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 "
    "MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) "
    "Network=(null) Command=/tmp/my jobs/f.sh WorkDir=/tmp/my jobs StdErr=/tmp/my jobs/f.sh-2.out StdIn=/dev/null "
    "StdOut=/tmp/my jobs/f.sh-2.out Power=")
# scontrol show job -o 3 (running, 2 nodes with 2 GPUs each)
SCONTROL_RUNNING = (
    "JobId=3 JobName=g.sh UserId=root(0) GroupId=root(0) JobState=RUNNING Reason=None Dependency=(null) Requeue=1 "
    "Restarts=1 BatchFlag=1 ExitCode=0:0 RunTime=00:00:03 TimeLimit=UNLIMITED Partition=debug NodeList=node[1-2] "
    "BatchHost=node1 NumNodes=2 NumCPUs=2 NumTasks=2 CPUs/Task=1 TRES=cpu=2,node=2,billing=2,gres/gpu=4 "
    "StdOut=/tmp/x/g.sh-3.out TresPerNode=gres:gpu:2")
# squeue -h -j 1,3 -o st.SQUEUE_FORMAT
SQUEUE = "1|1|N/A|RUNNING|0:15|1:00|1|node1|None|N/A|t.sh\n3|3|N/A|PENDING|0:00|UNLIMITED|2||Resources|gres:gpu:2|g|h\n"

PARTITION = (
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED "
    "MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=node[1-2] PriorityJobFactor=1 PriorityTier=1 RootOnly=NO "
    "ReqResv=NO OverSubscribe=YES:4 OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=4 TotalNodes=2 "
    "SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
    "TRES=cpu=4,mem=8000M,node=2,billing=4,gres/gpu=4")
NODE = (
    "NodeName={n} Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=2.26 AvailableFeatures=(null) "
    "ActiveFeatures=(null) Gres=gpu:h100:2 NodeAddr=10.77.0.11 NodeHostName={n} Version=22.05.8 OS=Linux 6.18.44 #1 "
    "SMP PREEMPT_DYNAMIC @0  RealMemory=4000 AllocMem=0 FreeMem=17752 Sockets=2 Boards=1 State=IDLE ThreadsPerCore=1 "
    "TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=debug  BootTime=2026-11-24T03:53:10 "
    "CfgTRES=cpu=2,mem=4000M,billing=2,gres/gpu=2 AllocTRES= CapWatts=n/a")

# --------------------------------------------------------------------------- recorded logs

TRACEBACK_UNDER_TORCHRUN = """\
launcher: job 51 on node[1-2], rendezvous node1:15051, spec /runs/a/spec.yaml
Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you already `pip install kernels`
step 1/10 loss 9.1234 lr 1.000e-04 tokens/s 1,000
[rank1]: Traceback (most recent call last):
[rank1]:   File "/x/launcher/train/data.py", line 88, in load_prepared
[rank1]:     raise ValueError("bad shard 7")
[rank1]: ValueError: bad shard 7
E1124 04:50:01.123000 1234 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
srun: error: node2: task 1: Exited with exit code 1
launcher: job step ended with status 1
"""
NCCL_TIMEOUT = """\
step 40/100 loss 2.1000 lr 1.000e-04 tokens/s 90,000
[rank3]:[E1124 05:01:02.000000000 ProcessGroupNCCL.cpp:632] [Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=812, OpType=ALLREDUCE, NumelIn=1, Timeout(ms)=600000) ran for 600013 milliseconds before timing out.
[rank3]: torch.distributed.DistBackendError: NCCL communicator was aborted on rank 3.
srun: error: node2: task 1: Aborted
"""
GLOO_TIMEOUT = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation to complete\n"
OOM = """\
step 2/10 loss 9.0000 lr 1.000e-04 tokens/s 1,000
[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB
"""
BAD_INPUT = "error: the tokenized data for this spec is not in the cache; run `launcher prepare SPEC` first\n"
REQUEUED_TWICE = """\
launcher: job 60 on node1, rendezvous node1:15060, spec /r/spec.yaml
step 1/4 loss 3.0000 lr 1.000e-04 tokens/s 10
slurmstepd-node1: error: *** JOB 60 ON node1 CANCELLED AT 2026-11-24T04:47:16 DUE TO JOB REQUEUE ***
launcher: job 60 on node1, rendezvous node1:15060, spec /r/spec.yaml
resuming from /r/checkpoints/checkpoint-1
step 2/4 loss 2.5000 lr 1.000e-04 tokens/s 10
step 4/4 loss 2.0000 lr 1.000e-05 tokens/s 10
eval step 4/4 loss 2.2000 perplexity 9.03
launcher: job step ended with status 0
"""


# --------------------------------------------------------------------------- parsers

def test_parsable_rows_keep_separators_in_the_last_field():
    rows = st.parse_delimited(SACCT, st.SACCT_FIELDS)
    assert len(rows) == 5
    assert rows[3]["JobName"] == "tiny|with|bars" and rows[3]["State"] == "COMPLETED"
    q = st.parse_delimited(SQUEUE, st.SQUEUE_FIELDS)
    assert q[1]["name"] == "g|h" and q[1]["reason"] == "Resources" and q[0]["time_used"] == "0:15"


def test_scontrol_record_values_may_hold_blanks():
    rec = st.parse_scontrol_record(SCONTROL_FAILED)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "1:0" and rec["Restarts"] == "0"
    assert rec["StdOut"] == "/tmp/my jobs/f.sh-2.out" and rec["Command"] == "/tmp/my jobs/f.sh"
    assert rec["AllocNode:Sid"] == "localhost:18092" and rec["CPUs/Task"] == "1"
    assert st.parse_scontrol(PARTITION + "\n" + NODE.format(n="node1"))[1]["RealMemory"] == "4000"


@pytest.mark.parametrize("text,seconds", [
    ("00:00:07", 7), ("0:15", 15), ("1:00", 60), ("01:02:03", 3723), ("2-00:00:00", 172800), ("1-02:03:04", 93784),
    ("30", 1800), ("UNLIMITED", None), ("INVALID", None), ("", None), ("2-12", 216000),
])
def test_durations(text, seconds):
    assert st.parse_duration(text) == seconds


def test_tres_gres_exit_codes_hostlists():
    assert st.gpus_in_tres("billing=2,cpu=2,gres/gpu=4,node=2") == 4
    assert st.gpus_in_tres("cpu=8,gres/gpu:h100=8,node=1") == 8
    assert st.gpus_in_tres("billing=1,cpu=1,node=1") == 0 and st.gpus_in_tres("") == 0
    assert st.parse_gres("gpu:h100:2") == [("gpu", "h100", 2)]
    assert st.parse_gres("gpu:h100:2(S:0-1),gpu:a100:1") == [("gpu", "h100", 2), ("gpu", "a100", 1)]
    assert st.parse_gres("gpu:4") == [("gpu", None, 4)] and st.parse_gres("(null)") == []
    assert st.parse_exit_code("1:0") == (1, 0) and st.parse_exit_code("0:9") == (0, 9)
    assert st.parse_exit_code("") == (None, None)
    assert st.expand_hostlist("node[1-2]") == ["node1", "node2"]
    assert st.expand_hostlist("gpu[08-10,12],cpu5") == ["gpu08", "gpu09", "gpu10", "gpu12", "cpu5"]
    assert st.expand_hostlist("(null)") == [] and st.expand_hostlist("None assigned") == []
    assert st.state_word("CANCELLED by 0") == "CANCELLED"
    assert st.format_duration(93784) == "1-02:03:04" and st.format_duration(None) == "-"


def test_attempts_of_a_requeued_job_are_grouped_oldest_first():
    groups = st.group_attempts(st.parse_delimited(SACCT, st.SACCT_FIELDS))
    assert [a.state for a in groups["36"]] == ["REQUEUED", "COMPLETED"]
    assert [(a.elapsed_s, a.gpus, a.nodes) for a in groups["36"]] == [(7, 4, 2), (12, 4, 2)]
    assert groups["39"][0].state == "CANCELLED" and groups["40"][0].time_limit_s == 60


def test_missing_tools_are_a_clear_user_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="`squeue` is not on the PATH"):
        st.squeue(["1"])
    with pytest.raises(UserError, match="`sinfo` is not on the PATH"):
        st.sinfo_nodes()


def test_status_without_slurm_tools_exits_2_with_one_message(tmp_path, cli):
    run_dir = _run_dir(tmp_path)
    record_job(run_dir, "7", "train")
    cp = cli("status", str(run_dir), env={"PATH": "/nonexistent"})
    assert cp.returncode == 2 and "`squeue` is not on the PATH" in cp.stderr and "Traceback" not in cp.stderr


# --------------------------------------------------------------------------- classification

@pytest.mark.parametrize("state,code,log,reason,line", [
    ("COMPLETED", 0, "", "completed", None),
    ("TIMEOUT", 0, "slurmstepd: error: *** JOB 1 ON node1 CANCELLED AT 2026-11-24T04:39:56 DUE TO TIME LIMIT ***",
     "time limit", "slurmstepd: error: *** JOB 1 ON node1 CANCELLED AT 2026-11-24T04:39:56 DUE TO TIME LIMIT ***"),
    ("CANCELLED", 0, "slurmstepd: error: *** JOB 9 ON node2 CANCELLED AT 2026-11-24T04:48:42 ***", "cancelled",
     "slurmstepd: error: *** JOB 9 ON node2 CANCELLED AT 2026-11-24T04:48:42 ***"),
    ("NODE_FAIL", 0, "", "node failure", None),
    ("BOOT_FAIL", 0, "", "node failure", None),
    ("OUT_OF_MEMORY", 0, "", "out of memory", None),
    ("PREEMPTED", 0, "", "preempted", None),
    ("FAILED", 1, TRACEBACK_UNDER_TORCHRUN, "failed", "[rank1]: ValueError: bad shard 7"),
    ("FAILED", 1, OOM, "out of memory", "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                                        "2.00 GiB. GPU 0 has a total capacity of 79.11 GiB"),
    ("FAILED", 5, "", "out of memory", None),
    ("FAILED", 1, NCCL_TIMEOUT, "collective timeout", None),
    ("FAILED", 1, GLOO_TIMEOUT, "collective timeout", GLOO_TIMEOUT.strip()),
    ("FAILED", 4, "launcher: watchdog: no progress for 600 s; stacks of every thread follow", "hang",
     "launcher: watchdog: no progress for 600 s; stacks of every thread follow"),
    ("FAILED", 2, BAD_INPUT, "bad input", BAD_INPUT.strip()),
    ("FAILED", 137, "srun: error: node1: task 0: Killed", "failed", "srun: error: node1: task 0: Killed"),
])
def test_classify_each_way_a_job_ends(state, code, log, reason, line):
    got_reason, got_line = reasons.classify(state, code, 0, log)
    assert got_reason == reason
    if line is not None:
        assert got_line == line
    if reason == "collective timeout" and line is None:
        assert "Watchdog caught collective operation timeout" in got_line


def test_classify_requeues_and_markers():
    assert reasons.classify("REQUEUED", 0, 0, "", requeued_after=True)[0] == "preempted and requeued"
    assert reasons.classify("PREEMPTED", 0, 0, "", requeued_after=True)[0] == "preempted and requeued"
    assert reasons.classify("FAILED", 3, 0, "", requeued_after=True)[0] == "preempted and requeued"
    # the ranks' own marker wins: torchrun exits 1 whatever its ranks did
    marker = {"reason": "oom", "message": "torch.OutOfMemoryError: CUDA out of memory (rank 3)"}
    assert reasons.classify("FAILED", 1, 0, TRACEBACK_UNDER_TORCHRUN, marker) == (
        "out of memory", "torch.OutOfMemoryError: CUDA out of memory (rank 3)")
    assert reasons.describe("failed", 1, 0, "ValueError: x") == "failed: exit code 1: ValueError: x"
    assert reasons.describe("completed", 0, 0, None) == "completed"


def test_why_line_skips_library_noise_and_wrappers():
    assert reasons.why_line(TRACEBACK_UNDER_TORCHRUN) == "[rank1]: ValueError: bad shard 7"
    assert reasons.why_line("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'\n"
                            "all fine\n") is None


def test_step_lines_and_attempt_segments():
    assert logs.last_step(REQUEUED_TWICE) == (4, 4, 2.0)  # the eval line is not a training step
    assert logs.last_step("[rank0]: step 7/9 loss 1.5 lr 1e-4 tokens/s 5\n") == (7, 9, 1.5)
    assert logs.last_step("no steps here, step=10 skipped=0\n") == (None, None, None)
    segs = logs.split_attempts(REQUEUED_TWICE, "60")
    assert len(segs) == 2 and "DUE TO JOB REQUEUE" in segs[0] and "resuming from" in segs[1]
    assert logs.split_attempts("plain log\n", "1") == ["plain log\n"]


def test_one_step_line_parser_reads_the_loop_line_and_older_or_foreign_ones():
    line = metrics.format_step(7, 40, 3.14159, 2.5e-4, 12345.6)
    assert line == "step 7/40 loss 3.1416 lr 2.500e-04 tokens/s 12,346"
    assert metrics.parse_step(line) == metrics.StepLine(7, 40, 3.1416, 2.5e-4, 12346.0)
    assert metrics.parse_step("Step 3 / 10 Loss: 2.5") == metrics.StepLine(3, 10, 2.5)
    assert metrics.parse_step("step 3/10") == metrics.StepLine(3, 10)  # nothing before it: a step
    for other in ("foo step 3/10", "max_step 3/4 loss 1", "x.step 3/4 loss 1", "step=10 skipped=0",
                  metrics.format_eval(3, 10, 2.0, 7.39)):
        assert metrics.parse_step(other) is None, other
    # only complete lines count as the loop's; a line without lr or tokens/s is status's business
    assert metrics.parse_step_lines(f"noise\n{line}\nstep 8/40 loss 3.0\n") == [
        {"step": 7, "max_steps": 40, "loss": 3.1416, "lr": 2.5e-4, "tokens_per_s": 12346.0}]


def test_a_preference_evaluation_has_reward_accuracy_and_margin_instead_of_perplexity(tmp_path):
    dpo = {"eval_loss": 0.61, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.4, "eval_rewards/chosen": 0.1}
    rm = {"eval_loss": 0.5, "eval_accuracy": 1.0, "eval_margin": 2.25}
    assert metrics.preference_eval(dpo) == {"reward_accuracy": 0.75, "reward_margin": 0.4}
    assert metrics.preference_eval(rm) == {"reward_accuracy": 1.0, "reward_margin": 2.25}
    assert metrics.preference_eval({"eval_loss": 2.0, "eval_rewards/margins": "nan?"}) == {}
    extra = metrics.preference_eval(dpo)
    line = metrics.format_eval(4, 8, 0.61, None, extra)
    assert line == "eval step 4/8 loss 0.6100 reward_accuracy 0.7500 reward_margin 0.4000"
    assert metrics.format_eval(4, 8, 2.0, 7.39) == "eval step 4/8 loss 2.0000 perplexity 7.39"
    path = RunDir(tmp_path).metrics_path
    path.parent.mkdir()
    metrics.append(path, metrics.eval_record(4, 0.61, None, 1.0, extra))
    (rec,) = metrics.read_records(tmp_path)
    assert rec == {"step": 4, "eval_loss": 0.61, "perplexity": None, "reward_accuracy": 0.75, "reward_margin": 0.4,
                   "time": 1.0} and metrics.is_eval(rec)


def test_metrics_file_round_trip_skips_broken_lines(tmp_path):
    path = RunDir(tmp_path).metrics_path
    path.parent.mkdir()
    metrics.append(path, metrics.step_record(1, 3.0, 1e-3, 10.0, 0.5, 1.0))
    metrics.append(path, metrics.eval_record(1, 2.9, 18.2, 2.0))
    with path.open("a") as f:
        f.write('{"step": 2, "loss"\n')  # a rank killed mid-write
    metrics.append(path, metrics.step_record(2, 2.5, 1e-3, 10.0, None, 3.0))
    records = metrics.read_records(tmp_path)
    assert len(records) == 3 and metrics.last_train(records)["loss"] == 2.5
    assert metrics.progress(tmp_path) == (2, 2.5)
    assert metrics.loss_points(records) == ([(1, 3.0), (2, 2.5)], [(1, 2.9)])
    assert metrics.progress(tmp_path / "none") == (None, None) and metrics.read_records(tmp_path / "none") == []


def test_jobs_file_groups_each_job_with_its_requeues(tmp_path):
    from launcher.rundir import jobs

    jobs.record_job(tmp_path, "5", "prep")
    jobs.record_job(tmp_path, "6", "train", after="5", array_tasks=2)
    with RunDir(tmp_path).jobs_path.open("a") as f:  # the line the batch script's requeue appends (printf)
        f.write('{"job_id": "6", "kind": "requeue", "task": "1", "time": 9, "attempt": 0, "reason": "signal"}\n')
    recorded = [(j.job_id, j.kind, len(j.lines)) for j in jobs.recorded_jobs(tmp_path)]
    assert recorded == [("5", "prep", 1), ("6", "train", 2)]
    assert jobs.job_ids(tmp_path) == ["5", "6"]
    lines = jobs.recorded_jobs(tmp_path)[1].lines
    assert jobs.count_kind(jobs.lines_of_task(lines, "train", "1"), jobs.REQUEUE, "1") == 1
    assert jobs.count_kind(jobs.lines_of_task(lines, "train", "0"), jobs.REQUEUE, "0") == 0
    assert jobs.read_jobs(tmp_path / "none") == []


def test_markers_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    markers.write_marker(tmp_path, "exit-77-rank3", reason="oom", exit_code=5, message="CUDA out of memory")
    markers.write_marker(tmp_path, "exit-77-rank0", reason="completed")
    [m1, m0] = markers.read_markers(tmp_path)
    assert (m1["job_id"], m1["restart"], m1["rank"], m1["exit_code"]) == ("77", 1, 3, 5)
    assert reasons.marker_for([m1, m0], "77")["reason"] == "oom"  # a failure wins over 'completed'
    assert reasons.marker_for([m1, m0], "77", restart=0) is None
    with pytest.raises(ValueError):
        markers.write_marker(tmp_path, "../escape", reason="oom")


# --------------------------------------------------------------------------- status of a run dir

def _run_dir(tmp_path: Path, name: str = "run", **cluster) -> Path:
    from launcher.config.spec import validate
    from launcher.submit.rundir import create

    spec = validate({"name": name, "optim": {"max_steps": 4, "micro_batch": 2}, "data": {"seq_len": 64},
                     "cluster": {"partition": "debug", **cluster}})
    rd, _, _ = create(tmp_path / name, spec)
    return rd.path


def test_status_takes_the_first_source_that_knows_each_job(tmp_path):
    run_dir = _run_dir(tmp_path)
    logs_dir = RunDir(run_dir).logs
    for jid in ("1", "3", "36", "60", "61"):
        record_job(run_dir, jid, "train")
    (logs_dir / "run-60.out").write_text(REQUEUED_TWICE)
    (logs_dir / "run-61.out").write_text(TRACEBACK_UNDER_TORCHRUN)
    (logs_dir / "run-1.out").write_text("step 3/4 loss 2.7500 lr 1e-4 tokens/s 100\n")
    src = Sources(
        squeue={r["job_id"]: r for r in st.parse_delimited(SQUEUE, st.SQUEUE_FIELDS)},
        scontrol={"3": st.parse_scontrol_record(SCONTROL_RUNNING)},
        sacct=st.group_attempts(st.parse_delimited(SACCT, st.SACCT_FIELDS)))
    got = {j.job_id: j for j in status.job_statuses(run_dir, src)}
    one, three, gpu, requeued, failed = got["1"], got["3"], got["36"], got["60"], got["61"]
    assert (one.state, one.source, one.live, one.step, one.max_steps, one.loss) == ("RUNNING", "squeue", True, 3, 4, 2.75)
    assert (three.state, three.detail, three.gpus, three.restarts) == ("PENDING", "pending: Resources", 4, 1)
    assert (gpu.state, gpu.source, gpu.reason, gpu.restarts, gpu.gpus, gpu.nodes) == (
        "COMPLETED", "sacct", "completed", 1, 4, 2)
    assert gpu.gpu_hours == pytest.approx((7 + 12) * 4 / 3600)
    assert [a["reason"] for a in gpu.attempts] == ["preempted and requeued", "completed"]
    # Slurm forgot 60 and 61 and accounting has no record: the run dir's logs answer
    assert (requeued.state, requeued.source, requeued.reason, requeued.step) == ("COMPLETED", "run dir", "completed", 4)
    assert (failed.state, failed.source, failed.reason, failed.exit_code) == ("FAILED", "run dir", "failed", 1)
    assert failed.log_line == "[rank1]: ValueError: bad shard 7"
    lines = status.format_run({"run_dir": str(run_dir), "name": "run", "jobs": [j.to_dict() for j in got.values()]})
    assert any("36 attempt 1: REQUEUED 00:00:07 on node[1-2]: preempted and requeued" in ln for ln in lines), lines


def test_status_reads_markers_and_array_tasks(tmp_path, monkeypatch):
    run_dir = _run_dir(tmp_path)
    record_job(run_dir, "70", "train", array_tasks=2)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    markers.write_marker(run_dir, "exit-70_1-rank0", reason="collective_timeout", message="gloo timed out")
    fields = ("JobID", "State", "ExitCode", "ElapsedRaw", "AllocTRES", "NNodes", "Submit")
    rows = st.parse_delimited("70_1|FAILED|1:0|30|cpu=1,node=1|1|2026-01-01T00:00:00\n"
                              "70_0|COMPLETED|0:0|40|cpu=1,node=1|1|2026-01-01T00:00:00\n", fields)
    got = status.job_statuses(run_dir, Sources(sacct=st.group_attempts(rows)))
    assert [j.job_id for j in got] == ["70_0", "70_1"]
    assert (got[1].reason, got[1].transient, got[1].log_line) == ("collective timeout", True, "gloo timed out")


def test_the_ranks_markers_name_the_cause_not_its_echoes(tmp_path):
    # markers as the ranks write them (exit-JOB-aN-rankR), job 90 requeued once
    run_dir = _run_dir(tmp_path)
    record_job(run_dir, "90", "train")
    record_job(run_dir, "90", "requeue", reason="ranks stopped at step 2 on a signal after a complete checkpoint",
               task="", attempt=0)
    for name, rec in {
        "requeue-90-a0": {"reason": "requeue", "exit_code": 3, "message": "stopped at step 2 on SIGUSR1", "time": 1},
        "exit-90-a1-rank1": {"reason": "oom", "exit_code": 5, "message": "rank 1 on node2: out of memory", "time": 3},
        "exit-90-a1-rank0": {"reason": "collective_timeout", "exit_code": 1, "message": "rank 0: a collective failed",
                             "time": 4},
    }.items():
        markers.write_marker(run_dir, name, job_id="90", restart=int(name.split("-a")[1][0]), **rec)
    fields = ("JobID", "State", "ExitCode", "ElapsedRaw", "Submit")
    rows = st.parse_delimited("90|REQUEUED|0:0|50|2026-01-01T00:00:00\n90|FAILED|1:0|20|2026-01-01T00:01:00\n", fields)
    [job] = status.job_statuses(run_dir, Sources(sacct=st.group_attempts(rows)))
    assert [a["reason"] for a in job.attempts] == ["preempted and requeued", "out of memory"]
    assert job.attempts[0]["log_line"] == "stopped at step 2 on SIGUSR1"
    assert (job.reason, job.log_line, job.transient) == ("out of memory", "rank 1 on node2: out of memory", False)
    assert (job.requeues, job.retries, job.restarts) == (1, 0, 1)
    # the batch script's per-rank summary is the line that says why
    log = "launcher: job step ended with status 1\nlauncher: rank 2 on node2 ended without an exit record: killed\n"
    assert reasons.why_line(log) == "launcher: rank 2 on node2 ended without an exit record: killed"


def test_a_killed_rank_is_a_transient_failure_an_oom_is_not(tmp_path):
    run_dir = _run_dir(tmp_path)
    logs_dir = RunDir(run_dir).logs
    record_job(run_dir, "80", "train")
    record_job(run_dir, "81", "train")
    (logs_dir / "run-80.out").write_text("srun: error: node1: task 0: Killed\n"
                                                 "launcher: job step ended with status 137\n")
    (logs_dir / "run-81.out").write_text(OOM + "launcher: job step ended with status 1\n")
    killed, oom = status.job_statuses(run_dir, Sources())
    assert (killed.reason, killed.exit_code, killed.transient) == ("failed", 137, True)
    assert (oom.reason, oom.transient) == ("out of memory", False)


# --------------------------------------------------------------------------- cost

def test_cost_sums_every_attempt_at_the_partition_price_and_compares_with_the_estimate(tmp_path):
    run_dir = _run_dir(tmp_path, nodes=2, gpus_per_node=2, usd_per_gpu_hour=3.6, usd_per_node_hour=1.2)
    record_job(run_dir, "36", "train")
    record_job(run_dir, "42", "prep")
    for s in (1, 2, 3):
        metrics.append(RunDir(run_dir).metrics_path, metrics.step_record(s, 3.0 - s / 10, 1e-4, 100.0, None, 0.0))
    attempts = st.group_attempts(st.parse_delimited(SACCT, st.SACCT_FIELDS))
    attempts = {k: v for k, v in attempts.items() if k in ("36", "42")}
    c = cost.run_cost(run_dir, attempts=attempts)
    assert c["gpu_hours"] == pytest.approx((7 + 12) * 4 / 3600)
    gpu_usd = (7 + 12) * 4 / 3600 * 3.6
    cpu_usd = 43 * 1 / 3600 * 1.2  # the CPU job: node-hours
    assert c["usd"] == pytest.approx(gpu_usd + cpu_usd)
    assert [r["price"] for r in c["attempts"]] == ["4 GPU x $3.6/GPU-h"] * 2 + ["1 node x $1.2/node-h"]
    tokens = 3 * (2 * 4) * 64  # steps x (micro 2 x world 4) x seq 64
    assert c["tokens"] == tokens and c["usd_per_mtok"] == pytest.approx(c["usd"] / tokens * 1e6)
    est = c["estimate"]
    assert est["device"] == "H100-80GB" and est["usd_per_mtok"] > 0
    assert c["estimate_error"] == pytest.approx(est["usd_per_mtok"] / c["usd_per_mtok"] - 1)
    assert any("GPU-hours" in ln for ln in cost.format_cost(c))


def test_cost_prices_per_partition_from_the_profile(tmp_path):
    prices = cost.Prices(default=cost.Rate(2.0, None, None),
                         partitions={"cpu": cost.Rate(None, None, 0.05), "gpu": cost.Rate(3.0, None, None)})
    a = st.Attempt.from_sacct
    rows = dict(ElapsedRaw="3600", AllocCPUS="8", NNodes="1")
    assert prices.price(a({**rows, "AllocTRES": "cpu=8,gres/gpu=2", "Partition": "gpu"}))[0] == pytest.approx(6.0)
    assert prices.price(a({**rows, "AllocTRES": "cpu=8", "Partition": "cpu"}))[0] == pytest.approx(0.4)
    assert prices.price(a({**rows, "AllocTRES": "cpu=8,gres/gpu=1", "Partition": "other"}))[0] == pytest.approx(2.0)
    assert prices.price(a({**rows, "AllocTRES": "cpu=8", "Partition": "other"}))[0] is None
    assert prices.price(a({"ElapsedRaw": "0", "AllocTRES": "", "Partition": "other"}))[0] == 0.0


# --------------------------------------------------------------------------- cluster check

LAB = Profile(name="lab", default_partition="debug", partitions={"debug": Partition(
    gpu_type="h100", gpus_per_node=2, cpus_per_node=2, mem_per_node="4000M", max_nodes=2)})


def _records():
    return ([st.parse_scontrol_record(PARTITION)],
            [st.parse_scontrol_record(NODE.format(n=n)) for n in ("node1", "node2")])


def test_cluster_check_matches_the_recorded_cluster():
    diffs, notes = cluster_check.compare(LAB, *_records())
    assert diffs == [] and notes == []


def test_cluster_check_lists_every_difference():
    wrong = Profile(name="wrong", partitions={
        "gpu": Partition(gpu_type="h100", gpus_per_node=8),
        "debug": Partition(gpu_type="a100", gpus_per_node=4, cpus_per_node=96, mem_per_node="1000G",
                           max_time="04:00:00", max_nodes=16)})
    diffs, _ = cluster_check.compare(wrong, *_records())
    got = [str(d) for d in diffs]
    assert got == [
        "partition gpu: exists: profile says yes, cluster has no such partition (it has: debug)",
        "partition debug: max time: profile says 04:00:00, cluster has no limit (MaxTime=UNLIMITED)",
        "partition debug: max nodes: profile says 16, cluster has 2 (MaxNodes=UNLIMITED, 2 node(s))",
        "partition debug, node node1: GPUs per node: profile says 4, cluster has 2 (Gres=gpu:h100:2)",
        "partition debug, node node1: GPU type: profile says a100, cluster has h100 (Gres=gpu:h100:2)",
        "partition debug, node node1: CPUs per node: profile says 96, cluster has 2 (CPUTot=2)",
        "partition debug, node node1: memory per node: profile says 1000G (1024000 MiB), cluster has 4000 MiB "
        "(RealMemory=4000)",
        "partition debug, node node2: GPUs per node: profile says 4, cluster has 2 (Gres=gpu:h100:2)",
        "partition debug, node node2: GPU type: profile says a100, cluster has h100 (Gres=gpu:h100:2)",
        "partition debug, node node2: CPUs per node: profile says 96, cluster has 2 (CPUTot=2)",
        "partition debug, node node2: memory per node: profile says 1000G (1024000 MiB), cluster has 4000 MiB "
        "(RealMemory=4000)",
    ]
    limited = PARTITION.replace("MaxTime=UNLIMITED", "MaxTime=2-00:00:00").replace("State=UP", "State=DOWN")
    diffs, notes = cluster_check.compare(LAB, [st.parse_scontrol_record(limited)], _records()[1])
    assert [str(d) for d in diffs] == ["partition debug: max time: profile says no limit (max_time unset), "
                                       "cluster has 2-00:00:00 (MaxTime=2-00:00:00)"]
    assert notes == ["partition debug is DOWN"]
    diffs, _ = cluster_check.compare(Profile(name="x", account="ml", qos="high", partitions={}), *_records(),
                                     accounts=set(), qos=set())
    assert {d.what for d in diffs} == {"partitions", "account", "QoS"}


# --------------------------------------------------------------------------- logs

def test_lines_are_attributed_to_ranks_and_nodes():
    torchrun = logs.Layout(nproc_per_node=4, launcher="torchrun", nodes={"5": ["a1", "a2"]})
    assert torchrun.attribute("[rank6]: Traceback", single_node=False) == (6, 1)
    assert torchrun.attribute("1: started", single_node=False) == (None, 1)  # srun --label: a node's task
    assert torchrun.attribute("[default2]: hello", single_node=False) == (None, None)
    assert torchrun.attribute("[default2]: hello", single_node=True) == (2, 0)
    assert torchrun.attribute("step 1/3 loss 2.0", single_node=False) == (0, 0)
    srun = logs.Layout(nproc_per_node=2, launcher="srun")
    assert srun.attribute("3: x", single_node=False) == (3, 1)
    f = logs.LineFilter(node="a2", layout=torchrun)
    path = Path("/r/logs/run-5.out")
    assert [ln for ln in ("[rank5]: boom", "[rank1]: fine", "step 1/3") if f.keep(ln, path)] == ["[rank5]: boom"]
    # the batch script's torchrun prefix (no space), and torch's own prefix after it
    assert torchrun.attribute("[rank7]:step 2/3 loss 1.0", single_node=False) == (7, 1)
    assert torchrun.attribute("[rank7]:[rank7]: Traceback", single_node=False) == (7, 1)


def test_labels_come_off_for_reading_and_one_stays_for_showing():
    assert logs.strip_labels("[rank1]:[rank1]: ValueError: x") == "ValueError: x"
    assert logs.strip_labels(" 3: [rank3]:step 1/2 loss 1.0") == "step 1/2 loss 1.0"
    assert logs.strip_labels("step 1/2 loss 1.0") == "step 1/2 loss 1.0"
    assert logs.one_label("[rank1]:[rank1]: ValueError: x") == "[rank1]: ValueError: x"
    assert logs.one_label(" 3: x") == "3: x"
    assert logs.one_label("plain") == "plain"
    log = ("launcher: job 7 on n[1-2], rendezvous n1:15007, spec /r/spec.yaml\n[rank0]:step 3/10 loss 2.5000 lr 1e-3\n"
           "[rank1]:[rank1]: Traceback (most recent call last):\n[rank1]:[rank1]:   File \"/x.py\", line 1, in f\n"
           "[rank1]:[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
    assert reasons.classify("FAILED", 5, 0, log) == (
        reasons.OUT_OF_MEMORY, "[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert logs.last_step(log) == (3, 10, 2.5)


def test_follow_prints_new_lines_and_returns_when_the_jobs_end(tmp_path):
    run_dir = _run_dir(tmp_path)
    record_job(run_dir, "5", "train")
    log = RunDir(run_dir).logs / "run-5.out"
    log.write_text("line 1\n")
    ended = threading.Event()

    def writer():
        time.sleep(0.3)
        with log.open("a") as f:
            f.write("line 2\npartial")
            f.flush()
            time.sleep(0.3)
            f.write(" line 3\n")
        ended.set()

    out: list[str] = []
    t = threading.Thread(target=writer)
    t.start()
    t0 = time.monotonic()
    done = logs.follow(run_dir, out.append, poll=0.05, check_every=0.05, timeout=20,
                       is_live=lambda _: [] if ended.is_set() else ["5"])
    t.join()
    assert done and time.monotonic() - t0 < 10
    assert out == ["line 1", "line 2", "partial line 3"]
    # squeue not answering counts as still live: follow waits (here until its timeout)
    assert logs.follow(run_dir, lambda _: None, poll=0.05, check_every=0.05, timeout=0.3,
                       is_live=lambda _: None) is False


def test_print_logs_heads_each_file_when_there_are_several(tmp_path):
    run_dir = _run_dir(tmp_path)
    logs_dir = RunDir(run_dir).logs
    record_job(run_dir, "8", "prep")
    record_job(run_dir, "9", "train")
    (logs_dir / "run-9.out").write_text("train\n")
    (logs_dir / "prep-8.out").write_text("prep\n")
    out: list[str] = []
    assert logs.print_logs(run_dir, out.append) == 2
    assert out == [f"==> {run_dir}/logs/prep-8.out <==", "prep", f"==> {run_dir}/logs/run-9.out <==", "train"]


def test_the_batch_scripts_jobs_line_is_read_and_counted_like_record_jobs(tmp_path):
    """The script appends its requeue line with bash's printf; the same line must parse, count, and start
    with the prefix its grep counts."""
    from launcher.rundir import jobs

    import subprocess

    record_job(tmp_path, "77", "train")
    # the shell's own printf, with the format as the template renders it inside single quotes
    subprocess.run(["bash", "-c", f"printf '{jobs.script_line_format()}' \"$@\" >> \"$0\"",
                    str(RunDir(tmp_path).jobs_path), "77", jobs.REQUEUE, "", "1700000000", "0", "preempted"],
                   check=True)
    line = RunDir(tmp_path).jobs_path.read_text().splitlines()[-1]
    assert line.startswith(jobs.script_line_prefix("77", jobs.REQUEUE, ""))
    [job] = jobs.recorded_jobs(tmp_path)
    assert job.kind == "train" and jobs.count_kind(job.lines, jobs.REQUEUE) == 1
    assert job.lines[-1]["reason"] == "preempted" and job.lines[-1]["attempt"] == 0
