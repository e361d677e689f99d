"""Run records: the manifest says what produced a run, `--from` reproduces it, `runs` lists runs."""

from __future__ import annotations

import json

import pytest
import yaml

from launcher.rundir import metrics
from launcher.rundir.layout import RunDir
from launcher.rundir.manifest import read_manifest


def _without_paths(spec_text: str) -> dict:
    tree = yaml.safe_load(spec_text)
    tree["output"].pop("dir")
    return tree


def test_manifest_records_what_produced_the_run(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n' * 20)
    run = tmp_path / "a"
    cli("slurm", "--data", str(data), "--seq-len", "64", "--set", "optim.seed=7", "--out", str(run), check=True)
    m = read_manifest(run)
    assert m["packages"]["transformers"] and m["packages"]["deepspeed"] and m["launcher_version"]
    assert m["seed"] == 7 and m["plan"]["world_size"] == 1
    [fp] = m["data"]
    assert fp["path"] == str(data) and fp["bytes"] == data.stat().st_size and len(fp["sha256"]) == 64


def test_from_reproduces_spec_and_deepspeed_config(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli("slurm", "--zero", "3", "--nproc", "2", "--global-batch", "8", "--set", "optim.lr=3e-4",
        "--set", "cluster.time=2:00:00", "--out", str(a), check=True)
    cli("slurm", "--from", str(a), "--out", str(b), check=True)
    assert _without_paths((a / "spec.yaml").read_text()) == _without_paths((b / "spec.yaml").read_text())
    assert (a / "ds_config.json").read_text() == (b / "ds_config.json").read_text()
    assert yaml.safe_load((b / "spec.yaml").read_text())["output"]["dir"] == str(b)
    assert (b / "job.sbatch").read_text().replace(str(b), "RUN") == (a / "job.sbatch").read_text().replace(str(a), "RUN")


def test_from_with_a_flag_changes_only_that(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli("slurm", "--out", str(a), check=True)
    cli("slurm", "--from", str(a), "--max-steps", "7", "--out", str(b), check=True)
    ta, tb = _without_paths((a / "spec.yaml").read_text()), _without_paths((b / "spec.yaml").read_text())
    assert tb["optim"].pop("max_steps") == 7 and ta["optim"].pop("max_steps") == 100
    assert ta == tb


def test_from_refuses_a_non_run_dir_and_spec_together(cli, tmp_path):
    proc = cli("slurm", "--from", str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not a run dir" in proc.stderr
    spec = tmp_path / "s.yaml"
    spec.write_text("{}\n")
    cli("slurm", "--out", str(tmp_path / "a"), check=True)
    proc = cli("slurm", str(spec), "--from", str(tmp_path / "a"), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_runs_lists_run_dirs_with_key_numbers(cli, tmp_path):
    root = tmp_path / "runs"
    cli("slurm", "--name", "alpha", "--out", str(root / "a"), check=True)
    cli("slurm", "--name", "beta", "--method", "lora", "--out", str(root / "nested" / "b"), check=True)
    metrics.append(RunDir(root / "a").metrics_path, metrics.step_record(5, 2.5, 1e-4, 100.0, None, 0.0))
    rows = [json.loads(x) for x in cli("runs", str(root), "--json", check=True).stdout.splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"alpha", "beta"}
    assert (by_name["alpha"]["step"], by_name["alpha"]["loss"]) == (5, 2.5)
    assert by_name["beta"]["method"] == "lora"
    table = cli("runs", str(root), check=True).stdout
    assert "alpha" in table and "2.5000" in table


# --------------------------------------------------------------------------- what the ranks add

def test_each_attempt_is_appended_never_overwritten(tmp_path):
    from launcher.rundir.manifest import record_attempt, update_manifest

    update_manifest(tmp_path, name="r", plan={"world_size": 1})
    record_attempt(tmp_path, "77", 0, start=1.0, nodes="node[1-2]", slurm_job_id="77")
    record_attempt(tmp_path, "77", 0, end=2.0, exit_reason="requeue", end_step=4)
    record_attempt(tmp_path, "77", 1, start=3.0, start_step=4)  # the requeued job: same id, next attempt
    m = read_manifest(tmp_path)
    assert m["name"] == "r" and m["plan"] == {"world_size": 1}  # the launch record stays
    first, second = m["attempts"]
    assert first == {"job_id": "77", "attempt": 0, "start": 1.0, "nodes": "node[1-2]", "slurm_job_id": "77",
                     "end": 2.0, "exit_reason": "requeue", "end_step": 4}
    assert (second["attempt"], second["start_step"]) == (1, 4)


def test_tokens_in_the_final_model_count_only_the_steps_it_kept():
    from launcher.rundir.manifest import tokens_in_model

    # 1 rank to step 6 (checkpoint at 4, killed: no end), 2 ranks from 4 to 7 (stopped, checkpoint at 7),
    # a bad-input attempt that never trained, then 2 ranks from 7 to 10
    attempts = [{"start_step": 0, "end_step": None, "tokens_per_step": 100},
                {"start_step": 4, "end_step": 7, "tokens_per_step": 200},
                {"start_step": 7, "end_step": 7, "tokens_per_step": 200},
                {"start_step": 7, "end_step": 10, "tokens_per_step": 200}]
    assert tokens_in_model(attempts) == 4 * 100 + 3 * 200 + 3 * 200
    # a failed attempt whose steps after its last checkpoint were redone counts only up to that checkpoint
    assert tokens_in_model([{"start_step": 0, "end_step": 9, "tokens_per_step": 10},
                            {"start_step": 6, "end_step": 12, "tokens_per_step": 10}]) == 120
    assert tokens_in_model([]) == 0


def test_last_metrics_and_slurm_fields():
    import math

    from launcher.rank.records import last_metrics, slurm_fields

    hist = [{"loss": 3.0, "step": 1}, {"eval_loss": 2.5, "step": 2}, {"loss": 2.0, "step": 2}, {"train_runtime": 9}]
    m = last_metrics(hist)
    assert (m["loss"], m["loss_step"], m["eval_loss"], m["eval_step"]) == (2.0, 2, 2.5, 2)
    assert math.isclose(m["perplexity"], math.exp(2.5))
    # a preference task's evaluation: its loss has no perplexity; reward accuracy and margin instead
    pref_log = [{"loss": 0.7, "step": 1}, {"eval_loss": 0.6, "eval_rewards/accuracies": 0.5,
                                           "eval_rewards/margins": 0.1, "step": 2}]
    pref = last_metrics(pref_log, preference=True)
    assert "perplexity" not in pref and (pref["reward_accuracy"], pref["reward_margin"]) == (0.5, 0.1)
    # the task decides, as for the eval line, not the keys: a language model's custom eval_accuracy is no reward
    lm = last_metrics([{"eval_loss": 2.0, "eval_accuracy": 0.4, "step": 3}])
    assert math.isclose(lm["perplexity"], math.exp(2.0)) and "reward_accuracy" not in lm
    # a preference evaluation without TRL's reward keys still has no perplexity
    assert "perplexity" not in last_metrics([{"eval_loss": 0.6, "step": 2}], preference=True)
    assert slurm_fields({"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "gpu[01-02]"}) == {
        "slurm_job_id": "12", "slurm_array_task_id": None, "nodes": "gpu[01-02]"}
    assert slurm_fields({}) == {"slurm_job_id": None, "slurm_array_task_id": None, "nodes": None}


def test_runs_prefers_the_manifest_final_numbers(cli, tmp_path):
    root = tmp_path / "runs"
    from launcher.rundir.manifest import record_attempt, update_manifest

    cli("slurm", "--name", "done", "--out", str(root / "a"), check=True)
    record_attempt(root / "a", "5", 0, start_step=0, end_step=100, tokens_per_step=4096, exit_reason="completed")
    update_manifest(root / "a", final={"steps": 100, "loss": 1.25, "tokens": 409_600, "eval_loss": 1.5})
    metrics.append(RunDir(root / "a").metrics_path, metrics.step_record(99, 9.0, 1e-4, 100.0, None, 0.0))
    [row] = [json.loads(x) for x in cli("runs", str(root), "--json", check=True).stdout.splitlines()]
    assert (row["step"], row["loss"], row["tokens"], row["eval_loss"]) == (100, 1.25, 409_600, 1.5)
    assert row["last_exit"] == "completed" and row["attempts"] == 1
    table = cli("runs", str(root), check=True).stdout
    assert "tokens" in table.splitlines()[0] and "409,600" in table and "1.2500" in table


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "freeze"])
def test_plan_txt_names_the_trainable_count_of_every_method(cli, tmp_path, method):
    from launcher.config.resolve import resolve
    from launcher.plan import params
    from launcher.plan import modelinfo

    sets = ["method.freeze.top_layers=1"] if method == "freeze" else []
    args = [x for s in sets for x in ("--set", s)]
    cli("slurm", "--method", method, *args, "--out", str(tmp_path / "run"), check=True)
    n = params.count_params(modelinfo.load("tiny"), resolve(sets=[f"method.name={method}", *sets])).trainable
    assert f"trainable    {n:,} parameters ({method})" in (tmp_path / "run" / "plan.txt").read_text()


def test_run_from_needs_a_new_out(cli, tmp_path):
    cli("slurm", "--out", str(tmp_path / "a"), check=True)
    proc = cli("run", "--from", str(tmp_path / "a"))
    assert proc.returncode == 2 and "--out NEW_DIR" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "PROMPT_TUNING"])
def test_merge_refuses_virtual_token_adapters(cli, tmp_path, peft_type):
    cli("slurm", "--method", "prefix" if peft_type == "PREFIX_TUNING" else "prompt", "--out", str(tmp_path / "a"),
        check=True)
    (tmp_path / "a" / "final").mkdir()
    (tmp_path / "a" / "final" / "adapter_config.json").write_text(
        json.dumps({"peft_type": peft_type, "num_virtual_tokens": 8}))
    proc = cli("merge", str(tmp_path / "a"), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot be merged" in proc.stderr and "8 learned virtual tokens" in proc.stderr
    assert "AutoPeftModelForCausalLM" in proc.stderr and not (tmp_path / "m").exists()


def test_the_watchdog_ending_the_attempt_waits_for_the_main_threads_end(tmp_path, monkeypatch):
    """Rank 0's collective fails when its peer dies, just as its own watchdog's deadline passes: the main
    thread is writing the end record when the watchdog ends the attempt and exits. The end written first
    must reach manifest.json whole before the watchdog returns (and exits)."""
    import threading
    import time

    from launcher.rank import records
    from launcher.rundir import manifest

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LAUNCHER_JOB_ID", "j")
    rec = records.Attempt(tmp_path, tokens_per_step=8, world_size=2, max_steps=4, device="cpu")
    slow_write, in_write = manifest.record_attempt, threading.Event()

    def record_attempt(*a, **kw):
        in_write.set()
        time.sleep(0.5)  # the main thread is inside its write when the watchdog fires
        return slow_write(*a, **kw)

    monkeypatch.setattr(records.manifest_file, "record_attempt", record_attempt)
    main = threading.Thread(target=rec.end, args=("collective_timeout",), kwargs={"message": "peer died"})
    main.start()
    assert in_write.wait(5)
    rec.end("hang", message="watchdog")  # returns only once the main thread's end is on disk
    [attempt] = read_manifest(tmp_path)["attempts"]
    assert attempt["exit_reason"] == "collective_timeout" and attempt["end"] is not None
    main.join()
