"""What a run really cost: GPU-hours from sacct, every attempt of every job the run dir recorded
(failed, requeued, preparation, chained), priced at the run's cluster prices, and dollars per 1M
tokens the run really trained, beside the estimate for its spec.

- GPU-hours = sum over `sacct -D -X` rows of ElapsedRaw x AllocTRES gres/gpu / 3600.
- A job with GPUs is priced per GPU-hour; a CPU job per node-hour (or per CPU-hour where the
  profile's partition gives only that). Prices: the cluster profile's partition the attempt ran
  in when the profile can be loaded (`--clusters`, $LAUNCHER_CLUSTERS, the default file), else the
  prices the spec carries (cluster.usd_per_gpu_hour / usd_per_node_hour, copied from the profile
  when the run dir was made).
- Tokens trained = the last step the run reached x tokens per optimizer step (the plan's
  global batch x seq_len); the step comes from RUN_DIR/logs/metrics.jsonl, which rank 0 writes at
  every logging step, else from the step lines of the train jobs' logs. Steps redone after a
  requeue are paid but not counted twice.
- The estimate is `launcher.plan.estimate.estimate` for the run's spec at the same price; its error is
  estimate / paid - 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config import profiles
from launcher.errors import UserError
from launcher.ops import slurmtools as st
from launcher.ops.logs import job_log_files, last_step, read_tail
from launcher.ops.slurmtools import Attempt
from launcher.plan import estimate as est
from launcher.plan import hardware
from launcher.plan.plan import make_plan
from launcher.plan.price import usd_per_mtok
from launcher.rundir import metrics
from launcher.rundir.jobs import recorded_jobs
from launcher.rundir.layout import RunDir, open_run_dir


@dataclass
class Rate:
    usd_per_gpu_hour: float | None = None
    usd_per_node_hour: float | None = None
    usd_per_cpu_hour: float | None = None


@dataclass
class Prices:
    """Prices of a run: the spec's, and per partition the profile's where it could be loaded."""

    default: Rate = field(default_factory=Rate)
    partitions: dict[str, Rate] = field(default_factory=dict)
    gpu_types: dict[str, str] = field(default_factory=dict)  # partition -> profile gpu_type
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, clusters_file: str | None = None) -> "Prices":
        p = cls()
        profiles.check_file(clusters_file)
        try:
            spec = RunDir(Path(run_dir)).load_spec()
        except (UserError, OSError) as exc:
            p.notes.append(f"spec.yaml unreadable, no prices: {exc}")
            return p
        c = spec.cluster
        p.default = Rate(c.usd_per_gpu_hour, c.usd_per_node_hour, None)
        if c.profile:
            try:
                prof = profiles.load(c.profile, clusters_file)
            except UserError:
                if clusters_file:
                    raise
                p.notes.append(f"cluster profile {c.profile!r} not found; prices from spec.yaml")
            else:
                for name, part in prof.partitions.items():
                    p.partitions[name] = Rate(part.usd_per_gpu_hour, part.usd_per_node_hour, part.usd_per_cpu_hour)
                    if part.gpu_type:
                        p.gpu_types[name] = part.gpu_type
        return p

    def rate(self, partition: str) -> Rate:
        part = self.partitions.get(partition)
        if part is None:
            return self.default
        return Rate(
            part.usd_per_gpu_hour if part.usd_per_gpu_hour is not None else self.default.usd_per_gpu_hour,
            part.usd_per_node_hour if part.usd_per_node_hour is not None else self.default.usd_per_node_hour,
            part.usd_per_cpu_hour)

    def price(self, a: Attempt) -> tuple[float | None, str]:
        """(dollars, how) for one attempt; None when no price applies."""
        r = self.rate(a.partition)
        hours = a.elapsed_s / 3600
        if a.gpus and r.usd_per_gpu_hour is not None:
            return hours * a.gpus * r.usd_per_gpu_hour, f"{a.gpus} GPU x ${r.usd_per_gpu_hour}/GPU-h"
        if r.usd_per_node_hour is not None and a.nodes:
            return hours * a.nodes * r.usd_per_node_hour, f"{a.nodes} node x ${r.usd_per_node_hour}/node-h"
        if r.usd_per_cpu_hour is not None and a.cpus:
            return hours * a.cpus * r.usd_per_cpu_hour, f"{a.cpus} CPU x ${r.usd_per_cpu_hour}/CPU-h"
        if a.elapsed_s == 0:
            return 0.0, "never ran"
        return None, "no price for " + ("GPU-hours" if a.gpus else "CPU jobs") + " in the profile/spec"

    def usd_for_attempts(self, attempts: list[Attempt]) -> float | None:
        total, priced = 0.0, False
        for a in attempts:
            usd, _ = self.price(a)
            if usd is not None:
                total, priced = total + usd, True
        return total if priced or not attempts else None


# --------------------------------------------------------------------------- tokens

def steps_trained(run_dir: Path) -> tuple[int | None, str]:
    """(last step reached, where it was read)."""
    rd = RunDir(run_dir)
    step, _ = metrics.progress(rd.path)
    if step is not None:
        return step, str(rd.metrics_path.relative_to(rd.path))
    best = None
    for jid, kind, _ in recorded_jobs(rd.path):
        if kind != "train":
            continue
        s, _, _ = last_step(read_tail(job_log_files(rd.path, jid)))
        if s is not None and (best is None or s > best):
            best = s
    if best is None:
        for p in sorted(rd.logs.glob("*.out")) if rd.logs.is_dir() else []:
            s, _, _ = last_step(read_tail([p]))
            if s is not None and (best is None or s > best):
                best = s
    return best, "step lines of the train logs"


def tokens_trained(run_dir: Path) -> dict[str, Any]:
    """Tokens the run trained: last step x the plan's tokens per step (sweep tasks summed)."""
    dirs = [t.path for t in RunDir(run_dir).task_dirs()] or [run_dir]
    total, parts = 0, []
    any_steps = False
    for d in dirs:
        plan = make_plan(RunDir(d).load_spec())
        step, where = steps_trained(d)
        if step is None and d != run_dir:
            # array tasks log into the parent's logs/ (%x-%A_%a.out); metrics live in the task dir
            step, where = None, "no step recorded"
        if step is not None:
            any_steps = True
            total += step * plan.tokens_per_step
        parts.append({"dir": str(d), "step": step, "max_steps": plan.max_steps, "tokens_per_step": plan.tokens_per_step,
                      "from": where if step is not None else "no step recorded"})
    return {"tokens": total if any_steps else None, "parts": parts}


