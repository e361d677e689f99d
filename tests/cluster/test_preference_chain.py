"""Full DPO on the real lab cluster: `launcher slurm --task dpo --method full --submit` queues the preparation
job, the reference job (`launcher train --ref`: the reference log-probs into the cache) and training, each after
the one before (afterok); all three complete, the training job reads the reference from the cache instead of
computing it, and `launcher status` shows each job with its kind."""

from __future__ import annotations

import json

import yaml

from test_chains import launcher, log_of, ran_in_order, status_of

# the tiny Llama on the embedded preference pairs, small enough for the lab's 2-CPU nodes; fp32 CPU ranks
DPO = {"task": "dpo", "method": {"name": "full"}, "data": {"seq_len": 64},
       "optim": {"max_steps": 2, "micro_batch": 2}, "precision": "fp32", "zero": {"stage": 2},
       "cluster": {"gpus_per_node": 0, "time": "10", "partition": "debug", "net_ifname": "eth0",
                   "prep": {"cpus": 1, "time": "10"}}}


def test_full_dpo_queues_prep_then_ref_then_train_and_all_three_complete(slurm_lab, tmp_path):
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(DPO))
    run_dir, cache = tmp_path / "dpo", tmp_path / "cache"
    cp = launcher(slurm_lab, "slurm", str(tmp_path / "dpo.yaml"), "--name", "dpo", "--out", str(run_dir), "--submit",
                  cache=cache)
    assert cp.returncode == 0, cp.stderr
    prep, ref, train = cp.stdout.split()
    recorded = [(j["job_id"], j["kind"], j.get("after")) for j in
                map(json.loads, (run_dir / "jobs.jsonl").read_text().splitlines())]
    assert recorded == [(prep, "prep", None), (ref, "ref", prep), (train, "train", ref)]
    assert slurm_lab.wait_job(train, timeout=600) == "COMPLETED", log_of(run_dir, "dpo", train)[-3000:]
    ran_in_order(slurm_lab, [prep, ref, train])
    ref_log, train_log = log_of(run_dir, "dpo", ref), log_of(run_dir, "dpo", train)
    assert "log-probs computed here" in ref_log, ref_log[-3000:]
    assert "log-probs read from" in train_log and "step 2/2" in train_log, train_log[-3000:]
    assert list(cache.rglob("ref-*/meta.json"))  # the reference job's cache entry
    jobs = status_of(slurm_lab, run_dir, cache)
    assert {j: (s["kind"], s["state"]) for j, s in jobs.items()} == \
        {prep: ("prep", "COMPLETED"), ref: ("ref", "COMPLETED"), train: ("train", "COMPLETED")}
