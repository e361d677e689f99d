"""The run directory's layout: the name of every file and folder in a run dir (RunDir), and opening an
existing one. Every later command (status, logs, cost, merge, eval, --from) and every rank finds a run-dir
path here; the batch templates take these names rendered in. Each file's format lives in its own module
beside this one (jobs.py, manifest.py, markers.py, metrics.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from launcher.config.resolve import resolve
from launcher.config.spec import RunSpec
from launcher.errors import UserError

SPEC_FILE = "spec.yaml"
MANIFEST_FILE = "manifest.json"
# Slurm's file-name patterns of a job's log in logs/ (%x the job name, %j the job id; %A_%a an array task).
JOB_LOG_PATTERN = "%x-%j.out"
ARRAY_LOG_PATTERN = "%x-%A_%a.out"
# The job id (%j, or %A_%a) a log file's name ends with.
LOG_JOB_ID = re.compile(r"-(\d+(?:_\d+)?)\.out$")
JOB_SCRIPT = "job.sbatch"  # the training job's batch script
REF_SCRIPT = "ref.sbatch"  # full DPO's reference job: the training job's script running `launcher train --ref`
# The batch scripts of the follow-up jobs, by kind.
CHAIN_SCRIPTS = {"prep": "prepare.sbatch", "merge": "merge.sbatch", "eval": "eval.sbatch"}
# Folders inside a run dir that are never run dirs themselves (`launcher runs` skips them).
OWN_FOLDERS = ("checkpoints", "logs", "final")


@dataclass(frozen=True)
class RunDir:
    """A run dir and the path of everything in it."""

    path: Path

    # ------------------------------------------------------------ written when the run dir is made
    @property
    def spec_path(self) -> Path:
        """The resolved spec (secrets redacted; output.dir points here)."""
        return self.path / SPEC_FILE

    @property
    def ds_config_path(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def plan_path(self) -> Path:
        """The plan's summary, as text."""
        return self.path / "plan.txt"

    @property
    def manifest_path(self) -> Path:
        """What produced the run, and one entry per attempt (rundir/manifest.py)."""
        return self.path / MANIFEST_FILE

    @property
    def jobs_path(self) -> Path:
        """One line per submission or attempt (rundir/jobs.py)."""
        return self.path / "jobs.jsonl"

    @property
    def job_script(self) -> Path:
        """The training job's batch script."""
        return self.path / JOB_SCRIPT

    @property
    def ref_script(self) -> Path:
        """The reference job's batch script (full DPO): on the training job's nodes and ranks."""
        return self.path / REF_SCRIPT

    def chain_script(self, kind: str) -> Path:
        """The batch script of a follow-up job: prep, merge or eval."""
        return self.path / CHAIN_SCRIPTS[kind]

    @property
    def sweep_path(self) -> Path:
        """A sweep's tasks and the values each sets."""
        return self.path / "sweep.json"

    @property
    def tasks(self) -> Path:
        """A sweep's or a Slurm bench's task run dirs: tasks/0, tasks/1, ..."""
        return self.path / "tasks"

    def task(self, index: int | str) -> "RunDir":
        return RunDir(self.tasks / str(index))

    def task_dirs(self) -> list["RunDir"]:
        """The task run dirs that hold a spec, in name order."""
        if not self.tasks.is_dir():
            return []
        return [RunDir(p.parent) for p in sorted(self.tasks.glob(f"*/{SPEC_FILE}"))]

    # ------------------------------------------------------------ logs
    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def metrics_path(self) -> Path:
        """Rank 0's numbers at each logging step (rundir/metrics.py)."""
        return self.logs / "metrics.jsonl"

    @property
    def launch_log(self) -> Path:
        """A local run's output (`launcher run`), every rank's lines."""
        return self.logs / "launch.log"

    @property
    def rank_logs(self) -> Path:
        """Each rank's own stdout and stderr under a Slurm job: ranks/JOB/nodeN/ (torchrun --log-dir)."""
        return self.logs / "ranks"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tb"

    @property
    def wandb_dir(self) -> Path:
        """wandb's own folder (wandb.init(dir=...) writes wandb/ under it): offline runs wait here for
        `launcher sync`."""
        return self.logs

    @property
    def trackers_path(self) -> Path:
        """Each tracker's run id and the last step logged to it, kept across attempts (rundir/trackers.py)."""
        return self.path / "trackers.json"

    def job_logs(self, job_id: str) -> list[Path]:
        """The log files of one Slurm job (JOB_LOG_PATTERN / ARRAY_LOG_PATTERN), in name order."""
        if not self.logs.is_dir():
            return []
        return sorted(p for p in self.logs.iterdir() if p.is_file() and p.name.endswith(f"-{job_id}.out"))

    # ------------------------------------------------------------ written by the ranks and the jobs
    @property
    def markers(self) -> Path:
        """What each rank or job did, one small JSON file each (rundir/markers.py)."""
        return self.path / "markers"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        """The trained model or adapter."""
        return self.path / "final"

    @property
    def base(self) -> Path:
        """The embedded tiny model, initialised once, that every rank, the adapter and merge share."""
        return self.path / "base"

    @property
    def merged(self) -> Path:
        """The merge job's output: the adapter folded into its base."""
        return self.path / "merged"

    @property
    def eval_path(self) -> Path:
        """`launcher eval RUN_DIR`'s results."""
        return self.path / "eval.json"

    # ------------------------------------------------------------ the bench's files in a setup's run dir
    @property
    def bench_task(self) -> Path:
        """What the setup's ranks measure and how (written by `launcher bench`)."""
        return self.path / "bench_task.json"

    @property
    def bench(self) -> Path:
        """Each rank's measurement (rank<N>.json) and the baseline's (baseline.json)."""
        return self.path / "bench"

    def bench_rank(self, rank: int) -> Path:
        return self.bench / f"rank{rank}.json"

    @property
    def bench_baseline(self) -> Path:
        return self.bench / "baseline.json"

    @property
    def bench_log(self) -> Path:
        return self.logs / "bench.log"

    @property
    def baseline_log(self) -> Path:
        return self.logs / "baseline.log"

    @property
    def baseline_out(self) -> Path:
        """The baseline's Trainer output dir."""
        return self.path / "baseline"

    @property
    def bench_settings(self) -> Path:
        """A `launcher bench --slurm` dir: the options and tasks `bench collect` needs."""
        return self.path / "bench.json"

    def load_spec(self) -> RunSpec:
        """The run's resolved spec, validated again."""
        return resolve(self.spec_path)


def open_run_dir(path: str | Path) -> RunDir:
    """An existing run dir (one with a spec.yaml); anything else is bad input."""
    try:
        root = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.resolve's "Symlink loop from ..."
        raise UserError(f"{path} is not a run dir ({exc}); give a directory made by `launcher slurm --out` or "
                        f"`launcher run --out`") from None
    rd = RunDir(root)
    if not rd.spec_path.is_file():
        raise UserError(f"{root} is not a run dir (no spec.yaml); give a directory made by "
                        f"`launcher slurm --out` or `launcher run --out`")
    return rd