# --------------------------------------------------------------------------- estimate

def estimate_for(run_dir: Path, prices: Prices) -> dict[str, Any]:
    """The estimator's $ per 1M tokens for the run's spec at the run's price (None where it has none)."""
    spec = RunDir(run_dir).load_spec()
    plan = make_plan(spec)
    c = spec.cluster
    if c.gpus_per_node == 0:
        return {"usd_per_mtok": None, "note": "CPU run: the estimator models GPU step time only"}
    known = hardware.find(prices.gpu_types.get(c.partition or ""))
    device = known.key if known is not None else "H100-80GB"
    note = None if known is not None else "device assumed H100-80GB"
    rate = prices.rate(c.partition or "").usd_per_gpu_hour
    if rate is None:
        return {"usd_per_mtok": None, "device": device, "note": "no GPU-hour price in the profile/spec"}
    try:
        e = est.estimate(spec, plan, device=device, usd_per_device_hour=rate)
    except UserError as exc:
        return {"usd_per_mtok": None, "device": device, "note": str(exc)}
    return {"usd_per_mtok": e.usd_per_mtok, "tokens_per_s": e.tokens_per_s, "device": device,
            "usd_per_device_hour": rate, "assumed_mfu": e.assumed_mfu, "note": note}


# --------------------------------------------------------------------------- a run

