"""The run directory's layout: the name of every file and folder in a run dir, and nothing else.

Every later command (status, logs, cost, merge, eval, --from) and every rank finds a run-dir path here;
the batch templates take these names rendered in.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import assets
from launcher import __version__
from launcher.errors import UserError
from launcher.plan.plan import Plan, make_plan
from launcher.render.presets import dumps as dumps_json
from launcher.render.deepspeed import render as render_deepspeed
from launcher.config.spec import RunSpec, deep_merge, validate

SPEC_FILE = "spec.yaml"
MANIFEST_FILE = "manifest.json"
# Slurm's file-name patterns of a job's log in logs/ (%x the job name, %j the job id; %A_%a an array task).
JOB_LOG_PATTERN = "%x-%j.out"
ARRAY_LOG_PATTERN = "%x-%A_%a.out"
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
        return self.path / "job.sbatch"

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

    def record_job(self, job_id: str, kind: str, reason: str = "", **extra: Any) -> None:
        line = {"job_id": str(job_id), "kind": kind, "time": time.time(), "reason": reason, **extra}
        with self.jobs_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def jobs(self) -> list[dict[str, Any]]:
        if not self.jobs_path.exists():
            return []
        return [json.loads(x) for x in self.jobs_path.read_text().splitlines() if x.strip()]

    def load_spec(self) -> RunSpec:
        from launcher.config.spec import resolve

        return resolve(self.spec_path)


def _absolute_paths(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Paths the ranks will read, made absolute: ranks may start in another working directory."""
    tree = spec.to_dict()
    tree["output"]["dir"] = str(run_dir)
    for section, key in (("data", "path"), ("data", "cache_dir"), ("model", "name"), ("zero", "nvme_path")):
        value = tree[section][key]
        if value and Path(value).expanduser().exists():
            tree[section][key] = str(Path(value).expanduser().resolve())
    return tree


def create(path: str | Path, spec: RunSpec, *, force: bool = False) -> tuple[RunDir, RunSpec, Plan]:
    """Make the run dir and write spec.yaml, ds_config.json and plan.txt into it.

    An existing non-empty directory is refused unless `force`; even then only these generated
    files are replaced, nothing else the directory holds is touched.
    """
    root = Path(path).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"run dir {root} exists and is not a directory; choose another --out")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise UserError(f"run dir {root} is not empty; choose a new --out, or pass --force to write into it "
                        f"(generated files are replaced, nothing else is removed)")
    spec = validate(_absolute_paths(spec, root))
    plan = make_plan(spec)
    rd = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # run dirs may name credential paths; user-only
    for sub in (rd.logs, rd.checkpoints):
        sub.mkdir(exist_ok=True)
    rd.spec_path.write_text(spec.to_yaml())
    rd.ds_config_path.write_text(dumps_json(render_deepspeed(spec, plan)))
    rd.plan_path.write_text("\n".join(plan.summary()) + "\n")
    manifest = launch_manifest(spec, plan)
    if rd.manifest_path.exists():
        manifest = deep_merge(json.loads(rd.manifest_path.read_text()), manifest)
    rd.manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return rd, spec, plan


PACKAGES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "flash_attn",
            "flash-attn", "tokenizers", "pydantic", "click")


def package_versions(names: tuple[str, ...] = PACKAGES, *, missing: bool = False) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported); `missing`: keep a package that
    is not installed, as None (doctor compares nodes by it)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if missing:
                out[name.replace("-", "_")] = None
    return out


def launcher_commit() -> str | None:
    """The git commit of the launcher source, when it runs from a checkout."""
    import subprocess

    root = assets.PACKAGE_PARENT
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) or None


def data_fingerprints(spec: RunSpec) -> list[dict[str, Any]]:
    """Path, size, mtime and a content hash of each data file (hub data: its name and revision)."""
    import hashlib

    from launcher.data.build import data_files

    fmt, files = data_files(spec)
    if fmt == "hub":
        return [{"hub": spec.data.path, "split": spec.data.split}]
    out = []
    for f in files:
        st = f.stat()
        h = hashlib.sha256()
        with f.open("rb") as fh:
            if st.st_size <= _HASH_WHOLE:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:  # large files: head and tail, so launching never reads terabytes
                h.update(fh.read(_HASH_PART))
                fh.seek(st.st_size - _HASH_PART)
                h.update(fh.read(_HASH_PART))
        kind = "sha256" if st.st_size <= _HASH_WHOLE else "sha256_head_tail_16MiB"
        out.append({"path": str(f), "bytes": st.st_size, "mtime": st.st_mtime, kind: h.hexdigest()})
    return out


