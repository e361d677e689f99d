"""The run directory: the one place every later command reads (status, logs, cost, merge, --from).

Layout: spec.yaml (resolved; output.dir points here), ds_config.json, plan.txt, manifest.json,
jobs.jsonl (one line per submission or attempt), logs/, checkpoints/, final/ (model or adapter).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.errors import UserError
from launcher.plan import Plan, make_plan
from launcher.presets import dumps as dumps_json
from launcher.render.deepspeed import render as render_deepspeed
from launcher.spec import RunSpec, deep_merge, validate


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def spec_path(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def ds_config_path(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def plan_path(self) -> Path:
        return self.path / "plan.txt"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def jobs_path(self) -> Path:
        return self.path / "jobs.jsonl"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def record_job(self, job_id: str, kind: str, reason: str = "", **extra: Any) -> None:
        line = {"job_id": str(job_id), "kind": kind, "time": time.time(), "reason": reason, **extra}
        with self.jobs_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def jobs(self) -> list[dict[str, Any]]:
        if not self.jobs_path.exists():
            return []
        return [json.loads(x) for x in self.jobs_path.read_text().splitlines() if x.strip()]

    def load_spec(self) -> RunSpec:
        from launcher.spec import resolve

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
    manifest = {"launcher_version": __version__, "created": time.time(), "name": spec.name}
    if rd.manifest_path.exists():
        manifest = deep_merge(json.loads(rd.manifest_path.read_text()), manifest)
    rd.manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return rd, spec, plan


def open_run_dir(path: str | Path) -> RunDir:
    root = Path(path).expanduser().resolve()
    if not (root / "spec.yaml").is_file():
        raise UserError(f"{root} is not a run dir (no spec.yaml); give a directory made by "
                        f"`launcher slurm --out` or `launcher run --out`")
    return RunDir(root)


def with_overrides(spec: RunSpec, tree: dict[str, Any]) -> RunSpec:
    return validate(deep_merge(spec.to_dict(), tree))
