"""Experiment trackers without a tracker: the spec fields and their refusals, the pure parts of the rank's
adapters, one tracker run across attempts (the run id and last step in trackers.json), a failing tracker
said once and dropped, `launcher sync`'s command, and the cluster profile's MLflow server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.config.resolve import resolve
from launcher.errors import SpecError, UserError
from launcher.ops import sync
from launcher.plan.plan import make_plan
from launcher.rank import trackers as rt
from launcher.rundir import trackers as state
from launcher.rundir.layout import RunDir


def _spec(tmp_path, *sets):
    return resolve(sets=[f"output.dir={tmp_path}", *sets])


def test_tensorboard_is_the_default_and_output_tensorboard_false_drops_it(tmp_path):
    assert _spec(tmp_path).output.active_trackers() == ["tensorboard"]
    spec = _spec(tmp_path, "output.trackers=[tensorboard,wandb]", "output.tensorboard=false")
    assert spec.output.active_trackers() == ["wandb"]


@pytest.mark.parametrize("setting, words", [
    ("output.trackers=[comet]", "output.trackers[0]: 'comet' is not allowed"),
    ("output.trackers=[wandb,wandb]", "wandb listed more than once"),
    ("output.wandb.mode=cloud", "output.wandb.mode"),
    ("output.mlflow.tracking_uri=ftp://host/x", "is not an MLflow tracking URI"),
    ("output.mlflow.tracking_uri=http://", "names no host"),
])
def test_bad_tracker_settings_are_refused_naming_the_field(tmp_path, setting, words):
    with pytest.raises(SpecError) as exc:
        _spec(tmp_path, setting)
    assert words in str(exc.value)


def test_a_password_in_the_tracking_uri_is_refused_and_not_repeated(tmp_path):
    with pytest.raises(SpecError) as exc:
        _spec(tmp_path, "output.mlflow.tracking_uri=http://me:hunter2@mlflow:5000")
    assert "MLFLOW_TRACKING_PASSWORD" in str(exc.value) and "hunter2" not in str(exc.value)


def test_the_cluster_profile_gives_the_mlflow_server_and_the_spec_wins(tmp_path):
    clusters = tmp_path / "clusters.yaml"
    clusters.write_text("lab:\n  mlflow_tracking_uri: http://mlflow.lab:5000\n  partitions: {cpu: {}}\n")
    from launcher.config import profiles

    layer = profiles.load("lab", str(clusters)).layer(None)
    assert layer["output"] == {"mlflow": {"tracking_uri": "http://mlflow.lab:5000"}}
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("output: {trackers: [mlflow]}\n")
    assert profiles.resolve(spec_file, cluster="lab", clusters_file=str(clusters)) \
        .output.mlflow.tracking_uri == "http://mlflow.lab:5000"
    spec_file.write_text("output: {mlflow: {tracking_uri: 'http://other:5000'}}\n")
    assert profiles.resolve(spec_file, cluster="lab", clusters_file=str(clusters)) \
        .output.mlflow.tracking_uri == "http://other:5000"
    clusters.write_text("lab:\n  mlflow_tracking_uri: 'not a uri'\n")
    with pytest.raises(UserError) as exc:
        profiles.load("lab", str(clusters))
    assert "mlflow_tracking_uri" in str(exc.value)


def test_params_flatten_the_resolved_spec_and_the_plan(tmp_path):
    spec = _spec(tmp_path, "optim.lr=0.002")
    params = rt.flat_params(spec, make_plan(spec))
    assert params["spec.optim.lr"] == "0.002" and params["spec.model.name"] == "tiny"
    assert params["plan.world_size"] == "1" and "plan.tokens_per_step" in params
    assert all(len(v) <= rt.PARAM_CHARS for v in params.values())


def test_attempt_tags_name_the_slurm_job_attempt_and_nodes():
    env = {"LAUNCHER_JOB_ID": "77", "LAUNCHER_ATTEMPT": "1", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1-2]"}
    assert rt.attempt_tags(env) == {"job_id": "77", "attempt": "1", "slurm_job_id": "77", "nodes": "node[1-2]"}


def test_metric_values_of_step_and_eval_records():
    assert rt.metric_values({"step": 3, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0, "grad_norm": None,
                             "time": 1.0}) == ("train", {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0})
    assert rt.metric_values({"step": 3, "eval_loss": 2.0, "perplexity": 7.4, "time": 1.0}) == \
        ("eval", {"eval/loss": 2.0, "eval/perplexity": 7.4})
    assert rt.metric_values({"step": 3, "eval_loss": 0.6, "perplexity": None, "reward_accuracy": 0.75,
                             "reward_margin": 0.4, "time": 1.0}) == \
        ("eval", {"eval/loss": 0.6, "eval/reward_accuracy": 0.75, "eval/reward_margin": 0.4})


class Recorder(rt._Adapter):
    """A tracker that records what it is given; run ids come from a counter (a new run when none is kept)."""

    name = "wandb"
    made = 0

    def start(self, entry, tags):
        if not entry.get("run_id"):
            Recorder.made += 1
        self.run_id = entry.get("run_id") or f"run{Recorder.made}"
        self.logged = []
        return {"run_id": self.run_id}

    def log(self, step, values):
        self.logged.append(step)

    def finish(self, reason, summary):
        self.reason = reason


def _attempt(tmp_path, monkeypatch, steps, attempt):
    monkeypatch.setitem(rt.ADAPTERS, "wandb", Recorder)
    monkeypatch.setenv("LAUNCHER_JOB_ID", "9")
    monkeypatch.setenv("LAUNCHER_ATTEMPT", str(attempt))
    spec = _spec(tmp_path, "output.trackers=[wandb]", "output.wandb.mode=offline")
    t = rt.Trackers(tmp_path, rank=0)
    t.start(spec, make_plan(spec))
    [adapter] = t.adapters
    for s in steps:
        t.log({"step": s, "loss": 1.0 / s, "lr": 0.1, "tokens_per_s": 1.0, "time": 0.0})
    t.finish("requeued")
    return adapter


def test_every_attempt_logs_to_one_run_and_no_step_twice(tmp_path, monkeypatch):
    Recorder.made = 0
    first = _attempt(tmp_path, monkeypatch, [1, 2, 3, 4], attempt=0)
    # a retry resumed from checkpoint-2 redoes steps 3 and 4, then goes on
    second = _attempt(tmp_path, monkeypatch, [3, 4, 5, 6], attempt=1)
    assert first.run_id == second.run_id == "run1" and Recorder.made == 1
    assert first.logged == [1, 2, 3, 4] and second.logged == [5, 6]
    assert state.read_state(tmp_path)["wandb"] == {"run_id": "run1", "last_step": 6}


def test_other_ranks_never_talk_to_a_tracker(tmp_path, monkeypatch):
    monkeypatch.setitem(rt.ADAPTERS, "wandb", Recorder)
    spec = _spec(tmp_path, "output.trackers=[wandb]")
    t = rt.Trackers(tmp_path, rank=1)
    t.start(spec, make_plan(spec))
    assert t.adapters == [] and not RunDir(tmp_path).trackers_path.exists()


class Broken(Recorder):
    def log(self, step, values):
        raise ConnectionError("tracker unreachable")


def test_a_failing_tracker_is_said_once_and_dropped_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(rt.ADAPTERS, "wandb", Broken)
    spec = _spec(tmp_path, "output.trackers=[wandb]")
    t = rt.Trackers(tmp_path, rank=0)
    t.start(spec, make_plan(spec))
    for s in (1, 2, 3):
        t.log({"step": s, "loss": 1.0, "lr": 0.1, "tokens_per_s": 1.0, "time": 0.0})
    t.finish("completed")
    err = capsys.readouterr().err
    assert err.count("wandb tracker could not log step 1") == 1 and "tracker unreachable" in err
    assert "step 2" not in err and t.adapters == []


def test_a_tracker_that_cannot_start_is_said_once(tmp_path, monkeypatch, capsys):
    class NoStart(Recorder):
        def start(self, entry, tags):
            raise RuntimeError("no such project")

    monkeypatch.setitem(rt.ADAPTERS, "wandb", NoStart)
    spec = _spec(tmp_path, "output.trackers=[wandb]")
    t = rt.Trackers(tmp_path, rank=0)
    t.start(spec, make_plan(spec))
    t.log({"step": 1, "loss": 1.0, "lr": 0.1, "tokens_per_s": 1.0, "time": 0.0})
    assert capsys.readouterr().err.count("could not start") == 1 and t.adapters == []


def test_a_damaged_trackers_file_starts_new_runs(tmp_path, capsys):
    RunDir(tmp_path).trackers_path.write_text("{cut off")
    assert state.read_state(tmp_path) == {}
    assert "trackers.json" in capsys.readouterr().err
    state.update_state(tmp_path, "mlflow", run_id="r", last_step=4)
    assert state.last_step(state.read_state(tmp_path)["mlflow"]) == 4


def _offline_run_dir(tmp_path, run_id="ab12cd34", mode="offline"):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "spec.yaml").write_text(_spec(rd).to_yaml())
    state.update_state(rd, "wandb", run_id=run_id, project="proj", entity=None, mode=mode)
    for stamp in ("20260101_000000", "20260101_010000"):
        (rd / "logs" / "wandb" / f"offline-run-{stamp}-{run_id}").mkdir(parents=True)
    return rd


def test_sync_uploads_every_attempt_into_the_one_run_id(tmp_path):
    rd = _offline_run_dir(tmp_path)
    argv, folders = sync.sync_argv(rd)
    assert argv[:5] == ["sync", "--id", "ab12cd34", "--project", "proj"]
    assert [f.name for f in folders] == ["offline-run-20260101_000000-ab12cd34", "offline-run-20260101_010000-ab12cd34"]
    assert argv[5:] == [str(f) for f in folders]


def test_sync_runs_wandb_and_a_failed_upload_is_exit_1(tmp_path, monkeypatch):
    rd = _offline_run_dir(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "wandb").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/called\nexit ${{FAKE_RC:-0}}\n")
    (fake / "wandb").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    cp = subprocess.run([sys.executable, "-m", "launcher", "sync", str(rd)], env=env, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "called").read_text().split()[:3] == ["sync", "--id", "ab12cd34"]
    cp = subprocess.run([sys.executable, "-m", "launcher", "sync", str(rd)], env={**env, "FAKE_RC": "3"},
                        capture_output=True, text=True)
    assert cp.returncode == 1 and "wandb sync exited 3" in cp.stderr


@pytest.mark.parametrize("mode, words", [("online", "logged online"), (None, "no wandb run")])
def test_sync_without_an_offline_run_is_exit_2(tmp_path, mode, words):
    rd = _offline_run_dir(tmp_path, mode=mode or "offline")
    if mode is None:
        RunDir(rd).trackers_path.unlink()
    with pytest.raises(UserError) as exc:
        sync.sync_argv(rd)
    assert words in str(exc.value)


def test_preflight_needs_a_tracking_uri_for_mlflow(tmp_path, monkeypatch):
    from launcher.submit import preflight

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError) as exc:
        preflight.check(_spec(tmp_path / "r", "output.trackers=[mlflow]"))
    assert "output.mlflow.tracking_uri" in str(exc.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    preflight.check(_spec(tmp_path / "r", "output.trackers=[mlflow]"))


def test_an_eval_job_adds_its_results_to_the_one_run(tmp_path, monkeypatch):
    Recorder.made = 0
    _attempt(tmp_path, monkeypatch, [1, 2, 3], attempt=0)
    logged = []
    monkeypatch.setattr(Recorder, "log", lambda self, step, values: logged.append((self.run_id, step, values)))
    (tmp_path / "spec.yaml").write_text(_spec(tmp_path, "output.trackers=[wandb]", "output.wandb.mode=offline").to_yaml())
    res = {"sets": [{"name": "held-out", "tuned": {"loss": 2.0}, "base": {"loss": 2.5}, "delta_loss": -0.5}],
           "forgetting_detected": False}
    rt.log_eval_job(tmp_path, res)
    assert logged == [("run1", 3, {"eval_job/held-out/tuned_loss": 2.0, "eval_job/held-out/base_loss": 2.5,
                                   "eval_job/held-out/delta_loss": -0.5, "eval_job/forgetting_detected": 0.0})]
    assert Recorder.made == 1


_MLFLOW_PROBE = r"""
import sys
from launcher.config.resolve import resolve
from launcher.rank.trackers import keep_mlflow_out
kept_out = keep_mlflow_out(resolve(sets=sys.argv[1:]))
from deepspeed.autotuning import autotuner  # imports mlflow whenever it can
print(kept_out, autotuner.has_mlflow, sys.modules.get("mlflow") is not None)
"""


@pytest.mark.parametrize("trackers, expect", [
    ("[tensorboard]", "True False False"),  # DeepSpeed goes without mlflow; nothing imported it
    ("[tensorboard,mlflow]", "False True True"),  # the run logs to mlflow: DeepSpeed and the adapter have it
])
def test_a_rank_imports_mlflow_only_when_the_run_logs_to_it(tmp_path, trackers, expect):
    pytest.importorskip("mlflow", reason="mlflow (the trackers extra, in the test install) is not installed")
    out = subprocess.run([sys.executable, "-c", _MLFLOW_PROBE, f"output.dir={tmp_path}", f"output.trackers={trackers}",
                          "output.mlflow.tracking_uri=file:///tmp/x"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == expect, out.stdout
