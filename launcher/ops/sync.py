"""`launcher sync RUN_DIR`: upload a run's offline tracker data from a machine that reaches the tracker (a
login node). wandb `mode: offline` leaves one offline run folder per attempt under RUN_DIR/logs/wandb, all
with the run id kept in trackers.json (rundir/trackers.py); `wandb sync --id RUN_ID` uploads them in start
order into that one run. MLflow logs straight to its tracking server (nothing to sync). The API key comes
from the environment (WANDB_API_KEY) or `wandb login`, never from the run dir. Stdlib only: wandb's own
command line does the upload.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.config.spec import TRACKER_EXTRA
from launcher.errors import RunFailed, UserError
from launcher.rundir import trackers as state
from launcher.rundir.layout import open_run_dir


def wandb_command() -> list[str]:
    """How to run wandb's command line here; UserError (exit 2) when wandb is not installed."""
    exe = shutil.which("wandb")
    if exe:
        return [exe]
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"`launcher sync` uploads through wandb's command line, and wandb is not installed here; "
                        f"{TRACKER_EXTRA}")
    return [sys.executable, "-m", "wandb"]


def sync_argv(run_dir: str | os.PathLike) -> tuple[list[str], list[Path]]:
    """(the wandb sync arguments after the command, the offline run folders) for a run dir. UserError when
    the run dir has no offline wandb run to upload."""
    rd = open_run_dir(run_dir)
    entry = state.read_state(rd.path).get("wandb")
    if not entry or not entry.get("run_id"):
        raise UserError(f"{rd.path} has no wandb run (no wandb entry in {rd.trackers_path.name}): nothing to sync; "
                        f"set output.trackers to include wandb with output.wandb.mode offline")
    if entry.get("mode") != "offline":
        raise UserError(f"{rd.path}'s wandb run {entry['run_id']} logged online: it is on the server already")
    folders = state.wandb_offline_runs(rd.path, str(entry["run_id"]))
    if not folders:
        raise UserError(f"{rd.path} has no offline wandb run folder for run {entry['run_id']} under "
                        f"{rd.wandb_dir / 'wandb'}")
    argv = ["sync", "--id", str(entry["run_id"])]
    if entry.get("project"):
        argv += ["--project", str(entry["project"])]
    if entry.get("entity"):
        argv += ["--entity", str(entry["entity"])]
    return argv + [str(p) for p in folders], folders


def sync(run_dir: str | os.PathLike, *, dry_run: bool = False, say=print) -> list[str]:
    """Upload the run's offline wandb runs (or, with `dry_run`, only say the command). Returns the command."""
    argv, folders = sync_argv(run_dir)
    cmd = wandb_command() + argv
    say(f"wandb run {argv[2]}: {len(folders)} offline attempt(s)")
    say(" ".join(cmd))
    if dry_run:
        return cmd
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise RunFailed(f"wandb sync exited {rc}; the offline runs stay in place, run `launcher sync` again")
    return cmd
