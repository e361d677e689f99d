"""The spec flags (launcher/config/flags.py) on the commands that take a run spec, and the one function
that resolves them."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import click

from launcher.config import profiles
from launcher.config.flags import CLUSTER, CLUSTER_FLAGS, SPEC, SPEC_FLAGS
from launcher.config.spec import RunSpec
from launcher.errors import UserError
from launcher.rundir.layout import open_run_dir

_FLAG_NAMES = {f.name for f in SPEC + CLUSTER}


class FiniteFloat(click.FloatRange):
    """A float option that is a real number (click's FloatRange lets nan and inf through) within its range."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def spec_options(*, spec_required: bool = False, cluster_flags: bool = False,
                 allow_from: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add SPEC and the shared flags (and, with cluster_flags, the Slurm settings) to a command;
    the command receives `spec: RunSpec` instead."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        names = _FLAG_NAMES | {"spec_path", "from_run"}

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            picked = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            kwargs["spec"] = resolve_from_cli(picked)
            return fn(**kwargs)

        for decls, kw in reversed(SPEC_FLAGS + (CLUSTER_FLAGS if cluster_flags else [])):
            wrapper = click.option(*decls, **kw)(wrapper)
        if allow_from:
            wrapper = click.option("--from", "from_run", type=click.Path(file_okay=False), metavar="RUN_DIR",
                                   help="Start from RUN_DIR's resolved spec (an identical run in a new run dir; "
                                        "flags still apply on top).")(wrapper)
        wrapper = click.argument("spec_path", required=spec_required, type=click.Path(dir_okay=False),
                                 metavar="SPEC" if spec_required else "[SPEC]")(wrapper)
        return wrapper

    return decorate


def resolve_from_cli(picked: dict[str, Any]) -> RunSpec:
    spec_path = picked.pop("spec_path", None)
    from_run = picked.pop("from_run", None)
    if from_run:
        if spec_path:
            raise UserError("give a SPEC or --from RUN_DIR, not both")
        spec_path = open_run_dir(from_run).spec_path
    sets = picked.pop("sets", ()) or ()
    cluster, clusters = picked.pop("cluster", None), picked.pop("clusters", None)
    return profiles.resolve(spec_path, flags=picked, sets=list(sets), cluster=cluster, clusters_file=clusters)
