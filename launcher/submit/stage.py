"""Offline-first hub use: `launcher stage` puts the hub model (with its tokenizer, which lives in the same
repository) and hub dataset a spec names into a shared Hugging Face cache where a hub is reachable, so
that jobs run with HF_HOME on that cache and HF_HUB_OFFLINE=1; and the pre-flight check that the cache
holds the model before anything is queued.

Stdlib only at import (pre-flight runs in `launcher slurm`, which never imports heavy libraries);
huggingface_hub is imported by `stage()` alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config.spec import RunSpec
from launcher.data.source import data_files, source_spec
from launcher.errors import RunFailed, UserError
from launcher.hubcache import COMMIT, HUB_ID, HubItem, cached_snapshot, hf_home, repo_folder
from launcher.model.load import WEIGHT_FILES, has_weights

# Files a causal LM never needs from its repository: other frameworks' exports and duplicate originals.
# Kept apart from WEIGHT_FILES: these are download patterns for what to skip, not names a load reads.
_SKIP = ["original/*", "*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.tflite",
         "*.mlmodel", "coreml/*", "*.pth"]


def is_hub_model(name: str) -> bool:
    """A hub id ('org/name' or 'name'), not 'tiny' and not a local directory or path."""
    if name == "tiny" or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    return bool(HUB_ID.fullmatch(name))


def hub_items(spec: RunSpec) -> list[HubItem]:
    """What of the spec comes from a hub: the model (and its tokenizer) and the dataset. A local path that
    does not exist is bad input (UserError)."""
    items = []
    name = spec.model.name
    if is_hub_model(name):
        items.append(HubItem("model", name, spec.model.revision, "model.name"))
    elif name != "tiny" and not Path(name).expanduser().is_dir():
        raise UserError(f"model.name={name!r}: no such local model directory (and not a hub id 'org/name'); "
                        f"give a folder with config.json, 'tiny', or a hub id", field="model.name")
    if spec.data.path is not None:
        fmt, _ = data_files(spec)  # UserError for a missing local path
        if fmt == "hub":
            items.append(HubItem("dataset", spec.data.path, None, "data.path"))
    for k, src in enumerate(spec.data.sources):  # a mixture's sources, each a path or a hub dataset
        if data_files(source_spec(spec, k))[0] == "hub":
            items.append(HubItem("dataset", src.path, None, f"data.sources[{k}].path"))
    return items


def missing_in_cache(home: Path, item: HubItem) -> str | None:
    """What an offline load of a staged model would miss (config.json, weights), or None when it is there."""
    snap = cached_snapshot(home, item)
    if snap is None:
        rev = f"refs/{item.revision or 'main'}" if not COMMIT.fullmatch(item.revision or "") else "that commit"
        return f"no snapshot for {rev} in {repo_folder(home, item)}"
    if item.kind == "model":
        if not (snap / "config.json").is_file():
            return f"{snap} has no config.json"
        if not has_weights(snap):  # the names an offline from_pretrained looks for
            return f"{snap} has no weights ({' or '.join(WEIGHT_FILES)}, whole or sharded with an index)"
    return None


def check_cached(spec: RunSpec) -> None:
    """Pre-flight: with cluster.hf_home set, the jobs (the preparation job included) load the model and the
    dataset offline from it (HF_HUB_OFFLINE=1), so a hub model or dataset must already be there. UserError
    (exit 2) naming the item and the fix otherwise. Without cluster.hf_home, each hub item must be in this
    machine's hub cache or known to the hub (check_on_hub)."""
    if not spec.cluster.hf_home:
        home, _ = hf_home(spec)
        for item in hub_items(spec):
            if missing_in_cache(home, item) is not None:
                check_on_hub(item)
        return
    home = Path(spec.cluster.hf_home).expanduser()
    for item in hub_items(spec):
        why = missing_in_cache(home, item)
        if why:
            rev = f" (revision {item.revision})" if item.revision else ""
            raise UserError(f"{item.field}={item.repo_id!r}{rev} is not in the shared hub cache cluster.hf_home="
                            f"{home} ({why}); the jobs load it offline (HF_HUB_OFFLINE=1). Stage it first where "
                            f"the hub is reachable: launcher stage SPEC (the same spec and flags)", field=item.field)


HUB_CHECK_TIMEOUT_S = 10.0


def check_on_hub(item: HubItem) -> None:
    """Ask the hub whether `item` exists (its API, stdlib only, a few seconds at most), so that a typo or an
    unreachable hub is exit 2 here and not a failed job after the run dir was written. HF_HUB_OFFLINE: the
    ranks could not download it either."""
    import json
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    what = f"{item.field}={item.repo_id!r}" + (f" (revision {item.revision})" if item.revision else "")
    fix = ("run `launcher stage SPEC` where the hub is reachable and set cluster.hf_home to that cache, or give "
           "a local path" + (" (--model DIR)" if item.kind == "model" else " (--data FILE)"))
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{what} is not in this machine's hub cache and HF_HUB_OFFLINE is set, so it cannot be "
                        f"downloaded; {fix}", field=item.field)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/{item.repo_type}s/{urllib.parse.quote(item.repo_id, safe='/')}"
    if item.revision:
        url += f"/revision/{urllib.parse.quote(item.revision, safe='')}"
    request = urllib.request.Request(url, method="GET")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HUB_CHECK_TIMEOUT_S) as resp:  # noqa: S310 - the hub's URL
            json.loads(resp.read(1 << 20) or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403, 404):
            raise UserError(f"{what}: no such {item.repo_type} repository{' or revision' if item.revision else ''} "
                            f"on {endpoint} (or it is private or gated: set HF_TOKEN); check the name, or {fix}",
                            field=item.field) from None
        raise UserError(f"{what}: the hub at {endpoint} answered HTTP {exc.code} when asked for it; {fix}",
                        field=item.field) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        cause = getattr(exc, "reason", None) or exc
        raise UserError(f"{what} is not a local folder, not in this machine's hub cache, and the hub at {endpoint} "
                        f"cannot be reached to check it ({str(cause)[:120]}); {fix}", field=item.field) from None


