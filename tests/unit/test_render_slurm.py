"""The Slurm batch scripts (training, and the prep/merge/eval jobs chained around it): pinned by
golden files, valid bash, and safe with hostile values.

Re-record the golden files after an intended change with
    LAUNCHER_RECORD_GOLDEN=1 pytest tests/unit/test_render_slurm.py
and review the diff (git diff tests/golden/slurm) before committing it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from launcher import assets
from launcher.config.profiles import Profile
from launcher.config.resolve import deep_merge
from launcher.config.spec import RunSpec, validate
from launcher.errors import SpecError
from launcher.plan.plan import make_plan
from launcher.render import slurm as render
from launcher.render.slurm import render_chain_sbatch, render_sbatch, sbatch_quote
from launcher.rundir.jobs import read_jobs

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "slurm"
RECORD = os.environ.get("LAUNCHER_RECORD_GOLDEN") == "1"
RUN_DIR = Path("/scratch/runs/demo")  # fixed, so the golden files do not depend on this machine
PYTHON = "/opt/venv/bin/python"

_GPU = {"gpus_per_node": 8, "partition": "gpu", "account": "llm", "time": "2-00:00:00", "mem": "0",
        "cpus_per_task": 8, "exclusive": True, "net_ifname": "ib0", "nccl": {"ib_hca": "mlx5"}}
VARIANTS: dict[str, dict[str, Any]] = {
    "single_node_gpu": {"name": "sft-8b", "cluster": {**_GPU, "nodes": 1, "hf_home": "/shared/hf"},
                        "optim": {"global_batch": 32}},
    "multi_node_gpu": {"name": "cpt-70b", "zero": {"stage": 3},
                       "cluster": {**_GPU, "nodes": 4, "qos": "high", "constraint": "h100",
                                   "reservation": "llm-res", "dependency": "afterok:1234",
                                   "env": {"HF_HOME": "/shared/hf cache"}, "signal_grace_s": 300}},
    "container_pyxis": {"name": "pyxis-run", "cluster": {
        **_GPU, "nodes": 2, "container": {"runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:25.01-py3",
                                          "mounts": ["/data:/data:ro", "/shared"]}}},
    "container_apptainer": {"name": "apptainer-run", "cluster": {
        **_GPU, "nodes": 2, "container": {"runtime": "apptainer", "image": "/images/train.sif",
                                          "mounts": ["/data:/data"]}}},
    "array_sweep": {"name": "lr-sweep", "cluster": {"nodes": 1, "gpus_per_node": 4, "partition": "gpu",
                                                   "array": "%2", "requeue": False}},
    "cpu": {"name": "tiny-cpu", "cluster": {"nodes": 2, "gpus_per_node": 0, "nproc_per_node": 1,
                                            "net_ifname": "eth0", "time": "00:10:00"}},
    "cpu_srun_per_rank": {"name": "tiny-srun", "cluster": {"nodes": 1, "nproc_per_node": 2, "launcher": "srun",
                                                          "cpus_per_task": 1, "net_ifname": "eth0",
                                                          "setup": ["module load python/3.11",
                                                                    "source /opt/venv/bin/activate"]}},
}
# GPU jobs that state no CPUs or memory: the cluster profile's node gives them (cpus_per_node shared by
# the ranks, mem_per_node, or --exclusive with --mem=0 where the profile gives nodes whole).
_H100_PARTITION = {"gpu_type": "h100", "gpus_per_node": 8, "cpus_per_node": 96, "mem_per_node": "1000G",
                   "max_time": "2-00:00:00"}
_PROFILE = Profile.model_validate({"name": "lab", "account": "llm", "net_ifname": "ib0",
                                   "partitions": {"gpu": _H100_PARTITION}})
_EXCLUSIVE_PROFILE = Profile.model_validate({"name": "lab-whole", "account": "llm", "net_ifname": "ib0",
                                             "partitions": {"gpu": {**_H100_PARTITION, "exclusive": True}}})
VARIANTS["gpu_from_profile"] = deep_merge(_PROFILE.layer(None), {
    "name": "cpt-8b", "cluster": {"nodes": 2}, "zero": {"stage": 2, "offload_optimizer": "cpu"}})
VARIANTS["gpu_exclusive_srun"] = deep_merge(_EXCLUSIVE_PROFILE.layer(None), {
    "name": "sft-whole", "cluster": {"nodes": 2, "launcher": "srun"}})
# What `launcher bench --slurm` renders: the job prepares the data in a first step of its own. Every
# other variant is what `launcher slurm` writes, with the preparation queued as a job before it.
IN_JOB_PREP = {"cpu_in_job_prep": "cpu"}
SWEEP_LRS = (1e-4, 3e-4, 1e-3)
# The one-task jobs chained around training: (kind, training variant the run has).
CHAIN_VARIANTS: dict[str, tuple[str, str]] = {
    "chain_prep_cpu": ("prep", "cpu"),
    "chain_prep_sweep": ("prep", "array_sweep"),
    "chain_prep_gpu_hf_home": ("prep", "single_node_gpu"),
    "chain_merge_apptainer": ("merge", "container_apptainer"),
    "chain_eval_gpu_pyxis": ("eval", "container_pyxis"),
    "chain_eval_cpu_setup": ("eval", "cpu_srun_per_rank"),
    "chain_prep_mixture_array": ("prep", "cpu"),
}
# A mixture (data.sources) prepared by a job array of cluster.prep.tasks tasks, each retried.
MIXTURE = {"data": {"sources": [{"name": "web", "path": "/data/web/*.jsonl", "weight": 0.7},
                                {"name": "replay", "path": "/data/general", "weight": 0.3}]},
           "cluster": {"prep": {"tasks": 4, "retries": 2, "cpus": 2}}}
CHAIN_EXTRA = {"cluster": {"prep": {"partition": "cpu", "cpus": 16, "mem": "64G", "time": "00:30:00"},
                           "hf_home": "/shared/hf"}}


def spec_of(tree: dict[str, Any]) -> RunSpec:
    return validate(tree)


def _sweep_tasks(name: str) -> list[RunSpec] | None:
    if name != "array_sweep":
        return None
    return [validate({**VARIANTS[name], "optim": {"lr": lr}}) for lr in SWEEP_LRS]


def rendered(name: str) -> str:
    if name in CHAIN_VARIANTS:
        kind, base = CHAIN_VARIANTS[name]
        tree = VARIANTS[base]
        if name.endswith(("_hf_home", "_apptainer")):  # prep settings of their own, and the hub cache
            tree = {**tree, "cluster": {**tree["cluster"], **CHAIN_EXTRA["cluster"]}}
        if name.endswith("_mixture_array"):
            tree = {**tree, "data": MIXTURE["data"], "cluster": {**tree["cluster"], **MIXTURE["cluster"]}}
        return render_chain_sbatch(spec_of(tree), kind, RUN_DIR, python=PYTHON, array_specs=_sweep_tasks(base))
    in_job_prep = name in IN_JOB_PREP
    base = IN_JOB_PREP.get(name, name)
    spec = spec_of(VARIANTS[base])
    return render_sbatch(spec, make_plan(spec), RUN_DIR, python=PYTHON, array_specs=_sweep_tasks(base),
                         prepare_step=in_job_prep)


ALL_SCRIPTS = sorted([*VARIANTS, *IN_JOB_PREP, *CHAIN_VARIANTS])


def sbatch_args(line: str) -> list[str]:
    """The arguments sbatch reads from one `#SBATCH` line: a port of Slurm 22.05's
    src/sbatch/opt.c `_get_argument` (blanks split, quotes group, backslash escapes everywhere,
    an unquoted # ends the line)."""
    assert line.startswith("#SBATCH")
    text, i, out = line[len("#SBATCH"):], 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text[i] == "#":
            return out
        arg, quote, escape = [], "", False
        while i < len(text) and (quote or not text[i].isspace()):
            ch = text[i]
            i += 1
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
                continue
            elif quote:
                if ch == quote:
                    quote = ""
                    continue
            elif ch in "\"'":
                quote = ch
                continue
            elif ch == "#":
                out.append("".join(arg))
                return out
            arg.append(ch)
        assert not quote, f"unmatched quote in {line!r}"
        out.append("".join(arg))


def directives_of(script: str) -> dict[str, str]:
    """The options sbatch reads from a script: #SBATCH lines up to its first command, as sbatch stops
    there (so a dry run that prints several scripts gives the first one's)."""
    out: dict[str, str] = {}
    for line in script.splitlines():
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            for arg in sbatch_args(line):
                key, _, value = arg.partition("=")
                out[key] = value
    return out


# --------------------------------------------------------------------------- golden files

@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_script_matches_golden_file(name):
    text = rendered(name)
    path = GOLDEN / f"{name}.sbatch"
    hint = (f"{path} differs from the rendered script. If the change is intended, re-record with\n"
            f"    LAUNCHER_RECORD_GOLDEN=1 pytest tests/unit/test_render_slurm.py\n"
            f"and review `git diff tests/golden/slurm`.")
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), hint
    assert text == path.read_text(), hint


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_golden_script_is_valid_bash(name):
    path = GOLDEN / f"{name}.sbatch"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_jobs_get_their_cpus_memory_and_threads_from_the_profile():
    # torchrun: one task per node holds the node's 8 ranks, each with 96 / 8 = 12 cores
    text = rendered("gpu_from_profile")
    d = directives_of(text)
    assert d["--cpus-per-task"] == "96" and d["--mem"] == "1000G" and "--exclusive" not in d
    assert "export OMP_NUM_THREADS=12\n" in text and " --cpus-per-task=96 " in text
    # optimizer offload compiles DeepSpeed's CPU Adam: node-local, one folder per attempt, no shared lock
    assert 'export TORCH_EXTENSIONS_DIR="${TMPDIR:-/tmp}/launcher-torch-extensions-' in text
    # srun: one task per rank, 12 CPUs each; the profile gives nodes whole: --exclusive --mem=0
    text = rendered("gpu_exclusive_srun")
    d = directives_of(text)
    assert d["--cpus-per-task"] == "12" and d["--mem"] == "0" and "--exclusive" in d
    assert "export OMP_NUM_THREADS=12\n" in text and "TORCH_EXTENSIONS_DIR" not in text
    # a site binding one GPU per task would leave cuda:LOCAL_RANK missing: every task sees the node's GPUs
    assert "--ntasks-per-node=8 --gpu-bind=none --cpus-per-task=12 " in text
    assert "--gpu-bind" not in rendered("cpu_srun_per_rank")
    # the plan says the same
    spec = spec_of(VARIANTS["gpu_from_profile"])
    host = make_plan(spec).host_line()
    assert "12 CPU core(s) per rank" in host and "1000G per node = 125.0 GiB per rank" in host
    # a CPU job without a profile keeps Slurm's defaults
    assert "--cpus-per-task" not in directives_of(rendered("cpu")) and "OMP_NUM_THREADS" not in rendered("cpu")