def run_cost(run_dir: str | os.PathLike, clusters_file: str | None = None,
             attempts: dict[str, list[Attempt]] | None = None) -> dict[str, Any]:
    """The cost report of one run dir (JSON-ready). `attempts` (job id -> sacct attempts) is read
    with `sacct -D -X` when not given."""
    rd = open_run_dir(run_dir)
    kinds = {j.job_id: j.kind for j in recorded_jobs(rd.path)}
    if attempts is None:
        attempts = st.group_attempts(st.sacct(list(kinds))) if kinds else {}
    prices = Prices.for_run(rd.path, clusters_file)
    rows: list[dict[str, Any]] = []
    gpu_h = node_h = cpu_h = 0.0
    usd_total, unpriced = 0.0, 0
    for jid, group in attempts.items():
        kind = kinds.get(jid) or kinds.get(st.base_job_id(jid)) or "job"
        for i, a in enumerate(group):
            usd, how = prices.price(a)
            hours = a.elapsed_s / 3600
            gpu_h += hours * a.gpus
            if not a.gpus:
                node_h += hours * a.nodes
                cpu_h += hours * a.cpus
            if usd is None:
                unpriced += 1
            else:
                usd_total += usd
            rows.append({"job_id": jid, "attempt": i + 1, "kind": kind, "state": a.state, "partition": a.partition,
                         "elapsed_s": a.elapsed_s, "gpus": a.gpus, "nodes": a.nodes, "cpus": a.cpus,
                         "gpu_hours": hours * a.gpus, "usd": usd, "price": how})
    missing = [j for j in kinds if j not in attempts and not any(st.base_job_id(k) == j for k in attempts)]
    tokens = tokens_trained(rd.path)
    usd = usd_total if unpriced < len(rows) or not rows else None
    paid = usd_per_mtok(usd, tokens["tokens"])
    est = estimate_for(rd.path, prices)
    error = None
    if paid and est.get("usd_per_mtok"):
        error = est["usd_per_mtok"] / paid - 1
    notes = list(prices.notes)
    if unpriced:
        notes.append(f"{unpriced} attempt(s) have no price (see their 'price'); dollars count the others")
    if missing:
        notes.append(f"sacct has no record of job(s) {', '.join(missing)} (not started yet, or accounting lost them)")
    if any(group and group[-1].state in st.LIVE_STATES for group in attempts.values()):
        notes.append("some jobs still run: their time so far is counted")
    return {"run_dir": str(rd.path), "attempts": rows, "gpu_hours": gpu_h, "cpu_node_hours": node_h,
            "cpu_hours": cpu_h, "usd": usd,
            "tokens": tokens["tokens"], "tokens_detail": tokens["parts"], "usd_per_mtok": paid,
            "estimate": est, "estimate_error": error, "notes": notes}


def format_cost(c: dict[str, Any]) -> list[str]:
    lines = [c["run_dir"]]
    for r in c["attempts"]:
        usd = "-" if r["usd"] is None else f"${r['usd']:.4f}"
        lines.append(f"  {r['job_id']:<12} {r['kind']:<7} attempt {r['attempt']}  {r['state']:<10} "
                     f"{st.format_duration(r['elapsed_s'])}  {r['gpus']} GPU  {r['nodes']} node  {usd}  ({r['price']})")
    lines.append(f"  GPU-hours      {c['gpu_hours']:.4f}" + (f"   CPU node-hours {c['cpu_node_hours']:.4f}"
                                                             if c["cpu_node_hours"] else ""))
    lines.append("  paid           " + ("-" if c["usd"] is None else f"${c['usd']:.4f}"))
    lines.append("  tokens trained " + ("-" if c["tokens"] is None else f"{c['tokens']:,}"))
    lines.append("  $ per 1M tokens paid " + ("-" if c["usd_per_mtok"] is None else f"{c['usd_per_mtok']:.4g}"))
    e = c["estimate"]
    est = "-" if e.get("usd_per_mtok") is None else f"{e['usd_per_mtok']:.4g} ({e.get('device')})"
    err = "" if c["estimate_error"] is None else f", error {c['estimate_error']:+.1%}"
    lines.append(f"  $ per 1M tokens estimated {est}{err}" + (f"  [{e['note']}]" if e.get("note") else ""))
    for n in c["notes"]:
        lines.append(f"  note: {n}")
    return lines
