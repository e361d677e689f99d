"""`launcher spec` (the resolved spec as YAML) and `launcher config` (the DeepSpeed JSON)."""

from __future__ import annotations

from pathlib import Path

import click

from launcher import outpaths
from launcher.commands.common import spec_options
from launcher.config.spec import RunSpec
from launcher.errors import SpecError, UserError
from launcher.plan.plan import make_plan
from launcher.render import presets
from launcher.render.deepspeed import render


@click.command()
@spec_options()
def spec(spec: RunSpec) -> None:
    """Print the fully resolved run spec as YAML (defaults < SPEC file < flags < --set), and as comments
    what each `auto` becomes for this run, and why."""
    click.echo(spec.to_yaml(), nl=False)
    try:
        choices = make_plan(spec).choices
    except (SpecError, UserError) as exc:  # e.g. a batch that does not divide: `launcher config` refuses it
        choices = (f"not planned: {exc}",)
    click.echo("# the plan's choices (launcher/plan/plan.py):")
    for line in choices:
        click.echo(f"#   {line}")


@click.command()
@spec_options()
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists with other content.")
@click.option("--write-presets", "presets_dir", type=click.Path(file_okay=False),
              help="Regenerate every shipped preset into DIR (e.g. ds_configs) and exit.")
def config(spec: RunSpec, output: str | None, force: bool, presets_dir: str | None) -> None:
    """Print the DeepSpeed ZeRO config for SPEC and flags.

    Batch numbers (train_batch_size = micro x accumulation x world size) come from the same plan
    the trainer uses; every value is explicit, so the file also works with the plain deepspeed CLI.
    """
    if presets_dir:
        folder = outpaths.resolve(presets_dir, "--write-presets")
        with outpaths.writing(folder, "--write-presets"):
            written = presets.write_all(folder)
        for path in written:
            click.echo(f"wrote {path}")
        return
    text = presets.dumps(render(spec, make_plan(spec)))
    if output is None:
        click.echo(text, nl=False)
        return
    write_new_file(Path(output), text, force=force)
    click.echo(f"wrote {output}", err=True)


def write_new_file(path: Path, text: str, *, force: bool) -> None:
    """Write text; refuse to replace different content the user has unless --force."""
    path = outpaths.resolve(path, "-o")
    with outpaths.writing(path, "-o"):
        if path.is_dir():
            raise UserError(f"-o {path} is a folder; give a file path", field="-o")
        if path.exists() and not force and path.read_bytes() != text.encode():
            raise UserError(f"{path} exists with other content; choose another -o path or pass --force to replace "
                            f"it", field="-o")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