def test_rendering_is_byte_identical_across_calls():
    assert len({rendered("multi_node_gpu") for _ in range(3)}) == 1


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_sbatch_directives_come_first_and_sorted(name):
    lines = rendered(name).splitlines()
    assert lines[0] == "#!/bin/bash"
    block = [x for x in lines[1:] if x.startswith("#SBATCH")]
    assert lines[1:1 + len(block)] == block  # contiguous, right after the shebang: sbatch stops at the first command
    assert block == sorted(block)


def test_directives_follow_the_spec():
    d = directives_of(rendered("multi_node_gpu"))
    assert d["--nodes"] == "4" and d["--gpus-per-node"] == "8" and d["--ntasks-per-node"] == "1"
    assert d["--cpus-per-task"] == "64"  # torchrun: one task holds the node's 8 ranks x 8 CPUs
    assert d["--partition"] == "gpu" and d["--qos"] == "high" and d["--account"] == "llm"
    assert d["--constraint"] == "h100" and d["--reservation"] == "llm-res" and d["--dependency"] == "afterok:1234"
    assert d["--time"] == "2-00:00:00" and d["--mem"] == "0" and "--exclusive" in d and "--requeue" in d
    assert d["--signal"] == "B:USR1@300" and d["--open-mode"] == "append" and d["--export"] == "ALL"
    assert d["--output"] == d["--error"] == "/scratch/runs/demo/logs/%x-%j.out"
    assert d["--job-name"] == "cpt-70b"


