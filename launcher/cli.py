"""The command line: parses, calls the library, prints. One module per subcommand, loaded lazily."""

from __future__ import annotations

import importlib
import sys

import click

from launcher import __version__
from launcher.errors import RunFailed, UserError

# name -> "module:attribute". Modules import heavy libraries (torch, ...) inside their functions only.
COMMANDS: dict[str, str] = {
    "spec": "launcher.commands.spec_cmds:spec",
    "config": "launcher.commands.spec_cmds:config",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="launcher")
def cli() -> None:
    """Train language models on GPU clusters from one run description.

    A YAML spec plus flags becomes a DeepSpeed config, a Slurm batch script and a training run.
    Exit codes: 0 ok, 1 run failed, 2 bad input, 3 stopped for requeue after a checkpoint,
    4 hang detected, 5 out of memory.
    """


def main(argv: list[str] | None = None) -> None:
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
