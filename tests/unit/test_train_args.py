"""The Trainer's arguments and the DeepSpeed JSON agree (micro batch, accumulation, precision and the
optimizer/schedule numbers transformers cross-checks), and the local launch command is what it says.

The agreement is judged by transformers' own check (HfTrainerDeepSpeedConfig.trainer_config_process /
trainer_config_finalize, the code that refuses a mismatch at train time), at the plan's world size.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.config.resolve import resolve
from launcher.errors import UserError
from launcher.plan.plan import make_plan
from launcher.rank.loop import check_world_size, resume_point, training_arguments_kwargs
from launcher.render.deepspeed import render
from launcher.rundir.checkpoints import COMPLETE_MARKER, incomplete_checkpoints, is_complete, newest_checkpoint
from launcher.rundir.metrics import format_step, parse_step_lines
from launcher.submit.local import DEEPSPEED_CHATTER, launch_command

CASES = [
    # (flags, sets)
    ({"precision": "fp32", "micro_batch": 4}, []),
    ({"precision": "bf16", "micro_batch": 2, "global_batch": 16, "nproc_per_node": 2}, []),
    ({"precision": "fp16", "micro_batch": 1, "global_batch": 24, "nproc_per_node": 4, "gpus_per_node": 4,
      "zero": 3}, ["optim.warmup_steps=5", "optim.scheduler=linear"]),
    ({"precision": "bf16", "micro_batch": 3, "global_batch": 48, "nodes": 2, "nproc_per_node": 8,
      "gpus_per_node": 8}, ["optim.scheduler=constant", "optim.weight_decay=0.1", "optim.grad_clip=0.5"]),
    ({"precision": "bf16", "method": "lora", "task": "sft", "zero": 2}, ["optim.warmup_steps=0"]),
]


def _spec(flags, sets, tmp_path):
    return resolve(None, flags={**flags, "output_dir": str(tmp_path / "run")}, sets=sets)


@pytest.mark.parametrize("flags,sets", CASES)
def test_kwargs_match_the_deepspeed_json(flags, sets, tmp_path):
    spec = _spec(flags, sets, tmp_path)
    plan = make_plan(spec)
    ds = render(spec, plan)
    kw = training_arguments_kwargs(spec, plan, ds)
    assert kw["per_device_train_batch_size"] == ds["train_micro_batch_size_per_gpu"] == plan.micro_batch
    assert kw["gradient_accumulation_steps"] == ds["gradient_accumulation_steps"] == plan.grad_accum
    assert (kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] * plan.world_size
            == ds["train_batch_size"] == plan.global_batch)
    assert kw["bf16"] is (spec.precision.dtype == "bf16") is ds["bf16"]["enabled"]
    assert kw["fp16"] is (spec.precision.dtype == "fp16") is ds["fp16"]["enabled"]
    assert kw["deepspeed"] is ds  # the very dict, not a re-render
    assert kw["max_steps"] == plan.max_steps
    assert kw["use_cpu"] is (plan.device == "cpu")


class _AtWorld:
    """TrainingArguments seen at another world size (the unit test runs in one process)."""

    def __init__(self, args, world_size):
        self._args, self.world_size = args, world_size

    def __getattr__(self, name):
        return getattr(self._args, name)


@pytest.mark.parametrize("flags,sets", CASES)
def test_transformers_finds_no_mismatch(flags, sets, tmp_path):
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    spec = _spec(flags, sets, tmp_path)
    plan = make_plan(spec)
    ds = render(spec, plan)
    kw = training_arguments_kwargs(spec, plan, ds)
    kw.update(deepspeed=copy.deepcopy(ds), use_cpu=True, report_to="none")
    if kw["fp16"]:
        kw["fp16"] = False  # TrainingArguments refuses fp16 without a GPU; check the flag by hand instead
        assert ds["fp16"]["enabled"]
    args = TrainingArguments(**kw)
    at = _AtWorld(args, plan.world_size)
    at.fp16 = kw["fp16"] or ds["fp16"]["enabled"]
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(ds))
    hf.trainer_config_process(at)
    hf.trainer_config_finalize(at, SimpleNamespace(config=SimpleNamespace(hidden_size=256)), plan.max_steps)
    assert hf.mismatches == []


def test_a_mismatch_is_caught_by_the_same_check(tmp_path):
    """The check above can fail: a Trainer micro batch that differs from the JSON is reported."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    spec = _spec({"precision": "fp32", "micro_batch": 4}, [], tmp_path)
    plan = make_plan(spec)
    ds = render(spec, plan)
    kw = training_arguments_kwargs(spec, plan, ds)
    kw.update(deepspeed=copy.deepcopy(ds), per_device_train_batch_size=2, report_to="none")
    args = TrainingArguments(**kw)
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(ds))
    hf.trainer_config_process(args)
    assert any("train_micro_batch_size_per_gpu" in m for m in hf.mismatches)