def test_cpu_script_has_no_gpu_request_and_no_nccl_settings():
    text = rendered("cpu")
    assert "--gpus-per-node" not in directives_of(text)
    assert "NCCL_DEBUG" not in text and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in text
    assert "export GLOO_SOCKET_IFNAME=eth0" in text and "export NCCL_SOCKET_IFNAME=eth0" in text


def test_srun_launcher_runs_one_task_per_rank():
    text = rendered("cpu_srun_per_rank")
    d = directives_of(text)
    assert d["--ntasks-per-node"] == "2" and d["--cpus-per-task"] == "1"
    assert 'RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"' in text
    assert "torch.distributed.run" not in text
    # set-up lines choose the environment: python from their PATH, not this interpreter
    assert "PYTHON=python3" in text and PYTHON not in text


def test_array_sweep_selects_the_task_spec_and_names_logs_per_task():
    text = rendered("array_sweep")
    d = directives_of(text)
    assert d["--array"] == f"0-{len(SWEEP_LRS) - 1}%2"
    assert d["--output"] == "/scratch/runs/demo/logs/%x-%A_%a.out" and "--no-requeue" in d
    assert 'SPEC="$RUN_DIR/tasks/$SLURM_ARRAY_TASK_ID/spec.yaml"' in text


def test_percent_in_run_dir_is_literal_for_slurm():
    spec = spec_of({})
    text = render_sbatch(spec, make_plan(spec), Path("/runs/100%x"), python=PYTHON)
    assert directives_of(text)["--output"] == "/runs/100%%x/logs/%x-%j.out"
    chain = render_chain_sbatch(spec, "prep", Path("/runs/100%x"), python=PYTHON)
    assert directives_of(chain)["--output"] == "/runs/100%%x/logs/%x-%j.out"


def test_templates_spell_no_run_dir_or_marker_name():
    # they come rendered in from rundir/layout.py and rundir/markers.py; the sandbox runs below show the
    # script reads the markers under the names the ranks' writer gives them
    names = render._run_dir_names(RUN_DIR)
    marker = render._marker_names()
    assert names["jobs"] == "jobs.jsonl" and names["rank_logs"] == "logs/ranks" and marker["suffix"] == ".json"
    for template in (render.TEMPLATE, render.CHAIN_TEMPLATE):
        text = (assets.slurm_templates_dir() / template).read_text()
        for name in names.values():
            assert f"/{name}" not in text and ("." not in name or name not in text), (template, name)
        for piece in (marker["start"], marker["exit"], marker["requeue"], marker["suffix"]):
            assert piece not in text, (template, piece)


# --------------------------------------------------------------------------- the chained jobs

def _chain(kind: str, **cluster: Any) -> str:
    return render_chain_sbatch(spec_of({"name": "demo", "cluster": cluster}), kind, RUN_DIR, python=PYTHON)


def test_training_script_of_launcher_slurm_leaves_preparation_to_its_own_job():
    assert "-m launcher prepare" not in rendered("cpu")
    assert '-m launcher prepare "$SPEC"' in rendered("cpu_in_job_prep")  # launcher bench --slurm


def test_prep_job_is_one_cpu_task_with_the_prep_settings():
    d = directives_of(_chain("prep", nodes=4, gpus_per_node=8, partition="gpu", account="llm", qos="high",
                             constraint="h100", reservation="res", dependency="afterok:99", time="2-00:00:00",
                             mem="0", exclusive=True,
                             prep={"partition": "cpu", "cpus": 16, "mem": "64G", "time": "00:30:00"}))
    assert (d["--nodes"], d["--ntasks"], d["--cpus-per-task"]) == ("1", "1", "16")
    assert not {"--gpus-per-node", "--exclusive", "--signal", "--ntasks-per-node"} & set(d)
    assert (d["--partition"], d["--mem"], d["--time"]) == ("cpu", "64G", "00:30:00")
    assert (d["--account"], d["--qos"]) == ("llm", "high")
    assert "--constraint" not in d and "--reservation" not in d  # they name nodes of the training partition
    assert d["--job-name"] == "demo-prep" and d["--output"] == d["--error"] == "/scratch/runs/demo/logs/%x-%j.out"
    assert d["--open-mode"] == "append" and d["--export"] == "ALL"
    assert d["--dependency"] == "afterok:99"  # the first job of the chain waits for what the run waits for


def test_prep_job_defaults_to_the_training_partition_and_its_nodes():
    d = directives_of(_chain("prep", partition="gpu", constraint="h100"))
    assert (d["--partition"], d["--constraint"], d["--time"], d["--cpus-per-task"]) == ("gpu", "h100", "01:00:00", "4")
    assert "--mem" not in d


@pytest.mark.parametrize("kind, command", [
    ("prep", '-m launcher prepare "$SPEC"'),
    ("merge", '-m launcher merge "$RUN_DIR" --out "$RUN_DIR/merged" --force'),
    ("eval", '-m launcher eval "$RUN_DIR"'),
])
def test_chain_job_runs_its_command_and_only_the_first_carries_the_spec_dependency(kind, command):
    text = _chain(kind, dependency="singleton")
    assert f'"$PYTHON" {command}' in text
    d = directives_of(text)
    assert d.get("--dependency") == ("singleton" if kind == "prep" else None)
    assert d["--job-name"] == f"demo-{kind}"


