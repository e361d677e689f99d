"""Experiment trackers on global rank 0: Weights & Biases and MLflow (TensorBoard is transformers' own
report_to), one tracker run across every attempt of a launcher run.

- Continuity: the first attempt creates the tracker run and keeps its id in RUN_DIR/trackers.json
  (rundir/trackers.py); every later attempt (requeue, retry, `--then` job, resume) reopens it. The last
  step logged is kept there too, and a step at or below it is not logged again (a retry that resumes from
  an older checkpoint redoes steps already logged).
- What goes in: the resolved spec and the plan as config/params; the Slurm job id, attempt and nodes as
  tags; every step line's and eval line's numbers (rundir/metrics.py's records) as metrics; at the end the
  run's cost as `launcher cost` reports it.
- Failures: a tracker that cannot start or log says so once on stderr and is dropped for the rest of the
  attempt; training goes on. API keys come from the environment only (WANDB_API_KEY, MLFLOW_TRACKING_*).

wandb and mlflow are imported inside the adapters (`pip install 'launcher[trackers]'`).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from launcher import identity
from launcher.config.spec import RunSpec
from launcher.ops.cost import run_cost
from launcher.plan.plan import Plan, make_plan
from launcher.rank.records import slurm_fields
from launcher.rundir import markers
from launcher.rundir.jobs import recorded_jobs
from launcher.rundir import trackers as state
from launcher.rundir.layout import RunDir
from launcher.rundir.metrics import PREFERENCE_EVAL_KEYS

# MLflow's HTTP client retries a failed request 7 times with exponential back-off (minutes); a tracker
# must not hold training that long, so one retry and a 10 s timeout unless the user set their own.
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PARAM_CHARS = 500  # a param value is cut to this (MLflow refuses values over a few thousand characters)


# --------------------------------------------------------------------------- pure parts

def flat_params(spec: RunSpec, plan: Plan) -> dict[str, str]:
    """The resolved spec and the plan as flat "spec.optim.lr" / "plan.world_size" -> text pairs."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[prefix] = text[:PARAM_CHARS]

    walk("spec", spec.to_dict())
    walk("plan", plan_config(plan))
    return out


def plan_config(plan: Plan) -> dict[str, Any]:
    """The plan's numbers and choices, as a tracker's config."""
    return {"world_size": plan.world_size, "nodes": plan.nodes, "nproc_per_node": plan.nproc_per_node,
            "device": plan.device, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
            "global_batch": plan.global_batch, "seq_len": plan.seq_len, "tokens_per_step": plan.tokens_per_step,
            "max_steps": plan.max_steps, "zero_stage": plan.zero_stage, "precision": plan.precision,
            "loss": plan.loss, "optimizer": plan.optimizer, "trainable_params": plan.trainable_params,
            "choices": list(plan.choices)}


def attempt_tags(env: dict[str, str] | None = None) -> dict[str, str]:
    """This attempt as tags: launcher's job key and attempt number, the Slurm job id and its nodes."""
    who = identity.current(env)
    slurm = slurm_fields(env)
    tags = {"job_id": who.job_key, "attempt": str(who.attempt)}
    if slurm["slurm_job_id"]:
        tags["slurm_job_id"] = slurm["slurm_job_id"]
    if slurm["nodes"]:
        tags["nodes"] = slurm["nodes"]
    return tags


def metric_values(record: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """("train" or "eval", the numbers to log) of a metrics.jsonl record (rundir/metrics.py)."""
    kind = "eval" if "eval_loss" in record else "train"
    if kind == "eval":
        keys = {"eval_loss": "eval/loss", **{k: f"eval/{k}" for k in ("perplexity", *PREFERENCE_EVAL_KEYS)}}
    else:
        keys = {k: k for k in ("loss", "lr", "tokens_per_s", "grad_norm")}
    values = {}
    for k, name in keys.items():
        v = record.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            values[name] = float(v)
    return kind, values


def cost_values(cost: dict[str, Any]) -> dict[str, float]:
    """The numbers of `launcher cost`'s report (ops/cost.run_cost) a tracker keeps."""
    out = {}
    for key in ("usd", "gpu_hours", "cpu_node_hours", "tokens", "usd_per_mtok"):
        v = cost.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"cost/{key}"] = float(v)
    return out


# --------------------------------------------------------------------------- adapters