def _expected_lr(sched: str, lr: float, warmup: int, total: int, floor: float, step: int) -> float:
    """The lr optimizer step `step` (1-based) runs at, written out from the schedule's definition: a linear
    warmup from 0 over `warmup` steps (step 1 at 0), then linear decay to 0, half a cosine down to floor x lr,
    or constant, reaching the end at step `total` + 1."""
    import math

    s = step - 1  # optimizer steps taken before this one
    if s < warmup:
        return lr * s / warmup
    progress = (s - warmup) / (total - warmup)
    if sched == "linear":
        return lr * (1 - progress)
    if sched == "cosine":
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr


@pytest.mark.parametrize("sched", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_at_every_step_is_the_schedules_own(tmp_path, sched, warmup):
    """The Trainer builds the schedule from these arguments (get_scheduler, as Trainer.create_scheduler does),
    DeepSpeed steps it once per optimizer step: the lr of every step is the schedule's, step 1 included (0
    after a warmup, the peak without one). DeepSpeed's own WarmupCosineLR, as rendered before, ran steps
    1 and 2 at 0 and lagged one step behind (0, 0, .33, .67, .91 for 0, .33, .67, 1, .91 here)."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    spec = _spec({"precision": "fp32"}, [f"optim.scheduler={sched}", f"optim.warmup_steps={warmup}",
                                          "optim.max_steps=8", "optim.lr=0.5", "optim.min_lr_ratio=0.1"], tmp_path)
    plan = make_plan(spec)
    ds = render(spec, plan)
    assert "scheduler" not in ds
    args = TrainingArguments(**{**training_arguments_kwargs(spec, plan, ds), "deepspeed": None, "report_to": "none"})
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=args.learning_rate)
    schedule = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(plan.max_steps),
                             num_training_steps=plan.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    for step in range(1, plan.max_steps + 1):
        want = _expected_lr(sched, 0.5, warmup, 8, 0.1, step)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), (step, want)
        opt.step()
        schedule.step()


def test_logging_checkpoints_and_tensorboard(tmp_path):
    spec = _spec({"precision": "fp32", "save_every": 5}, ["output.keep_last=3", "output.log_every=7"], tmp_path)
    plan = make_plan(spec)
    kw = training_arguments_kwargs(spec, plan, render(spec, plan))
    assert kw["save_strategy"] == "steps" and kw["save_steps"] == 5 and kw["save_total_limit"] == 3
    assert kw["logging_steps"] == 7
    assert kw["output_dir"] == str(tmp_path / "run" / "checkpoints")
    assert kw["report_to"] == ["tensorboard"] and "logging_dir" not in kw
    spec0 = _spec({"precision": "fp32"}, ["output.tensorboard=false"], tmp_path)
    kw0 = training_arguments_kwargs(spec0, make_plan(spec0), render(spec0, make_plan(spec0)))
    assert kw0["save_strategy"] == "no" and kw0["report_to"] == "none"


def _world(argv):
    """The world info DeepSpeed's launcher gets, decoded as it decodes it."""
    import base64
    import json

    arg = next(a for a in argv if a.startswith("--world_info="))
    return json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))