def test_eval_job_takes_one_gpu_on_the_training_partition_when_the_run_has_gpus():
    prep = {"partition": "cpu"}
    gpu = directives_of(_chain("eval", gpus_per_node=8, partition="gpu", prep=prep))
    assert gpu["--gpus-per-node"] == "1" and gpu["--partition"] == "gpu"
    cpu = directives_of(_chain("eval", gpus_per_node=0, partition="gpu", prep=prep))
    assert "--gpus-per-node" not in cpu and cpu["--partition"] == "cpu"
    merge = directives_of(_chain("merge", gpus_per_node=8, partition="gpu", prep=prep))
    assert "--gpus-per-node" not in merge and merge["--partition"] == "cpu"


def test_sweep_prep_job_prepares_every_task_spec():
    text = rendered("chain_prep_sweep")
    assert f"for task in $(seq 0 {len(SWEEP_LRS) - 1}); do" in text
    assert '-m launcher prepare "$RUN_DIR/tasks/$task/spec.yaml"' in text


def test_hf_home_sets_the_hub_cache_and_offline_mode_in_every_script():
    def scripts(tree: dict[str, Any]) -> list[str]:
        spec = spec_of(tree)
        return [render_sbatch(spec, make_plan(spec), RUN_DIR, python=PYTHON, prepare_step=False),
                *(render_chain_sbatch(spec, k, RUN_DIR, python=PYTHON) for k in render.CHAIN_KINDS)]

    for text in scripts({"cluster": {"gpus_per_node": 1, "hf_home": "/shared/hf cache"}}):
        assert "export HF_HOME='/shared/hf cache'\nexport HF_HUB_OFFLINE=1\n" in text
    for text in scripts({"cluster": {"gpus_per_node": 1}}):
        assert "HF_HOME" not in text and "HF_HUB_OFFLINE" not in text
    # cluster.env comes last and wins
    [train, *_] = scripts({"cluster": {"hf_home": "/shared/hf", "env": {"HF_HUB_OFFLINE": "0"}}})
    assert train.index("export HF_HUB_OFFLINE=1") < train.index("export HF_HUB_OFFLINE=0")


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("tree, words", [
    ({"cluster": {"job_name": "a\nb"}}, "cluster.job_name"),
    ({"name": "x\rtouch p"}, "name"),
    ({"cluster": {"partition": "gpu\n#SBATCH --uid=0"}}, "cluster.partition"),
    ({"cluster": {"job_name": "logs/../x"}}, "'/'"),
    ({"cluster": {"account": "my-hetjob"}}, "hetjob"),
    ({"cluster": {"mem": "200G; touch p"}}, "cluster.mem"),
    ({"cluster": {"array": "0-3"}}, "--sweep"),
    ({"cluster": {"container": {"image": "img", "mounts": ["/a,/b"]}}}, "mounts[0]"),
    ({"cluster": {"container": {"image": "img\nid"}}}, "container.image"),
    ({"cluster": {"hf_home": "~/hf"}}, "cluster.hf_home"),
    ({"cluster": {"hf_home": "hf"}}, "absolute path"),
    ({"cluster": {"prep": {"mem": "1G; touch p"}}}, "cluster.prep.mem"),
    ({"cluster": {"prep": {"partition": "cpu\n#SBATCH --uid=0"}}}, "cluster.prep.partition"),
])
def test_values_that_cannot_be_one_directive_are_refused(tree, words):
    spec = spec_of(tree)
    with pytest.raises(SpecError, match=re.escape(words)):
        render_sbatch(spec, make_plan(spec), RUN_DIR, python=PYTHON)
    for kind in render.CHAIN_KINDS:
        with pytest.raises(SpecError, match=re.escape(words)):
            render_chain_sbatch(spec, kind, RUN_DIR, python=PYTHON)


def test_relative_interpreter_and_bad_run_dir_are_refused():
    spec = spec_of({})
    with pytest.raises(SpecError, match="absolute"):
        render_sbatch(spec, make_plan(spec), RUN_DIR, python="python")
    for bad in ("/runs/a\nb", "/runs/a\\b"):
        with pytest.raises(SpecError, match="control character or a backslash"):
            render_sbatch(spec, make_plan(spec), Path(bad), python=PYTHON)


def test_sweep_tasks_must_share_the_cluster_section():
    spec = spec_of({})
    tasks = [spec, spec_of({"cluster": {"nodes": 2}})]
    with pytest.raises(SpecError, match="one set of #SBATCH"):
        render_sbatch(spec, make_plan(spec), RUN_DIR, python=PYTHON, array_specs=tasks)


def test_template_refuses_a_value_that_was_not_quoted(monkeypatch):
    spec = spec_of({})
    monkeypatch.setattr(render, "sh", lambda v: str(v))  # a renderer that forgot to quote
    with pytest.raises(TypeError, match="unquoted value"):
        render_sbatch(spec, make_plan(spec), RUN_DIR, python=PYTHON)


