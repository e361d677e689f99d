"""The command line: parses, calls the library, prints. One module per subcommand, loaded lazily."""

from __future__ import annotations

import importlib
import sys

import click

from launcher import __version__
from launcher.errors import RunFailed, UserError

# name -> ("module:attribute", short help). The short help lives here so that `launcher --help`
# imports no command module; modules import heavy libraries (torch, ...) inside functions only.
COMMANDS: dict[str, tuple[str, str]] = {
    "spec": ("launcher.commands.spec_cmds:spec", "Print the fully resolved run spec as YAML."),
    "config": ("launcher.commands.spec_cmds:config", "Print or write the DeepSpeed ZeRO config."),
    "slurm": ("launcher.commands.slurm_cmd:slurm", "Write a run dir with a Slurm batch script; --submit queues it."),
    "estimate": ("launcher.commands.estimate_cmd:estimate", "Memory per GPU, step time and $ per 1M tokens, no GPU needed."),
    "bench": ("launcher.commands.bench_cmd:bench", "Measure tokens/s, MFU, memory and $ per 1M tokens per setup; collect."),
    "prepare": ("launcher.commands.prepare_cmd:prepare", "Tokenize and pack the data into the cache, on CPU."),
    "runs": ("launcher.commands.runs_cmd:runs", "List run dirs with their key numbers."),
    "run": ("launcher.commands.train_cmds:run", "Train on this machine through the deepspeed launcher."),
    "train": ("launcher.commands.train_cmds:train", "Per-rank training entry point (called by every launcher)."),
    "quickstart": ("launcher.commands.train_cmds:quickstart", "Train the embedded tiny model here, then sample from it."),
    "merge": ("launcher.commands.train_cmds:merge", "Merge a LoRA/QLoRA adapter into its base model."),
    "eval": ("launcher.commands.eval_cmd:eval_", "Loss/perplexity of a tuned model vs its base: held-out and reference sets."),
    "status": ("launcher.commands.ops_cmds:status", "Every job of a run: state, step, GPU-hours, why it ended."),
    "logs": ("launcher.commands.ops_cmds:logs", "Print or follow (-f) a run's logs until its jobs end."),
    "cancel": ("launcher.commands.ops_cmds:cancel", "Cancel every live job of a run."),
    "cost": ("launcher.commands.ops_cmds:cost", "GPU-hours and $ really spent (sacct), $ per 1M tokens."),
    "cluster": ("launcher.commands.ops_cmds:cluster", "Check a cluster profile against the live cluster."),
    "stage": ("launcher.commands.stage_cmd:stage", "Download the spec's hub model and data into a shared cache."),
    "doctor": ("launcher.commands.doctor_cmd:doctor", "Each node's environment: versions, CUDA, GPUs, shared dir, NIC."),
    "sync": ("launcher.commands.sync_cmd:sync", "Upload a run's offline wandb runs into its one wandb run."),
}


# What every launcher (deepspeed's launcher, torchrun, srun) starts on each rank, before the spec path:
# `python -m launcher train RUN_DIR/spec.yaml`. The bench passes its own entry instead.
TRAIN_ENTRY: tuple[str, ...] = ("launcher", "train")
REF_ENTRY: tuple[str, ...] = (*TRAIN_ENTRY, "--ref")  # the reference job of full DPO, on the training ranks


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module, attr = entry[0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="launcher")
def cli() -> None:
    """Train language models on GPU clusters from one run description.

    A YAML spec plus flags becomes a DeepSpeed config, a Slurm batch script and a training run.
    Exit codes: 0 ok, 1 run failed, 2 bad input, 3 stopped for requeue after a checkpoint,
    4 hang detected, 5 out of memory.
    """


def _not_utf8(argv: list[str]) -> str | None:
    """The first argument that is not UTF-8 (Python keeps its bytes as lone surrogates): every name and
    path launcher writes into spec.yaml and the scripts must be text."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return ascii(arg)[:120]
    return None


def main(argv: list[str] | None = None) -> None:
    bad = _not_utf8(sys.argv[1:] if argv is None else argv)
    if bad is not None:
        click.echo(f"error: the argument {bad} is not UTF-8 text; give names and paths in UTF-8", err=True)
        sys.exit(2)
    try:
        rv = cli.main(args=argv, prog_name="launcher", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: bad flag, bad choice, missing argument
        exc.show()
        sys.exit(2)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except RunFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
