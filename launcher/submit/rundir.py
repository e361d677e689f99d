"""Make a run dir where a run is launched: resolve its paths, plan it, and write spec.yaml, ds_config.json,
plan.txt and what produced it into manifest.json (with the data files' fingerprints)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from launcher import outpaths
from launcher.config.spec import RunSpec, validate
from launcher.data.mixture import summary_lines
from launcher.data.source import data_files, source_spec
from launcher.errors import UserError
from launcher.plan.estimate import estimate_run
from launcher.plan.plan import Plan, make_plan
from launcher.render.deepspeed import render as render_deepspeed
from launcher.render.presets import dumps as dumps_json
from launcher.rundir.layout import RunDir
from launcher.rundir.manifest import launch_manifest, read_manifest, update_manifest

_HASH_WHOLE = 256 << 20
_HASH_PART = 16 << 20


def run_dir_paths(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Paths the ranks will read, made absolute: ranks may start in another working directory."""
    tree = spec.to_dict()
    tree["output"]["dir"] = str(run_dir)
    for section, key in (("data", "path"), ("data", "cache_dir"), ("model", "name"), ("zero", "nvme_path")):
        value = tree[section][key]
        if value and Path(value).expanduser().exists():
            tree[section][key] = str(Path(value).expanduser().resolve())
    for src in tree["data"]["sources"]:
        p = Path(src["path"]).expanduser()
        if p.exists() or (any(c in src["path"] for c in "*?[") and not p.is_absolute()):
            src["path"] = str(p.resolve()) if p.exists() else str(Path.cwd() / p)
    return tree


def data_fingerprints(spec: RunSpec) -> list[dict[str, Any]]:
    """Path, size, mtime and a content hash of each data file (hub data: its name and revision); a
    mixture's, source by source (each entry names its source)."""
    if spec.data.sources:
        return [{"source": src.name, **f} for k, src in enumerate(spec.data.sources)
                for f in data_fingerprints(source_spec(spec, k))]
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


def _mixture_lines(spec: RunSpec, plan: Plan) -> list[str]:
    if not spec.data.sources:
        return []
    try:
        usd = estimate_run(spec)[1].usd_per_mtok
    except UserError:  # no estimate for this model here: tokens without $
        usd = None
    return summary_lines(spec, plan.global_batch, plan.max_steps, usd)


def check_target(path: str | Path, *, force: bool = False) -> Path:
    """The run dir's absolute path, refused (UserError) before anything is written: a path that cannot be
    a folder launcher writes, a non-empty folder without `force`, and with `force` a run dir whose files
    launcher would have to merge with but cannot read (a corrupt manifest.json)."""
    root = outpaths.resolve(path, "--out")
    if root.exists() and not root.is_dir():
        raise UserError(f"run dir {root} exists and is not a directory; choose another --out", field="--out")
    with outpaths.writing(root, "--out"):
        non_empty = root.is_dir() and any(root.iterdir())
    if non_empty and not force:
        raise UserError(f"run dir {root} is not empty; choose a new --out, or pass --force to write into it "
                        f"(generated files are replaced, nothing else is removed)", field="--out")
    if non_empty:
        read_manifest(root, strict=True)  # merged into below: refuse now rather than half-way through
    return root


def create(path: str | Path, spec: RunSpec, *, force: bool = False) -> tuple[RunDir, RunSpec, Plan]:
    """Make the run dir and write spec.yaml, ds_config.json, plan.txt and manifest.json into it.

    An existing non-empty directory is refused unless `force`; even then only these generated
    files are replaced (an existing manifest keeps what the new one does not set), nothing else the
    directory holds is touched. A folder launcher did not create keeps its permissions.
    """
    root = check_target(path, force=force)
    spec = validate(run_dir_paths(spec, root))
    plan = make_plan(spec)
    data = data_fingerprints(spec)
    rd = RunDir(root)
    if outpaths.make_dir(root, "--out"):
        os.chmod(root, 0o700)  # run dirs may name credential paths; user-only (only a folder made here)
    with outpaths.writing(root, "--out"):
        for sub in (rd.logs, rd.checkpoints):
            sub.mkdir(exist_ok=True)
        rd.spec_path.write_text(spec.to_yaml())
        rd.ds_config_path.write_text(dumps_json(render_deepspeed(spec, plan)))
        rd.plan_path.write_text("\n".join(plan.summary() + _mixture_lines(spec, plan)) + "\n")
        update_manifest(root, **launch_manifest(spec, plan, data))
    return rd, spec, plan