def test_slurm_command_imports_no_heavy_library(tmp_path):
    # the whole `launcher slurm` path in a fresh interpreter: sweep, data check, the prepared-data check
    # (an empty cache, so a prep job is rendered), the --then chain, and writing the run dir
    code = textwrap.dedent("""\
        import sys
        from launcher.cli import main
        for args in (["--dry-run", "--sweep", "optim.lr=1e-4,2e-4"],
                     ["--method", "lora", "--then", "merge", "--then", "eval"]):
            try:
                main(["slurm", "--out", sys.argv[1], "--force", *args])
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
        heavy = {"torch", "transformers", "deepspeed", "peft", "bitsandbytes", "datasets"}
        print("HEAVY", sorted(heavy & set(sys.modules)), file=sys.stderr)
        """)
    env = {**os.environ, "LAUNCHER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr
    assert "would queue: prepare.sbatch (prep), then job.sbatch (train)" in proc.stderr, proc.stderr
    assert all((tmp_path / "run" / f).is_file() for f in ("prepare.sbatch", "job.sbatch", "merge.sbatch", "eval.sbatch"))


# --------------------------------------------------------------------------- hostile values, run for real

MARK = "pwned"  # a relative name: every hostile command would create it in the sandbox's cwd
HOSTILE = [
    f"x'; touch {MARK} #",
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    f"a; touch {MARK}",
    f'"; touch {MARK}; echo "',
    f"a\\'; touch {MARK} #\\",
    f"' \"$(touch {MARK})\" '",
]
# Values that only ever appear in the script's body may hold newlines too.
HOSTILE_BODY_ONLY = [f"a\ntouch {MARK}\n", f"x'\n$(touch {MARK})\n'"]

_RECORD = r'''#!/bin/bash
# Test stub: records its name, argv and environment (NUL-separated) under $SANDBOX/calls/.
n=$(ls "$SANDBOX/calls" | wc -l)
d="$SANDBOX/calls/$(printf %03d "$n")-${0##*/}"
mkdir -p "$d"
printf '%s\0' "$@" > "$d/argv"
env -0 > "$d/env"
'''
STUBS = {
    # srun: record, drop srun's own --options, run the command as task 0 on node 0
    "srun": _RECORD + r'''while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0 SLURM_NODEID=0
exec "$@"
''',
    # scontrol show job: where the job's log is (the test may write it); anything else: the hosts
    "scontrol": _RECORD + r'''if [ "$1 $2" = "show job" ]; then echo "   StdOut=$SANDBOX/job.out"; exit 0; fi
printf "node-a\nnode-b\n"
''',
    # scancel --signal=SIG JOB: deliver SIG to the waiting stub rank, as Slurm would to the step
    "scancel": _RECORD + r'''[ -f "$SANDBOX/ready" ] && kill -s "${1#--signal=}" "$(cat "$SANDBOX/ready")"
exit 0
''',
    # apptainer exec [--nv] --bind MOUNTS IMAGE CMD...
    "apptainer": _RECORD + r'''shift; [ "$1" = --nv ] && shift; shift 2; shift
exec "$@"
''',
    # the ranks' interpreter: record, then behave as the test asks (STUB_MODE)
    "python": _RECORD + r'''case " $* " in *" launcher prepare "*) exit 0 ;; esac  # the preparation step
case "${STUB_MODE:-}" in
  wait-signal)
    trap 'echo "USR1" >> "$SANDBOX/signals"; exit 3' USR1
    trap 'echo "TERM" >> "$SANDBOX/signals"; exit 3' TERM
    echo $$ > "$SANDBOX/ready"
    for _ in $(seq 100); do sleep 0.1; done
    exit 0 ;;
  requeue|fail-*)  # the markers the ranks leave (MARKER_WRITER, in the spec's run dir); torchrun then exits 1
    "$REAL_PYTHON" "$SANDBOX/write_markers.py" "$(dirname "${@: -1}")" "$STUB_MODE"
    exit 1 ;;
esac
exit 0
''',
}


# The ranks' markers, written by rundir/markers.py as the ranks write them, for this job and attempt
# (launcher.identity reads LAUNCHER_JOB_ID and LAUNCHER_ATTEMPT, which the script exports).
# requeue: global rank 0's marker after a signal; fail-CODE: two ranks started, rank 0 recorded its
# failure with exit code CODE, rank 1 nothing.
MARKER_WRITER = """\
import sys
from launcher import identity
from launcher.rundir import markers

run_dir, mode = sys.argv[1], sys.argv[2]
who = identity.current()
if mode == "requeue":
    name = markers.marker_name(markers.REQUEUE, who.job_key, who.attempt)
    markers.write_marker(run_dir, name, rank=0, node="node-a", reason=markers.REQUEUED, exit_code=3, step=7)
else:
    for rank, node in ((0, "node-a"), (1, "node-b")):
        markers.write_marker(run_dir, markers.marker_name(markers.START, who.job_key, who.attempt, rank),
                             rank=rank, node=node)
    markers.write_marker(run_dir, markers.marker_name(markers.EXIT, who.job_key, who.attempt, 0),
                         rank=0, node="node-a", reason="why", exit_code=int(mode.removeprefix("fail-")))
"""
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class Sandbox:
    """A temp dir with stub srun/scontrol/scancel/apptainer/python on PATH; runs a script with bash."""

    def __init__(self, root: Path, python_dir_name: str = "py"):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        (root / "calls").mkdir()
        for name, text in STUBS.items():
            if name != "python":
                self._write(self.bin / name, text)
        self._write(self.bin / "python3", STUBS["python"])
        pydir = root / python_dir_name
        pydir.mkdir(parents=True)
        self.python = pydir / "python"
        self._write(self.python, STUBS["python"])
        (root / "write_markers.py").write_text(MARKER_WRITER)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "SANDBOX": str(self.root), "HOME": str(self.root),
               "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "4242",
               "SLURM_ARRAY_TASK_ID": "1", "REAL_PYTHON": sys.executable, "PYTHONPATH": str(SOURCE_ROOT)}
        env.update(extra)
        return env

    def start(self, script: str, **env: str) -> subprocess.Popen:
        path = self.root / "job.sbatch"
        path.write_text(script)
        return subprocess.Popen(["bash", str(path)], cwd=self.root, env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, script: str, **env: str) -> subprocess.CompletedProcess:
        proc = self.start(script, **env)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def calls(self, name: str) -> list[tuple[list[str], dict[str, str]]]:
        out = []
        for d in sorted((self.root / "calls").iterdir()):
            if d.name.split("-", 1)[1] == name:
                argv = (d / "argv").read_bytes().decode().split("\0")[:-1]
                env = dict(x.split("=", 1) for x in (d / "env").read_bytes().decode().split("\0")[:-1] if "=" in x)
                out.append((argv, env))
        return out

    def rank_calls(self, name: str) -> list[tuple[list[str], dict[str, str]]]:
        """Calls of the ranks' interpreter, after checking the preparation step ran first, once."""
        calls = self.calls(name)
        prep = [c for c in calls if c[0][:3] == ["-m", "launcher", "prepare"]]
        assert len(prep) == 1 and calls[0] is prep[0], [c[0] for c in calls]
        assert prep[0][0][3] == [c for c in calls if c is not prep[0]][-1][0][-1]  # the same spec file
        return [c for c in calls if c is not prep[0]]

    def marker_files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.name == MARK]


