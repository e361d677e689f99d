"""Offline-first hub use: `launcher stage` and the pre-flight check that the shared hub cache
(cluster.hf_home) holds the model before anything is queued.

The cache is fabricated in huggingface_hub's layout (HF_HOME/hub/models--ORG--NAME/{refs,snapshots});
the hub is a closed local port (no network here) or a local HTTP server that answers like the hub does
for a repository that does not exist."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launcher.submit import preflight
from launcher.config.resolve import resolve
from launcher.errors import UserError
from launcher.hubcache import HubItem, cached_snapshot
from launcher.submit.stage import check_cached, hub_items, is_hub_model

ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"
TINY_CONFIG = json.loads((ROOT / "launcher" / "tiny" / "config.json").read_text())


def fake_cache(home: Path, repo: str = "acme/llama-mini", ref: str = "main", sha: str = SHA,
               weights: bool = True, config: bool = True) -> Path:
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / sha
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / ref).write_text(sha)
    if config:
        (snap / "config.json").write_text(json.dumps(TINY_CONFIG))
    if weights:
        (snap / "model.safetensors").write_bytes(b"\0")
    return snap


def spec_for(tmp_path: Path, model: str = "acme/llama-mini", hf_home: Path | None = None, **sets: str):
    pairs = [f"model.name={model}", f"output.dir={tmp_path / 'run'}", "cluster.gpus_per_node=0"]
    if hf_home is not None:
        pairs.append(f"cluster.hf_home={hf_home}")
    pairs += [f"{k}={v}" for k, v in sets.items()]
    return resolve(None, sets=pairs)


def cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT)}
    full.pop("HF_HUB_OFFLINE", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, env=full,
                          cwd=cwd or ROOT, timeout=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


# --------------------------------------------------------------------------- what is a hub item

def test_hub_ids_are_told_from_tiny_and_local_paths(tmp_path):
    (tmp_path / "m").mkdir()
    assert is_hub_model("acme/llama-mini") and is_hub_model("gpt2")
    assert not is_hub_model("tiny") and not is_hub_model(str(tmp_path / "m")) and not is_hub_model("./x")
    assert [i.kind for i in hub_items(spec_for(tmp_path))] == ["model"]
    assert hub_items(spec_for(tmp_path, model="tiny")) == []
    spec = spec_for(tmp_path, model="tiny", **{"data.path": "acme/corpus"})
    assert hub_items(spec) == [HubItem("dataset", "acme/corpus", None, "data.path")]


# --------------------------------------------------------------------------- pre-flight against the cache

def test_preflight_passes_when_the_shared_cache_holds_the_model(tmp_path):
    home = tmp_path / "hf"
    snap = fake_cache(home)
    spec = spec_for(tmp_path, hf_home=home)
    check_cached(spec)
    assert cached_snapshot(home, HubItem("model", "acme/llama-mini", None, "model.name")) == snap
    preflight.check(spec, slurm=True)  # the whole pre-flight of `launcher slurm`


@pytest.mark.parametrize("case", ["empty cache", "other model", "no config.json", "no weights", "other revision"])
def test_preflight_refuses_a_hub_model_missing_from_the_shared_cache(tmp_path, case):
    home = tmp_path / "hf"
    home.mkdir()
    sets = {}
    if case == "other model":
        fake_cache(home, repo="acme/other")
    elif case == "no config.json":
        fake_cache(home, config=False)
    elif case == "no weights":
        fake_cache(home, weights=False)
    elif case == "other revision":
        fake_cache(home)  # main only
        sets["model.revision"] = "v2"
    spec = spec_for(tmp_path, hf_home=home, **sets)
    with pytest.raises(UserError) as err:
        preflight.check(spec, slurm=True)
    msg = str(err.value)
    assert err.value.field == "model.name"
    assert "model.name='acme/llama-mini'" in msg and f"cluster.hf_home={home}" in msg and "launcher stage SPEC" in msg
    assert {"no config.json": "no config.json", "no weights": "no weights",
            "other revision": "refs/v2"}.get(case, "no snapshot") in msg


def test_preflight_finds_a_pinned_revision_by_branch_or_commit(tmp_path):
    home = tmp_path / "hf"
    fake_cache(home, ref="v2")
    check_cached(spec_for(tmp_path, hf_home=home, **{"model.revision": "v2"}))
    check_cached(spec_for(tmp_path, hf_home=home, **{"model.revision": SHA}))


def test_preflight_without_a_shared_cache_takes_this_machines_cache_or_asks_the_hub(tmp_path, monkeypatch):
    # no cluster.hf_home: the ranks may download, so the model must be in this machine's cache or on the hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "local-hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="acme/llama-mini.*cannot be reached.*launcher stage SPEC"):
        check_cached(spec_for(tmp_path))
    fake_cache(tmp_path / "local-hf")
    check_cached(spec_for(tmp_path))
    check_cached(spec_for(tmp_path, model="tiny", hf_home=tmp_path / "empty"))


def test_launcher_slurm_refuses_an_unstaged_model_with_exit_2_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    proc = cli("slurm", "--model", "acme/llama-mini", "--gpus-per-node", "0", "--set",
               f"cluster.hf_home={tmp_path / 'hf'}", "--out", str(run))
    assert proc.returncode == 2, proc.stderr
    assert "not in the shared hub cache" in proc.stderr and "launcher stage SPEC" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()


# --------------------------------------------------------------------------- launcher stage

def test_stage_with_nothing_from_the_hub_says_so_and_exits_0(tmp_path):
    proc = cli("stage", "--hf-home", str(tmp_path / "hf"), env={"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert proc.returncode == 0, proc.stderr
    assert "nothing to stage" in proc.stdout and "embedded tiny model" in proc.stdout
    assert not (tmp_path / "hf").exists()


def test_stage_without_a_reachable_hub_exits_1_naming_the_cause(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    proc = cli("stage", "--model", "acme/llama-mini", "--hf-home", str(tmp_path / "hf"),
               env={"HF_ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"cannot reach the hub at {endpoint}" in errors[0] and "Connection refused" in errors[0]
    assert "acme/llama-mini" in errors[0] and "Traceback" not in proc.stderr


def test_stage_refuses_hub_offline_mode_and_a_missing_local_model(tmp_path):
    proc = cli("stage", "--model", "acme/llama-mini", "--hf-home", str(tmp_path / "hf"), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr, proc.stderr
    proc = cli("stage", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "no such local model directory" in proc.stderr, proc.stderr


class _NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a repository that does not exist."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


def test_stage_of_a_repository_that_does_not_exist_is_bad_input(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        proc = cli("stage", "--model", "acme/nope", "--hf-home", str(tmp_path / "hf"), env={"HF_ENDPOINT": endpoint})
    finally:
        server.shutdown()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.name='acme/nope': no such model repository on" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- a staged hub dataset, offline

def fake_dataset(home: Path, repo: str = "acme/corpus", sha: str = SHA) -> Path:
    folder = home / "hub" / f"datasets--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / sha / "data"
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(sha)
    rows = [{"text": f"staged record {i}: the quick brown fox jumps over the lazy dog. " * 3} for i in range(40)]
    (snap / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return snap.parent


def test_preflight_refuses_a_hub_dataset_that_is_not_staged(tmp_path):
    home = tmp_path / "hf"
    spec = spec_for(tmp_path, model="tiny", hf_home=home, **{"data.path": "acme/corpus"})
    with pytest.raises(UserError) as err:
        check_cached(spec)
    assert "data.path='acme/corpus'" in str(err.value) and "launcher stage SPEC" in str(err.value)
    fake_dataset(home)
    check_cached(spec)  # staged: nothing to say


def test_a_staged_hub_dataset_is_prepared_with_the_hub_offline(tmp_path):
    """The preparation job runs with HF_HUB_OFFLINE=1 and HF_HOME on the shared cache: it reads the staged
    snapshot folder, never the hub."""
    home = tmp_path / "hf"
    fake_dataset(home)
    cp = cli("prepare", "--model", "tiny", "--data", "acme/corpus", "--seq-len", "32", "--set",
             f"cluster.hf_home={home}", "--set", "cluster.gpus_per_node=0",
             env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "LAUNCHER_CACHE": str(tmp_path / "cache"),
                  "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert cp.returncode == 0, cp.stderr[-3000:]
    [meta] = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("meta.json")]
    assert meta["documents"] == 40 and meta["tokens"] > 40 * 20, meta  # the 40 staged records
