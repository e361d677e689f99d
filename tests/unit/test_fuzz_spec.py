"""Property: whatever YAML and flags a user writes, `launcher spec/config/estimate` answer 0 or 2,
never a traceback. Runs the real `main()` in-process (exit code and stderr as a user sees them)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import string
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import main
from launcher.config.spec import RunSpec

SECTIONS = {name: sorted(f.annotation.model_fields) if hasattr(f.annotation, "model_fields") else None
            for name, f in RunSpec.model_fields.items()}
HOSTILE = ["x'; touch /tmp/p #", "$(id)", "`id`", "a\nb", ";", "..", "/", "", " ", "\x00", "🚀", "1e-4", "24:00:00",
           "-1", "nan", "inf", "None", "~", "*", "&a", "!!python/object:os.system"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE), st.text(string.printable, max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(string.ascii_lowercase, max_size=6),
                                                                       inner, max_size=3)), max_leaves=6)


@st.composite
def spec_trees(draw):
    tree = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS) + ["bogus"]), max_size=5, unique=True)):
        keys = SECTIONS.get(section)
        if keys is None or draw(st.booleans()) and draw(st.booleans()):
            tree[section] = draw(values)
        else:
            sub = {}
            for key in draw(st.lists(st.sampled_from(keys + ["bogus_key"]), max_size=4, unique=True)):
                sub[key] = draw(values)
            tree[section] = sub
    return tree


FLAGS = {"--zero": st.sampled_from(["0", "1", "2", "3", "4", "-1", "x"]),
         "--precision": st.sampled_from(["bf16", "fp16", "fp32", "fp8"]),
         "--micro-batch": st.sampled_from(["1", "2", "3", "0", "-5", "1e3"]),
         "--global-batch": st.sampled_from(["1", "7", "64", "0", "huge"]),
         "--nproc": st.sampled_from(["1", "2", "3", "0"]), "--gpus-per-node": st.sampled_from(["0", "2", "8", "99"]),
         "--offload-param": st.sampled_from(["none", "cpu", "nvme", "disk"]),
         "--offload-optimizer": st.sampled_from(["none", "cpu", "nvme"]),
         "--lr": st.sampled_from(["1e-4", "0", "-1", "abc"]), "--seq-len": st.sampled_from(["8", "64", "4096", "0"]),
         "--method": st.sampled_from(["full", "lora", "qlora", "dora"]),
         "--set": st.sampled_from(["optim.lr=1e-3", "zero.stage=3", "x=1", "cluster.time=24:00:00", "bad",
                                   "method.lora.target_modules=[q_proj]", "zero.extra={fp16: {enabled: true}}",
                                   "cluster.env={A: $(id)}", "data.seq_len=999999999"])}


@st.composite
def flag_lists(draw):
    out = []
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=5)):
        out += [flag, draw(FLAGS[flag])]
    return out


def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            return exc.code, err.getvalue()
    return 0, err.getvalue()  # an exception other than SystemExit fails the test with its traceback


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=spec_trees(), flags=flag_lists(), command=st.sampled_from(["spec", "config", "estimate"]),
       raw=st.one_of(st.none(), st.text(max_size=40)))
def test_any_spec_and_flags_exit_0_or_2_without_traceback(tmp_path_factory, tree, flags, command, raw):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    try:
        text = raw if raw is not None else yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:
        text = "{}"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    code, err = run([command, str(path), *flags])
    assert code in (0, 2), f"exit {code} for {command} {flags}\n{text}\n{err}"
    assert "Traceback" not in err, err
    if code == 2:
        assert err.strip(), "exit 2 must say why"


# --------------------------------------------------------------------------- cluster profiles

PROFILE_KEYS = ["account", "qos", "default_partition", "partitions", "container", "container_runtime", "setup",
                "net_ifname", "nccl", "env", "hf_home", "bogus"]
PARTITION_KEYS = ["gpu_type", "gpus_per_node", "cpus_per_node", "mem_per_node", "max_time", "max_nodes",
                  "usd_per_gpu_hour", "usd_per_node_hour", "usd_per_cpu_hour", "bogus"]


@st.composite
def profile_files(draw):
    def partition():
        if draw(st.integers(0, 5)) == 0:
            return draw(values)
        return {k: draw(values) for k in draw(st.lists(st.sampled_from(PARTITION_KEYS), max_size=4, unique=True))}

    entry = {}
    for key in draw(st.lists(st.sampled_from(PROFILE_KEYS), max_size=4, unique=True)):
        if key == "partitions" and draw(st.booleans()):
            names = draw(st.lists(st.one_of(st.sampled_from(["gpu", "cpu", "a100"]), st.integers(0, 3)), max_size=3,
                                  unique=True))
            entry[key] = {n: partition() for n in names}
        else:
            entry[key] = draw(values)
    lab = entry if draw(st.integers(0, 6)) else draw(values)
    return {"lab": lab, **({draw(st.one_of(st.integers(0, 9), st.text(string.ascii_lowercase, max_size=4))):
                            draw(values)} if draw(st.booleans()) else {})}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(profiles=profile_files(), command=st.sampled_from(["spec", "config", "estimate"]),
       partition=st.sampled_from([None, "gpu", "cpu", "0"]))
def test_any_cluster_profile_exits_0_or_2_without_traceback(tmp_path_factory, profiles, command, partition):
    path = tmp_path_factory.mktemp("fuzz") / "clusters.yaml"
    try:
        text = yaml.safe_dump(profiles, allow_unicode=True)
    except yaml.YAMLError:
        text = "{}"
    path.write_text(text)
    argv = [command, "--cluster", "lab", "--clusters", str(path)] + (["--partition", partition] if partition else [])
    code, err = run(argv)
    assert code in (0, 2), f"exit {code} for {argv}\n{text}\n{err}"
    assert "Traceback" not in err, err
    if code == 2:
        assert err.startswith(("error: ", "Usage: ")) and err.strip(), err


# --------------------------------------------------------------------------- run-dir readers

RUN_DIR_FILES = ["jobs.jsonl", "manifest.json", "spec.yaml", "logs/metrics.jsonl"]
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                                     st.floats(allow_nan=False), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(
                                                       ["job_id", "kind", "step", "loss", "final", "attempts",
                                                        "created", "plan", "name", "optim", "start_step",
                                                        "end_step", "tokens_per_step", "exit_reason", "x"]),
                                                       inner, max_size=4)), max_leaves=8)
file_contents = st.one_of(
    st.lists(json_values, max_size=4).map(lambda xs: "\n".join(json.dumps(x) for x in xs).encode()),
    json_values.map(lambda x: json.dumps(x).encode()),
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@pytest.fixture(scope="module")
def template_run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for tool in ("squeue", "sacct", "scontrol", "scancel", "sinfo"):  # Slurm that answers nothing
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    code, err = run(["slurm", "--out", str(root / "rd")])
    assert code == 0, err
    return root


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(damaged=st.dictionaries(st.sampled_from(RUN_DIR_FILES), file_contents, min_size=1, max_size=4),
       command=st.sampled_from([["status"], ["status", "--json"], ["cost"], ["cancel"], ["logs"], ["runs"]]))
def test_any_run_dir_file_leaves_readers_at_0_or_2_without_traceback(tmp_path_factory, template_run_dir, damaged,
                                                                      command):
    root = tmp_path_factory.mktemp("fuzz")
    rd = root / "rd"
    shutil.copytree(template_run_dir / "rd", rd)
    for rel, content in damaged.items():
        (rd / rel).write_bytes(content)
    target = str(root) if command == ["runs"] else str(rd)
    with mock.patch.dict(os.environ, {"PATH": f"{template_run_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"}):
        code, err = run([*command, target])
    assert code in (0, 2), f"exit {code} for {command} with {damaged}\n{err}"
    assert "Traceback" not in err, err