def _hostile_spec(value: str, **cluster: Any) -> RunSpec:
    return spec_of({"name": value, "cluster": {
        "nodes": 2, "gpus_per_node": 2, "partition": value, "account": value, "qos": value, "constraint": value,
        "reservation": value, "dependency": value, "env": {"HOSTILE": value},
        "nccl": {"ib_hca": value}, **cluster}})


def _sandbox_run_dir(sb: Sandbox, value: str) -> Path:
    # The run dir's own name carries the value, less backslashes: they switch off Slurm's %-patterns in
    # --output, so a run dir with one is refused (test_relative_interpreter_and_bad_run_dir_are_refused).
    return sb.root / "runs" / f"run {value.replace(chr(92), '')}"


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_reach_the_job_verbatim_and_run_nothing(tmp_path, value):
    sb = Sandbox(tmp_path, python_dir_name=f"venv {value}/bin")
    run_dir = _sandbox_run_dir(sb, value)
    spec = _hostile_spec(value)
    script = render_sbatch(spec, make_plan(spec), run_dir, python=str(sb.python))

    # what sbatch reads from the #SBATCH lines
    d = directives_of(script)
    for key in ("--job-name", "--partition", "--account", "--qos", "--constraint", "--reservation", "--dependency"):
        assert d[key] == value, key
    assert d["--output"] == str(run_dir / "logs").replace("%", "%%") + "/%x-%j.out"

    # what bash runs: the whole script, with srun/scontrol/python as recording stubs
    proc = sb.run(script)
    assert proc.returncode == 0, proc.stderr
    assert sb.marker_files() == []
    [(argv, env)] = sb.rank_calls("python")
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert argv[-4:] == ["-m", "launcher", "train", str(run_dir / "spec.yaml")]
    assert env["HOSTILE"] == value and env["NCCL_IB_HCA"] == value
    assert env["MASTER_ADDR"] == "node-a" and env["MASTER_PORT"] == str(15000 + 4242 % 15000)
    assert env["PET_NODE_RANK"] == "0" and env["LAUNCHER_COLLECTIVE_TIMEOUT_S"] == "1800"


@pytest.mark.parametrize("value", HOSTILE_BODY_ONLY)
def test_newlines_in_environment_values_arrive_verbatim(tmp_path, value):
    sb = Sandbox(tmp_path)
    spec = spec_of({"cluster": {"nodes": 2, "gpus_per_node": 1, "env": {"HOSTILE": value}, "nccl": {"ib_hca": value}}})
    proc = sb.run(render_sbatch(spec, make_plan(spec), sb.root / "run", python=str(sb.python)))
    assert proc.returncode == 0, proc.stderr
    assert sb.marker_files() == []
    [(_, env)] = sb.rank_calls("python")
    assert env["HOSTILE"] == value and env["NCCL_IB_HCA"] == value


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_container_values_arrive_verbatim(tmp_path, runtime, value):
    sb = Sandbox(tmp_path)
    run_dir = _sandbox_run_dir(sb, value)
    spec = spec_of({"cluster": {"nodes": 2, "gpus_per_node": 2, "container": {
        "runtime": runtime, "image": value, "mounts": [f"/data/{value}:/data"]}}})
    proc = sb.run(render_sbatch(spec, make_plan(spec), run_dir, python="/unused/python"))
    assert proc.returncode == 0, proc.stderr
    assert sb.marker_files() == []
    mounts = f"{run_dir}:{run_dir},/data/{value}:/data"
    [(py_argv, _)] = sb.rank_calls("python3")
    assert py_argv[-1] == str(run_dir / "spec.yaml")
    sruns = sb.calls("srun")  # the preparation step, then the ranks: both inside the container
    assert len(sruns) == 2
    if runtime == "pyxis":
        for srun_argv, _ in sruns:
            assert f"--container-image={value}" in srun_argv and f"--container-mounts={mounts}" in srun_argv
    else:
        apps = sb.calls("apptainer")
        assert len(apps) == 2
        for app_argv, _ in apps:
            assert app_argv[:5] == ["exec", "--nv", "--bind", mounts, value]


_CHAIN_ARGV = {
    "prep": lambda rd: ["-m", "launcher", "prepare", str(rd / "spec.yaml")],
    "merge": lambda rd: ["-m", "launcher", "merge", str(rd), "--out", str(rd / "merged"), "--force"],
    "eval": lambda rd: ["-m", "launcher", "eval", str(rd)],
}


@pytest.mark.parametrize("kind", render.CHAIN_KINDS)
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_reach_the_chain_jobs_verbatim_and_run_nothing(tmp_path, kind, value):
    sb = Sandbox(tmp_path, python_dir_name=f"venv {value}/bin")
    run_dir = _sandbox_run_dir(sb, value)
    spec = _hostile_spec(value, hf_home=f"/hf/{value}", prep={"partition": value})
    script = render_chain_sbatch(spec, kind, run_dir, python=str(sb.python))

    d = directives_of(script)
    assert d["--job-name"] == f"{value}-{kind}"
    for key in ("--partition", "--account", "--qos", "--constraint", "--reservation"):
        assert d[key] == value, key
    assert d.get("--dependency") == (value if kind == "prep" else None)
    assert d["--output"] == str(run_dir / "logs").replace("%", "%%") + "/%x-%j.out"

    proc = sb.run(script)
    assert proc.returncode == 0, proc.stderr
    assert sb.marker_files() == []
    [(argv, env)] = sb.calls("python")
    assert argv == _CHAIN_ARGV[kind](run_dir)
    assert env["HOSTILE"] == value and env["HF_HOME"] == f"/hf/{value}" and env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