_HASH_WHOLE = 256 << 20
_HASH_PART = 16 << 20


def summary(run_dir: Path) -> dict[str, Any]:
    """Key numbers of one run dir, from its own files: spec, manifest, metrics, jobs."""
    rd = RunDir(Path(run_dir))
    import yaml

    spec = yaml.safe_load(rd.spec_path.read_text()) or {}
    manifest = json.loads(rd.manifest_path.read_text()) if rd.manifest_path.exists() else {}
    last: dict[str, Any] = {}
    metrics = rd.logs / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                last = rec
    jobs = rd.jobs()
    # a completed run's numbers come from the manifest (rank 0 wrote them at the end); a run still going
    # or stopped (also one started again after it completed), from its metrics log
    attempts = [a for a in manifest.get("attempts") or [] if isinstance(a, dict)]
    final = manifest.get("final") or {}
    if attempts and attempts[-1].get("exit_reason") != "completed":
        final = {}
    if final:
        step, loss, tokens = final.get("steps"), final.get("loss"), final.get("tokens")
    else:
        from launcher.rank.records import tokens_in_model

        step, loss = last.get("step"), last.get("loss")
        tokens = tokens_in_model(attempts) if attempts else None
    return {
        "run_dir": str(rd.path), "name": spec.get("name"), "task": spec.get("task"),
        "method": (spec.get("method") or {}).get("name"), "model": (spec.get("model") or {}).get("name"),
        "world_size": (manifest.get("plan") or {}).get("world_size"),
        "step": step, "max_steps": (spec.get("optim") or {}).get("max_steps"),
        "loss": loss, "tokens": tokens, "eval_loss": final.get("eval_loss"),
        "attempts": len(attempts), "last_exit": attempts[-1].get("exit_reason") if attempts else None,
        "jobs": len(jobs), "last_job": jobs[-1]["job_id"] if jobs else None,
        "created": manifest.get("created"), "final": rd.final.is_dir(),
    }


def find_run_dirs(root: Path, depth: int = 3) -> list[Path]:
    found = []
    if (root / "spec.yaml").is_file() and (root / "manifest.json").is_file():
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and child.name not in ("checkpoints", "logs", "final"):
            found += find_run_dirs(child, depth - 1)
    return found


def launch_manifest(spec: RunSpec, plan: Plan) -> dict[str, Any]:
    """What produced this run, as known where it is launched. Ranks add devices, times and metrics."""
    return {
        "name": spec.name,
        "created": time.time(),
        "launcher_version": __version__,
        "launcher_commit": launcher_commit(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "host": platform.node(),
        "spec_sha256": hashlib.sha256(spec.to_yaml().encode()).hexdigest(),
        "seed": spec.optim.seed,
        "data": data_fingerprints(spec),
        "plan": {"world_size": plan.world_size, "nodes": plan.nodes, "micro_batch": plan.micro_batch,
                 "grad_accum": plan.grad_accum, "global_batch": plan.global_batch,
                 "tokens_per_step": plan.tokens_per_step, "max_steps": plan.max_steps},
    }


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def update_manifest(run_dir: str | Path, **fields: Any) -> None:
    """Merge fields into RUN_DIR/manifest.json (rank 0 records the run's final numbers)."""
    path = Path(run_dir) / "manifest.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    _write_manifest(path, deep_merge(current, fields))


def record_attempt(run_dir: str | Path, job_id: str, attempt: int, **fields: Any) -> dict[str, Any]:
    """Add or update one attempt in RUN_DIR/manifest.json's "attempts", keyed by job id and attempt number:
    a requeued or retried job appends its own entry, an earlier attempt is never overwritten. Global rank
    0 of the training ranks writes (start, devices, end); returns the entry."""
    path = Path(run_dir) / "manifest.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    attempts = [a for a in current.get("attempts") or [] if isinstance(a, dict)]
    for entry in attempts:
        if entry.get("job_id") == str(job_id) and entry.get("attempt") == attempt:
            entry.update(deep_merge(entry, fields))
            break
    else:
        entry = {"job_id": str(job_id), "attempt": attempt, **fields}
        attempts.append(entry)
    current["attempts"] = attempts
    _write_manifest(path, current)
    return entry


def open_run_dir(path: str | Path) -> RunDir:
    root = Path(path).expanduser().resolve()
    if not (root / "spec.yaml").is_file():
        raise UserError(f"{root} is not a run dir (no spec.yaml); give a directory made by "
                        f"`launcher slurm --out` or `launcher run --out`")
    return RunDir(root)


def with_overrides(spec: RunSpec, tree: dict[str, Any]) -> RunSpec:
    return validate(deep_merge(spec.to_dict(), tree))