def test_launch_command_cpu(tmp_path):
    spec = _spec({"precision": "fp32", "nproc_per_node": 2}, [], tmp_path)
    plan = make_plan(spec)
    argv, env = launch_command(tmp_path / "run", plan, 2, master_port=29123, base_env={"PATH": "/bin"}, cpu_count=8)
    assert argv[:4] == [sys.executable, "-u", "-m", "launcher.submit.nodelaunch"]  # deepspeed.launcher.launch
    assert _world(argv) == {"localhost": [0, 1]}
    assert "--master_port=29123" in argv and "--node_rank=0" in argv
    assert "--no_local_rank" in argv
    i = argv.index("--module")
    assert argv[i + 1:] == ["launcher", "train", str(tmp_path / "run" / "spec.yaml")]
    assert env["OMP_NUM_THREADS"] == "4"  # 8 cores / 2 ranks
    assert env["DS_ACCELERATOR"] == "cpu"  # DeepSpeed does not guess (and say so)
    assert env["PATH"] == "/bin"
    pkg_root = str(Path(__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(":")[0] == pkg_root


def test_launch_command_is_what_deepspeeds_launcher_parses(tmp_path):
    """DeepSpeed's own parser reads the argv as meant: the module and its arguments after the options."""
    import importlib

    launch = importlib.import_module("deepspeed.launcher.launch")
    plan = make_plan(_spec({"precision": "fp32", "nproc_per_node": 2}, [], tmp_path))
    argv, _ = launch_command(Path("/r"), plan, 2, master_port=29123, base_env={}, quiet=True)
    old = sys.argv
    sys.argv = argv[3:]
    try:
        args = launch.parse_args()
    finally:
        sys.argv = old
    assert (args.node_rank, args.master_addr, args.master_port) == (0, "127.0.0.1", 29123)
    assert args.module and args.no_local_rank and args.log_level == "warning"
    assert [args.training_script, *args.training_script_args] == ["launcher", "train", str(Path("/r") / "spec.yaml")]


def test_launch_command_gpu_keeps_threads_and_user_env(tmp_path):
    spec = _spec({"precision": "bf16", "nproc_per_node": 4, "gpus_per_node": 4}, [], tmp_path)
    plan = make_plan(spec)
    argv, env = launch_command(tmp_path / "run", plan, 4, base_env={"PYTHONPATH": "/x", "OMP_NUM_THREADS": "7"})
    assert _world(argv) == {"localhost": [0, 1, 2, 3]}
    assert env["OMP_NUM_THREADS"] == "7"
    assert env["PYTHONPATH"].endswith(":/x")
    assert env["DS_ACCELERATOR"] == "cuda"
    assert "--log_level=warning" not in argv
    argv_q, env_q = launch_command(tmp_path / "run", plan, 4, base_env={}, quiet=True)
    assert "--log_level=warning" in argv_q


def test_launch_command_passes_the_users_visible_gpus_through(tmp_path):
    """The GPUs the user made visible are the world info's, the first N of them as written (what the real
    launcher then makes visible to each rank: test_training.py, test_deepspeeds_launcher_gives_each_rank_...)."""
    spec = _spec({"precision": "bf16", "nproc_per_node": 2, "gpus_per_node": 2}, [], tmp_path)
    plan = make_plan(spec)
    argv, env = launch_command(tmp_path / "run", plan, 2, base_env={"CUDA_VISIBLE_DEVICES": "2,3,5"})
    assert _world(argv) == {"localhost": [2, 3]}
    mig = "MIG-4f1c2d3e-aaaa,MIG-4f1c2d3e-bbbb"
    assert _world(launch_command(tmp_path / "run", plan, 2, base_env={"CUDA_VISIBLE_DEVICES": mig})[0]) == \
        {"localhost": mig.split(",")}
    # nothing set: GPUs 0..N-1; CPU ranks are slots, whatever the variable says
    assert _world(launch_command(tmp_path / "run", plan, 2, base_env={})[0]) == {"localhost": [0, 1]}
    cpu = make_plan(_spec({"precision": "fp32", "nproc_per_node": 2}, [], tmp_path))
    assert _world(launch_command(tmp_path / "run", cpu, 2, base_env={"CUDA_VISIBLE_DEVICES": "1"})[0]) == \
        {"localhost": [0, 1]}


@pytest.mark.parametrize("visible, words", [("", "hides every GPU"), ("1", "1 GPU(s) visible")])
def test_launch_command_refuses_visible_devices_it_cannot_honour(tmp_path, visible, words):
    plan = make_plan(_spec({"precision": "bf16", "nproc_per_node": 2, "gpus_per_node": 2}, [], tmp_path))
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES") as exc:
        launch_command(tmp_path / "run", plan, 2, base_env={"CUDA_VISIBLE_DEVICES": visible})
    assert words in str(exc.value)


@pytest.mark.parametrize("line, chatter", [
    ("[2026-12-05 08:36:02,360] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will proceed", True),
    ("[2026-12-05 08:36:08,164] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0]}", True),
    ("[2026-12-05 08:35:59,271] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.", True),
    ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", True),
    ("Time to load cpu_adam op: 2.53 seconds", True),
    # what a user can act on stays on the terminal
    ("[2026-12-05 08:36:08,164] [ERROR] [launch.py:321:sigkill_handler] exits with return code = 1", False),
    ("[2026-12-05 08:36:08,164] [WARNING] [engine.py:1200:_configure] gradient clipping with fp16 is unsupported", False),
    ("UserWarning: OMP_NUM_THREADS/MKL_NUM_THREADS unset", False),
    ("step 5/120 loss 6.1 lr 3.0e-03 tokens/s 1,024", False),
])
def test_quiet_launch_keeps_deepspeed_launcher_chatter_off_the_terminal_only(line, chatter):
    assert bool(DEEPSPEED_CHATTER.match(line)) is chatter


def test_world_size_check(tmp_path):
    spec = _spec({"precision": "fp32", "nproc_per_node": 2}, [], tmp_path)
    plan = make_plan(spec)
    check_world_size(plan, {"WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="WORLD_SIZE=3.*plan is for 2"):
        check_world_size(plan, {"WORLD_SIZE": "3"})
    with pytest.raises(UserError):
        check_world_size(plan, {})  # no launcher: one process


def test_newest_complete_checkpoint(tmp_path):

    assert newest_checkpoint(tmp_path / "none") is None
    for n, complete in ((5, True), (20, True), (100, False), (9, True)):
        d = tmp_path / f"checkpoint-{n}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")  # every one has it, even the one cut off
        if complete:
            (d / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"


def test_trainer_state_without_the_completion_marker_is_not_a_complete_checkpoint(tmp_path):
    """rank 0 writes trainer_state.json while other ranks may still write their shards: only the marker,
    written last after a barrier, makes a checkpoint complete, for auto resume and for an explicit path."""
    from launcher.rank.checkpoint import prune

    cps = tmp_path / "run" / "checkpoints"
    good, cut = cps / "checkpoint-2", cps / "checkpoint-4"
    for d in (good, cut):
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text('{"global_step": 0}')
    (good / COMPLETE_MARKER).write_text('{"step": 2}')
    assert is_complete(good) and not is_complete(cut)
    assert newest_checkpoint(cps) == good
    assert incomplete_checkpoints(cps) == [cut]
    spec = _spec({"precision": "fp32"}, ["output.resume=" + str(cut)], tmp_path)
    with pytest.raises(UserError, match=f"no {COMPLETE_MARKER} in it"):
        resume_point(spec)
    assert resume_point(_spec({"precision": "fp32"}, ["output.resume=" + str(good)], tmp_path)) == good
    prune(cps, keep_last=2)
    assert sorted(p.name for p in cps.iterdir()) == ["checkpoint-2"]


def test_step_line_round_trip():
    line = format_step(7, 40, 3.14159, 2.5e-4, 12345.6)
    assert line == "step 7/40 loss 3.1416 lr 2.500e-04 tokens/s 12,346"
    (rec,) = parse_step_lines("noise\n" + line + "\nmore noise")
    assert rec == {"step": 7, "max_steps": 40, "loss": 3.1416, "lr": 2.5e-4, "tokens_per_s": 12346.0}


def test_attention_choice_on_this_machine(tmp_path):
    torch = pytest.importorskip("torch")
    from launcher.model.load import choose_attn

    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    auto = _spec({"precision": "bf16", "attn": "auto"}, [], tmp_path)
    assert choose_attn(auto) == "sdpa"
    assert choose_attn(_spec({"precision": "fp32", "attn": "eager"}, [], tmp_path)) == "eager"
    with pytest.raises(UserError) as err:
        choose_attn(_spec({"precision": "bf16", "attn": "flash2"}, [], tmp_path))
    assert "no CUDA GPU" in str(err.value) and "--attn sdpa" in str(err.value)


def test_the_node_launcher_is_deepspeeds_without_mlflow():
    """`launcher.submit.nodelaunch` runs deepspeed.launcher.launch as __main__ (its usage, its arguments), and
    mlflow, which importing DeepSpeed imports whenever it is installed, is not imported."""
    pytest.importorskip("mlflow", reason="mlflow (the trackers extra, in the test install) is not installed")

    def run(module):
        return subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True,
                              text=True, timeout=300)

    ours, theirs = run("launcher.submit.nodelaunch"), run("deepspeed.launcher.launch")
    assert ours.returncode == theirs.returncode == 0, ours.stderr[-3000:]
    assert "--world_info" in ours.stdout and "--no_local_rank" in ours.stdout
    def mlflow_modules(err):  # what -X importtime saw loaded (a refused `import mlflow` is listed, loading nothing)
        names = {line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
        assert "deepspeed" in names
        return {n for n in names if n.startswith("mlflow.")}

    assert mlflow_modules(theirs.stderr) and not mlflow_modules(ours.stderr)