@pytest.mark.parametrize("kind", ["prep", "eval"])
def test_hostile_container_values_reach_the_chain_jobs_verbatim(tmp_path, runtime, kind):
    value = HOSTILE[1]
    sb = Sandbox(tmp_path)
    run_dir = _sandbox_run_dir(sb, value)
    spec = spec_of({"cluster": {"gpus_per_node": 2, "container": {
        "runtime": runtime, "image": value, "mounts": [f"/data/{value}:/data"]}}})
    proc = sb.run(render_chain_sbatch(spec, kind, run_dir, python="/unused/python"))
    assert proc.returncode == 0, proc.stderr
    assert sb.marker_files() == []
    [(py_argv, _)] = sb.calls("python3")
    assert py_argv == _CHAIN_ARGV[kind](run_dir)
    mounts = f"{run_dir}:{run_dir},/data/{value}:/data"
    [(srun_argv, _)] = sb.calls("srun")
    if runtime == "pyxis":
        assert f"--container-image={value}" in srun_argv and f"--container-mounts={mounts}" in srun_argv
    else:
        [(app_argv, _)] = sb.calls("apptainer")
        nv = ["--nv"] if kind == "eval" else []  # the eval job has the run's GPU; prep is CPU work
        assert app_argv[:4 + len(nv)] == ["exec", *nv, "--bind", mounts, value]


@pytest.mark.parametrize("mode, status", [("", 0), ("fail-2", 1)])
def test_chain_job_ends_with_its_commands_status_and_says_so_in_its_log(tmp_path, mode, status):
    sb = Sandbox(tmp_path)
    proc = sb.run(render_chain_sbatch(spec_of({}), "eval", sb.root / "run", python=str(sb.python)), STUB_MODE=mode)
    assert proc.returncode == status
    assert proc.stderr.splitlines()[-1] == f"launcher: job step ended with status {status}"  # what status reads


def test_srun_launcher_exports_rank_variables_from_slurm(tmp_path):
    sb = Sandbox(tmp_path)
    spec = spec_of({"cluster": {"launcher": "srun", "nproc_per_node": 2, "nodes": 2}})
    proc = sb.run(render_sbatch(spec, make_plan(spec), sb.root / "run", python=str(sb.python)))
    assert proc.returncode == 0, proc.stderr
    [(argv, env)] = sb.rank_calls("python")
    assert argv == ["-m", "launcher", "train", str(sb.root / "run" / "spec.yaml")]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("0", "2", "0", "2")
    prep_srun, (srun_argv, _) = sb.calls("srun")
    assert "--ntasks=1" in prep_srun[0] and "--nodes=1" in prep_srun[0]
    assert "--ntasks-per-node=2" in srun_argv and "--nodes=2" in srun_argv


def test_array_task_trains_its_own_spec(tmp_path):
    sb = Sandbox(tmp_path)
    spec = spec_of({"cluster": {"nodes": 2}})
    tasks = [validate({"cluster": {"nodes": 2}, "optim": {"lr": lr}}) for lr in (1e-4, 2e-4)]
    proc = sb.run(render_sbatch(spec, make_plan(spec), sb.root / "run", python=str(sb.python), array_specs=tasks))
    assert proc.returncode == 0, proc.stderr
    [(argv, _)] = sb.rank_calls("python")
    assert argv[-1] == str(sb.root / "run" / "tasks" / "1" / "spec.yaml")  # SLURM_ARRAY_TASK_ID=1


def test_wrong_node_count_stops_before_launch(tmp_path):
    sb = Sandbox(tmp_path)
    spec = spec_of({"cluster": {"nodes": 2}})
    proc = sb.run(render_sbatch(spec, make_plan(spec), sb.root / "run", python=str(sb.python)),
                  SLURM_JOB_NUM_NODES="3")
    assert proc.returncode == 2 and "rendered for 2 node(s)" in proc.stderr
    assert sb.calls("srun") == []