# --------------------------------------------------------------------------- staging

@dataclass
class Staged:
    item: HubItem
    snapshot: Path
    files: int
    bytes: int


def stage(spec: RunSpec, hf_home_flag: str | None = None, *, say: Any = print) -> list[Staged]:
    """Download every hub item of the spec into HF_HOME/hub (what is there already is checked, not fetched
    again). Nothing to stage (tiny, local paths): says so and returns []. Cannot reach the hub: RunFailed
    (exit 1) naming the endpoint and the cause; a repository or revision that does not exist, or is gated:
    UserError (exit 2)."""
    items = hub_items(spec)
    if not items:
        model = "the embedded tiny model" if spec.model.name == "tiny" else f"the local model {spec.model.name}"
        data = "the embedded corpus" if spec.data.path is None else f"the local data {spec.data.path}"
        say(f"nothing to stage: {model} and {data} need no hub")
        return []
    home, source = hf_home(spec, hf_home_flag)
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set in this environment, so nothing can be downloaded; run "
                        "`launcher stage` where the hub is reachable, without HF_HUB_OFFLINE")
    say(f"cache        {home} (from {source}); hub {constants.ENDPOINT}")
    done = []
    for item in items:
        rev = f"@{item.revision}" if item.revision else ""
        say(f"staging      {item.kind} {item.repo_id}{rev} ...")
        try:
            path = Path(snapshot_download(item.repo_id, repo_type=item.repo_type, revision=item.revision,
                                          cache_dir=str(home / "hub"),
                                          ignore_patterns=_SKIP if item.kind == "model" else None))
        except Exception as exc:  # classified: bad input (2), unreachable hub (1), anything else raised on
            raise _explain(exc, item, constants.ENDPOINT) from None
        files = [f for f in path.rglob("*") if f.is_file()]
        s = Staged(item, path, len(files), sum(f.stat().st_size for f in files))
        done.append(s)
        say(f"staged       {item.kind} {item.repo_id}{rev}: {s.files} files, {s.bytes / 2**20:,.1f} MiB in {path}")
    if spec.cluster.hf_home is None or Path(spec.cluster.hf_home).expanduser().resolve() != home:
        say(f"jobs read this cache offline with cluster.hf_home: {home} (in the spec or the cluster profile)")
    else:
        say(f"jobs read this cache offline: cluster.hf_home={home}, HF_HUB_OFFLINE=1")
    return done


def _explain(exc: Exception, item: HubItem, endpoint: str) -> Exception:
    """The one message for a failed download: UserError for what the spec can fix, RunFailed for a hub that
    cannot be reached; anything unknown is returned as it is (a bug until understood)."""
    from huggingface_hub import errors as hf_errors

    what = f"{item.field}={item.repo_id!r}"
    if isinstance(exc, hf_errors.GatedRepoError):
        return UserError(f"{what} is gated on {endpoint}: accept its licence on its hub page with your account, then "
                         f"set HF_TOKEN (or `hf auth login`) and run `launcher stage` again", field=item.field)
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return UserError(f"{what}: no such {item.repo_type} repository on {endpoint} (or it is private: set "
                         f"HF_TOKEN); check the name", field=item.field)
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return UserError(f"model.revision={item.revision!r}: no such branch, tag or commit in {item.repo_id} on "
                         f"{endpoint}", field="model.revision")
    if isinstance(exc, hf_errors.HFValidationError):
        return UserError(f"{what} is not a valid hub repository id ({exc})", field=item.field)
    cause = exc.__cause__ or exc.__context__
    net = _network_cause(exc) or _network_cause(cause)
    if net or isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.HfHubHTTPError)):
        detail = net or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return RunFailed(f"cannot reach the hub at {endpoint} to stage {item.kind} {item.repo_id} ({detail}). "
                         f"`launcher stage` needs network access to the hub: run it on a machine that has it "
                         f"(a login node), or point HF_ENDPOINT at a reachable mirror")
    return exc


def _network_cause(exc: BaseException | None) -> str | None:
    """'ConnectError: [Errno 111] Connection refused' when exc is a connection/timeout/DNS failure."""
    if exc is None:
        return None
    name = type(exc).__name__
    if isinstance(exc, (ConnectionError, TimeoutError)) or re.search(r"Connect|Timeout|NetworkError|ProxyError|"
                                                                     r"RemoteProtocolError", name):
        return f"{name}: {exc}"
    return None