class _Adapter:
    name = ""

    def __init__(self, spec: RunSpec, plan: Plan, run_dir: RunDir):
        self.spec, self.plan, self.run_dir = spec, plan, run_dir

    def start(self, entry: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:  # pragma: no cover
        """Open (entry has a run id) or create the tracker run; returns the fields to keep in trackers.json."""
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:  # pragma: no cover
        raise NotImplementedError

    def finish(self, reason: str, summary: dict[str, float]) -> None:  # pragma: no cover
        raise NotImplementedError


class WandbAdapter(_Adapter):
    name = "wandb"

    def start(self, entry: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
        w = self.spec.output.wandb
        run_id = entry.get("run_id") or secrets.token_hex(4)
        # mode goes to wandb.init, not into WANDB_MODE: transformers prints a line on import when that says offline
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        config = {"spec": self.spec.to_dict(), "plan": plan_config(self.plan),
                  f"attempt_{tags['job_id']}_{tags['attempt']}": tags}
        self.run = wandb.init(
            id=run_id, resume="allow" if w.mode == "online" else None, mode=w.mode,
            project=w.project or self.spec.name, entity=w.entity, name=self.spec.name,
            dir=str(self.run_dir.wandb_dir), config=config, allow_val_change=True,
            tags=[*w.tags, f"job-{tags['job_id']}", f"attempt-{tags['attempt']}"],
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.run.summary.update({"launcher/" + k: v for k, v in tags.items()})
        return {"run_id": run_id, "project": w.project or self.spec.name, "entity": w.entity, "mode": w.mode}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, reason: str, summary: dict[str, float]) -> None:
        if summary:
            self.run.summary.update(summary)
        self.run.finish(exit_code=0 if reason in (markers.COMPLETED, markers.REQUEUED) else 1)


class MlflowAdapter(_Adapter):
    name = "mlflow"

    def uri(self) -> str:
        return self.spec.output.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")

    def start(self, entry: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
        for k, v in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(k, v)
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (database set-up) say nothing to act on

        uri = self.uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        run_id = entry.get("run_id") if entry.get("tracking_uri") == uri else None
        experiment_id = entry.get("experiment_id")
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            name = self.spec.output.mlflow.experiment or self.spec.name
            exp = client.get_experiment_by_name(name)
            experiment_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run_id = client.create_run(experiment_id, run_name=self.spec.name,
                                       tags={"launcher.run_dir": str(self.run_dir.path)}).info.run_id
            params = [Param(k, v) for k, v in flat_params(self.spec, self.plan).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
        self.run_id = run_id
        for k, v in tags.items():  # the latest attempt's, and one tag per attempt that keeps them all
            client.set_tag(run_id, k, v)
        client.set_tag(run_id, f"attempt.{tags['job_id']}.{tags['attempt']}", json.dumps(tags))
        return {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()],
                              synchronous=True)

    def finish(self, reason: str, summary: dict[str, float]) -> None:
        if summary:
            self.log(self.summary_step, summary)
        if reason != markers.REQUEUED:  # a requeued run goes on: it stays RUNNING for the next attempt
            self.client.set_terminated(self.run_id, status="FINISHED" if reason == markers.COMPLETED else "FAILED")

    summary_step = 0


ADAPTERS: dict[str, type[_Adapter]] = {"wandb": WandbAdapter, "mlflow": MlflowAdapter}


def keep_mlflow_out(spec: RunSpec) -> bool:
    """Keep mlflow from being imported in this process when the run does not log to it; True if so.

    DeepSpeed imports mlflow whenever it is installed (deepspeed.runtime.config -> deepspeed.autotuning ->
    its autotuner, for autotuning runs only): 1.6 s of every rank's start-up and of the per-node launcher's
    when the trackers extra is installed. A None entry in sys.modules makes `import mlflow` fail as if it were
    not installed (DeepSpeed then goes without), and importlib.util.find_spec (which transformers asks)
    answer None. launcher itself imports mlflow only in its adapter; a run with the mlflow tracker keeps it."""
    if "mlflow" in spec.output.active_trackers() or "mlflow" in sys.modules:
        return False
    sys.modules["mlflow"] = None  # type: ignore[assignment]
    return True


# --------------------------------------------------------------------------- the fan-out

class Trackers:
    """The trackers of this run on this rank: wandb and mlflow adapters on global rank 0 (nothing on the
    others). `start` once the rank knows its run, `log` with each metrics record, `finish` at the end."""

    def __init__(self, run_dir: Path, *, rank: int | None = None):
        self.run_dir = RunDir(Path(run_dir))
        self.rank = identity.rank() if rank is None else rank
        self.adapters: list[_Adapter] = []
        self.last: dict[tuple[str, str], int] = {}
        self.max_steps = 0

    def _failed(self, adapter: _Adapter, what: str, exc: BaseException) -> None:
        """Say once, drop the tracker for the rest of this attempt; training goes on."""
        print(f"launcher: {adapter.name} tracker could not {what} ({type(exc).__name__}: {str(exc)[:300]}); "
              f"training goes on without it", file=sys.stderr, flush=True)
        self.adapters = [a for a in self.adapters if a is not adapter]

    def start(self, spec: RunSpec, plan: Plan) -> None:
        if self.rank != 0:
            return
        self.max_steps = plan.max_steps
        self.adapters = [ADAPTERS[n](spec, plan, self.run_dir) for n in spec.output.active_trackers() if n in ADAPTERS]
        tags = attempt_tags()
        known = state.read_state(self.run_dir.path)
        for a in list(self.adapters):
            entry = known.get(a.name, {})
            try:
                kept = a.start(entry, tags)
                self.last[(a.name, "train")] = state.last_step(entry)
                self.last[(a.name, "eval")] = state.last_step({"last_step": entry.get("last_eval_step")})
                state.update_state(self.run_dir.path, a.name, **kept)
            except Exception as exc:  # noqa: BLE001 - any failure of a tracker leaves training alone
                self._failed(a, "start", exc)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int) or not self.adapters:
            return
        kind, values = metric_values(record)
        for a in list(self.adapters):
            if step <= self.last.get((a.name, kind), 0) or not values:
                continue  # logged by an earlier attempt
            try:
                a.log(step, values)
                self.last[(a.name, kind)] = step
                state.update_state(self.run_dir.path, a.name,
                                   **{"last_step" if kind == "train" else "last_eval_step": step})
            except Exception as exc:  # noqa: BLE001
                self._failed(a, f"log step {step}", exc)

    def log_final(self, values: dict[str, float]) -> None:
        """Numbers about the finished run (a `--then eval` job's results), at the last step logged."""
        for a in list(self.adapters):
            step = max(self.last.get((a.name, "train"), 0), 0) or self.max_steps
            try:
                a.log(step, values)
            except Exception as exc:  # noqa: BLE001
                self._failed(a, "log the evaluation", exc)

    def finish(self, reason: str) -> None:
        if not self.adapters:
            return
        summary: dict[str, float] = {}
        if reason == markers.COMPLETED:
            summary = self._cost()
        for a in list(self.adapters):
            try:
                if isinstance(a, MlflowAdapter):
                    a.summary_step = max(self.last.get((a.name, "train"), 0), 0) or self.max_steps
                a.finish(reason, summary)
            except Exception as exc:  # noqa: BLE001
                self._failed(a, "finish", exc)
        self.adapters = []

    def _cost(self) -> dict[str, float]:
        """`launcher cost`'s numbers for the run so far (sacct answers for a Slurm job; this attempt is still
        running, so its time so far is counted)."""
        if not any(j.job_id[:1].isdigit() for j in recorded_jobs(self.run_dir.path)):
            return {}  # a local run (`launcher run`): no Slurm accounting to price
        try:
            return cost_values(run_cost(self.run_dir.path))
        except Exception as exc:  # noqa: BLE001 - no sacct, no price: the cost is left out, not the run
            print(f"launcher: the run's cost could not be read for the trackers ({type(exc).__name__}: "
                  f"{str(exc)[:200]})", file=sys.stderr, flush=True)
            return {}


def eval_values(res: dict[str, Any]) -> dict[str, float]:
    """`launcher eval`'s results (evaluate.evaluate) as tracker metrics: each set's tuned and base loss and
    their difference, and the forgetting verdict."""
    out: dict[str, float] = {}
    for e in res.get("sets") or []:
        name = str(e.get("name", "set"))
        tuned, base = e.get("tuned") or {}, e.get("base") or {}
        for key, v in (("tuned_loss", tuned.get("loss")), ("base_loss", base.get("loss")),
                       ("delta_loss", e.get("delta_loss"))):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                out[f"eval_job/{name}/{key}"] = float(v)
    if isinstance(res.get("forgetting_detected"), bool):
        out["eval_job/forgetting_detected"] = float(res["forgetting_detected"])
    return out


def log_eval_job(run_dir: Path, res: dict[str, Any]) -> None:
    """A `--then eval` job (or `launcher eval RUN_DIR` later) adds its results to the run's tracker runs, the
    ones its training attempts logged to. Nothing when the run has no wandb or mlflow tracker."""
    rd = RunDir(Path(run_dir))
    spec = rd.load_spec()
    if not any(t in ADAPTERS for t in spec.output.active_trackers()) or not state.read_state(rd.path):
        return
    trackers = Trackers(rd.path, rank=0)
    trackers.start(spec, make_plan(spec))
    trackers.log_final(eval_values(res))
    trackers.finish(markers.COMPLETED)
