"""The Trainer's arguments and the DeepSpeed JSON agree (micro batch, accumulation, precision and the
optimizer/schedule numbers transformers cross-checks), and the local launch command is what it says.

The agreement is judged by transformers' own check (HfTrainerDeepSpeedConfig.trainer_config_process /
trainer_config_finalize, the code that refuses a mismatch at train time), at the plan's world size.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.errors import UserError
from launcher.launch import launch_command
from launcher.plan import make_plan
from launcher.render.deepspeed import render
from launcher.spec import resolve
from launcher.train.loop import (check_world_size, format_step, newest_checkpoint, parse_step_lines,
                                 training_arguments_kwargs)

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


def test_launch_command_cpu(tmp_path):
    spec = _spec({"precision": "fp32", "nproc_per_node": 2}, [], tmp_path)
    plan = make_plan(spec)
    argv, env = launch_command(tmp_path / "run", plan, 2, master_port=29123, base_env={"PATH": "/bin"}, cpu_count=8)
    assert argv[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert argv[argv.index("--num_gpus") + 1] == "2"
    assert argv[argv.index("--master_port") + 1] == "29123"
    assert "--no_local_rank" in argv
    i = argv.index("--module")
    assert argv[i + 1:] == ["launcher", "train", str(tmp_path / "run" / "spec.yaml")]
    assert env["OMP_NUM_THREADS"] == "4"  # 8 cores / 2 ranks
    assert env["PATH"] == "/bin"
    pkg_root = str(Path(__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(":")[0] == pkg_root


def test_launch_command_gpu_keeps_threads_and_user_env(tmp_path):
    spec = _spec({"precision": "bf16", "nproc_per_node": 4, "gpus_per_node": 4}, [], tmp_path)
    plan = make_plan(spec)
    argv, env = launch_command(tmp_path / "run", plan, 4, base_env={"PYTHONPATH": "/x", "OMP_NUM_THREADS": "7"})
    assert argv[argv.index("--num_gpus") + 1] == "4"
    assert env["OMP_NUM_THREADS"] == "7"
    assert env["PYTHONPATH"].endswith(":/x")
    argv_q, env_q = launch_command(tmp_path / "run", plan, 4, base_env={}, quiet=True)
    assert argv_q[argv_q.index("--log_level") + 1] == "warning"


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
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"


def test_step_line_round_trip():
    line = format_step(7, 40, 3.14159, 2.5e-4, 12345.6)
    assert line == "step 7/40 loss 3.1416 lr 2.500e-04 tokens/s 12,346"
    (rec,) = parse_step_lines("noise\n" + line + "\nmore noise")
    assert rec == {"step": 7, "max_steps": 40, "loss": 3.1416, "lr": 2.5e-4, "tokens_per_s": 12346.0}


def test_attention_choice_on_this_machine(tmp_path):
    torch = pytest.importorskip("torch")
    from launcher.train.model import choose_attn

    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    auto = _spec({"precision": "bf16", "attn": "auto"}, [], tmp_path)
    assert choose_attn(auto) == "sdpa"
    assert choose_attn(_spec({"precision": "fp32", "attn": "eager"}, [], tmp_path)) == "eager"
    with pytest.raises(UserError) as err:
        choose_attn(_spec({"precision": "bf16", "attn": "flash2"}, [], tmp_path))
    assert "no CUDA GPU" in str(err.value) and "--attn sdpa" in str(err.value)
