"""The command line as a user meets it: exit codes, one-line errors, help texts, start-up weight."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from launcher.cli import COMMANDS, cli

HEAVY = ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "datasets", "wandb", "mlflow")
# Commands that must answer without importing any heavy library (clarifications.md, decision 1).
LIGHT = {
    "help": ["--help"],
    "spec": ["spec", "--zero", "3"],
    "config": ["config", "--zero", "3", "--offload-param", "cpu"],
    "config-presets-help": ["config", "--help"],
}
for _name, _args in {
    "slurm": ["slurm", "--dry-run", "--out", "{tmp}/run"],
    "estimate": ["estimate"],
    # a hub id from the shipped table of known models, with no hub and no cache
    "estimate-known-model": ["estimate", "--model", "meta-llama/Meta-Llama-3-8B", "--gpu", "H100-80GB"],
    "sync": ["sync", "--help"],
    "status": ["status", "--help"],
    "logs": ["logs", "--help"],
    "cost": ["cost", "--help"],
}.items():
    if _name in COMMANDS:
        LIGHT[_name] = _args


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_commands_never_import_heavy_libraries(name, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in LIGHT[name]]
    code = (
        "import sys, json\n"
        "from launcher.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "sys.stderr.write('\\nRESULT ' + json.dumps([code, heavy]) + '\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stderr.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stderr
    code, heavy = json.loads(line[-1][len("RESULT "):])
    assert code in (0, None), proc.stderr
    assert heavy == [], f"`launcher {' '.join(args)}` imported {heavy}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.splitlines()) > 3


def test_top_level_help_lists_commands_and_exit_codes():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    assert "2 bad input" in result.output


@pytest.mark.parametrize(
    "args,spec_text,needle",
    [
        (["config"], "optim: {lr: 1e-4\n", "not valid YAML"),                   # broken YAML
        (["config"], "optim: {lrr: 0.1}\n", "Did you mean 'optim.lr'"),          # unknown key
        (["config"], "optim: {micro_batch: two}\n", "optim.micro_batch"),       # wrong type
        (["config"], "optim: {micro_batch: 0}\n", "greater than or equal to 1"),  # out of range
        (["config", "--zero", "1", "--offload-param", "cpu"], "", "needs ZeRO stage 3"),  # clash
        (["config", "--global-batch", "10", "--nproc", "4"], "", "nearest valid global batches"),
        (["spec", "--set", "zero.stage=9"], "", "zero.stage"),
        (["spec", "--set", "nonsense"], "", "dotted.key=value"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_no_traceback(cli, tmp_path, args, spec_text, needle):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec_text or "{}\n")
    proc = cli(*args[:1], str(spec_file), *args[1:])
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: ")


def test_click_usage_errors_exit_2(cli):
    proc = cli("config", "--zero", "7")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_config_refuses_to_overwrite_a_different_file(cli, tmp_path):
    out = tmp_path / "ds.json"
    out.write_text("{}\n")
    proc = cli("config", "-o", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert out.read_text() == "{}\n"
    assert cli("config", "-o", str(out), "--force").returncode == 0
    assert json.loads(out.read_text())["zero_optimization"]["stage"] == 0  # auto: one rank


def test_config_output_is_valid_json_with_flags_applied(cli):
    proc = cli("config", "--zero", "3", "--nproc", "4", "--micro-batch", "2", "--global-batch", "16", check=True)
    cfg = json.loads(proc.stdout)
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (16, 2)


def test_spec_prints_resolved_yaml_with_precedence(cli, tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("optim: {lr: 0.1}\ncluster: {time: 24:00:00}\n")
    proc = cli("spec", str(spec_file), "--lr", "0.2", "--set", "optim.lr=0.3", check=True)
    assert "lr: 0.3" in proc.stdout and "time: '24:00:00'" in proc.stdout


def test_unexpected_exception_is_a_bug_with_traceback(cli, tmp_path):
    """A catch-all that dresses bugs up as bad input would hide them: bugs exit 1 with a traceback."""
    code = ("import launcher.commands.spec_cmds as m\n"
            "def boom(*a, **k):\n    raise ZeroDivisionError('bug')\n"
            "m.make_plan = boom\n"
            "from launcher.cli import main\nmain(['config'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_spec_prints_shorthands_in_their_full_form(cli, tmp_path):
    import yaml

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("model: tiny\nmethod: lora\nprecision: fp32\n")
    resolved = yaml.safe_load(cli("spec", str(spec_file), check=True).stdout)
    assert resolved["model"]["name"] == "tiny" and resolved["method"]["name"] == "lora"
    assert resolved["precision"]["dtype"] == "fp32" and "lora" in resolved["method"]


def test_spec_flags_take_their_types_and_choices_from_the_spec_fields():
    import typing

    from launcher.config import flags
    from launcher.config.spec import Dtype, MethodName

    for decls, kw in flags.SPEC_FLAGS + flags.CLUSTER_FLAGS:
        opt = click.Option(list(decls), **kw)
        f = next(f for f in flags.SPEC + flags.CLUSTER if f.name == opt.name)
        if f.field is None:
            continue
        ann = flags.annotation(f.field)
        if typing.get_origin(ann) is typing.Literal and isinstance(opt.type, click.Choice):
            assert list(opt.type.choices) == [str(v) for v in typing.get_args(ann)], f.name
        elif ann is bool:
            assert opt.is_flag and opt.secondary_opts and opt.default is None, f.name
    by_name = {click.Option(list(d), **kw).name: click.Option(list(d), **kw) for d, kw in flags.SPEC_FLAGS}
    assert list(by_name["method"].type.choices) == list(typing.get_args(MethodName))
    assert list(by_name["precision"].type.choices) == list(typing.get_args(Dtype))
    assert list(by_name["zero"].type.choices) == ["auto", "0", "1", "2", "3"]
    ctx = click.Context(click.Command("x"))
    assert by_name["zero"].type.convert("2", None, ctx) == 2 and by_name["zero"].type.convert("auto", None, ctx) == "auto"
    assert by_name["nproc_per_node"].opts == ["--nproc-per-node", "--nproc"]
    assert set(flags.FLAG_FIELDS) >= {o.name for o in by_name.values()} - {"sets", "cluster", "clusters"}