def _start_waiting_job(sb: Sandbox) -> subprocess.Popen:
    spec = spec_of({"cluster": {"nodes": 2}})
    proc = sb.start(render_sbatch(spec, make_plan(spec), sb.root / "run", python=str(sb.python)),
                    STUB_MODE="wait-signal")
    deadline = time.monotonic() + 20
    while not (sb.root / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the stub rank never started"
        time.sleep(0.05)
    return proc


def test_batch_shell_relays_usr1_to_the_step_and_waits_for_it(tmp_path):
    sb = Sandbox(tmp_path)
    proc = _start_waiting_job(sb)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert (sb.root / "signals").read_text() == "USR1\n"
    assert proc.returncode == 3, err  # the step's status, after it finished
    assert "relaying it to the job step" in err and "job step ended with status 3" in err


def test_batch_shell_relays_term_through_scancel_and_survives(tmp_path):
    sb = Sandbox(tmp_path)
    proc = _start_waiting_job(sb)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    # srun would turn a TERM into SIGKILL for its tasks: the relay goes through scancel instead
    [(argv, _)] = sb.calls("scancel")
    assert argv == ["--signal=TERM", "4242"]
    assert (sb.root / "signals").read_text() == "TERM\n"
    assert proc.returncode == 3 and "job step ended with status 3" in err  # the shell outlived its TERM


def test_sbatch_quote_round_trips_through_sbatchs_parser():
    for value in HOSTILE + ["plain", "a b", "100%", "tab\\t", 'q"q', "#x"]:
        assert sbatch_args(f"#SBATCH --job-name={sbatch_quote(value)}") == [f"--job-name={value}"]


# --------------------------------------------------------------------------- requeue and retry decisions

def _requeue_script(sb: Sandbox, **cluster: Any) -> str:
    spec = spec_of({"cluster": {"nodes": 2, **cluster}})
    return render_sbatch(spec, make_plan(spec), sb.root / "run", python=str(sb.python))


def _jobs(sb: Sandbox) -> list[dict[str, Any]]:
    return read_jobs(sb.root / "run")  # the lines the script appended, read as status and cost read them


def test_requeue_marker_requeues_the_job_until_max_requeues_is_spent(tmp_path):
    sb = Sandbox(tmp_path)
    script = _requeue_script(sb, max_requeues=2)
    for attempt in range(3):
        proc = sb.run(script, STUB_MODE="requeue", SLURM_RESTART_COUNT=str(attempt))
        assert proc.returncode == 3, proc.stderr
    requeues = [argv for argv, _ in sb.calls("scontrol") if argv[:1] == ["requeue"]]
    assert requeues == [["requeue", "4242"], ["requeue", "4242"]]  # attempts 0 and 1; attempt 2 is over budget
    assert [(j["job_id"], j["kind"], j["attempt"]) for j in _jobs(sb)] == [("4242", "requeue", 0), ("4242", "requeue", 1)]
    assert "stopped at step 7" in _jobs(sb)[0]["reason"]
    assert "not requeueing: 2 of cluster.max_requeues=2 used" in proc.stderr


def test_requeue_off_leaves_the_job_ended_with_exit_3(tmp_path):
    sb = Sandbox(tmp_path)
    proc = sb.run(_requeue_script(sb, requeue=False), STUB_MODE="requeue")
    assert proc.returncode == 3 and "cluster.requeue is false" in proc.stderr
    assert [argv for argv, _ in sb.calls("scontrol") if argv[:1] == ["requeue"]] == []


def test_failed_step_is_retried_within_max_retries_naming_the_silent_rank(tmp_path):
    sb = Sandbox(tmp_path)
    script = _requeue_script(sb, max_retries=1)
    first = sb.run(script, STUB_MODE="fail-1")
    assert "rank 0 on node-a: why (exit 1)" in first.stderr
    assert "rank 1 on node-b ended without an exit record" in first.stderr
    assert "requeueing job 4242 (retry 1 of 1)" in first.stderr
    second = sb.run(script, STUB_MODE="fail-1", SLURM_RESTART_COUNT="1")
    assert second.returncode == 1 and "not requeueing: 1 of cluster.max_retries=1 used" in second.stderr
    assert [j["kind"] for j in _jobs(sb)] == ["retry"]


# What a rank's log shows when NCCL's C++ watchdog aborts it (torch 2.13, ProcessGroupNCCL): no Python
# exception, no exit marker, SIGABRT.
NCCL_ABORT_LOG = """\
[rank1]:[E1205 10:31:02.345678 4242 torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:632] [Rank 1] Watchdog caught \
collective operation timeout: WorkNCCL(SeqNum=41, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=1800000) ran \
for 1800089 milliseconds before timing out.
[rank1]:[E1205 10:31:02.346000 4242 torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:2168] [PG ID 0 PG GUID 0(default_pg) \
Rank 1]  failure detected by watchdog at work sequence id: 41 PG status: last enqueued work: 41, last completed work: 40
[rank1]:[E1205 10:31:02.346100 4242 torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:681] [Rank 1] To avoid data \
inconsistency, we are taking the entire process down.
[rank1]:terminate called after throwing an instance of 'c10::DistBackendError'
[rank1]:  what():  [PG ID 0 PG GUID 0(default_pg) Rank 1] Process group watchdog thread terminated with exception: \
[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=41, OpType=ALLREDUCE) ran for 1800089 milliseconds
[rank1]:Fatal Python error: Aborted
E1205 10:31:05.000000 4100 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: -6) local_rank: 1 \
(pid: 4242) of binary: /opt/venv/bin/python
"""


def test_a_rank_nccls_watchdog_aborted_is_a_collective_timeout_not_a_kill(tmp_path):
    from launcher.ops import reasons

    sb = Sandbox(tmp_path)
    (tmp_path / "job.out").write_text(NCCL_ABORT_LOG)
    proc = sb.run(_requeue_script(sb, max_retries=1), STUB_MODE="fail-1")
    assert "rank 1 on node-b ended without an exit record: collective timeout (the log shows NCCL's watchdog" \
        in proc.stderr, proc.stderr
    assert "killed (SIGKILL" not in proc.stderr
    assert "requeueing job 4242 (retry 1 of 1)" in proc.stderr  # transient: retried
    # launcher status reads the same log (with the script's summary line after it) as a collective timeout
    log = NCCL_ABORT_LOG + proc.stderr
    reason, line = reasons.classify("FAILED", 1, None, log)
    assert reason == reasons.COLLECTIVE_TIMEOUT and "Watchdog caught collective operation timeout" in line
    assert reason in reasons.TRANSIENT
    # without the line, the same silent rank is still called killed
    (tmp_path / "job.out").write_text("")
    proc = sb.run(_requeue_script(sb), STUB_MODE="fail-1", SLURM_JOB_ID="4243")
    assert "rank 1 on node-b ended without an exit record: killed (SIGKILL" in proc.stderr


@pytest.mark.parametrize("code", [2, 5])
def test_out_of_memory_and_bad_input_are_not_retried(tmp_path, code):
    sb = Sandbox(tmp_path)
    proc = sb.run(_requeue_script(sb, max_retries=3), STUB_MODE=f"fail-{code}")
    assert proc.returncode == code and "not retrying" in proc.stderr
    assert [argv for argv, _ in sb.calls("scontrol") if argv[:1] == ["requeue"]] == [] and _jobs(sb) == []


def test_without_scontrol_a_requeue_request_ends_cleanly_with_how_to_resume(tmp_path):
    sb = Sandbox(tmp_path)
    (sb.bin / "scontrol").unlink()
    tools = tmp_path / "tools"  # the shell's utilities, without Slurm's (this machine may have them in /usr/bin)
    tools.mkdir()
    for tool in ("bash", "sed", "grep", "date", "head", "ls", "wc", "mkdir", "env", "cat", "seq", "sleep", "dirname"):
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    spec = spec_of({"cluster": {"nodes": 1}})
    script = render_sbatch(spec, make_plan(spec), sb.root / "run", python=str(sb.python))
    proc = sb.run(script, STUB_MODE="requeue", PATH=f"{sb.bin}:{tools}", SLURM_JOB_NUM_NODES="1",
                  SLURM_JOB_NODELIST="node-a")
    assert proc.returncode == 0, proc.stderr
    assert "scontrol is not on the PATH here" in proc.stderr and "sbatch " in proc.stderr
    assert _jobs(sb) == []
