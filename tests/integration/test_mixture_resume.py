"""A pretraining mixture (data.sources + data.stages) trained for real on one CPU rank in fp32: the tokens
per source in metrics.jsonl and manifest.json are the samples the ranks read, plan.txt shows them per
source, eval reports held-out loss per source; and a run stopped mid-mixture by a real SIGUSR1 and resumed
reads the exact block sequence of the uninterrupted run and ends with its weights (bitwise); resumed on 2 ranks
instead, the ranks read exactly the samples after the stop between them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from launcher.testing.faults import TEST_DUMP_ENV, TEST_SAMPLE_LOG_ENV
from mixdata import mixture_files
from test_resume import MAX_STEPS, assert_same_weights, dropout_model, flags, interrupted_run, load  # noqa: F401

pytestmark = pytest.mark.integration
G, SEQ = 2, 64  # test_resume's flags: micro batch 2 on one rank, seq_len 64, 10 steps, cosine after 3 warm-up steps


def spec_file(tmp_path: Path, cache: str) -> Path:
    p = mixture_files(tmp_path / "data")
    spec = {"data": {"shard_mb": 0.002, "eval_fraction": 0.1, "cache_dir": cache, "sources": [
                {"name": "web", "path": str(p["web"]), "weight": 0.6},
                {"name": "code", "path": str(p["code"]), "weight": 0.3},
                {"name": "replay", "path": str(p["replay"]), "weight": 0.1, "text_field": "body"}],
                "stages": [{"until_step": 3, "weights": {"web": 1.0}},
                           {"until_step": 100, "weights": {"web": 0.6, "code": 0.3, "replay": 0.1}}]}}
    path = tmp_path / "mix.yaml"
    path.write_text(json.dumps(spec))
    return path


def samples(path: Path) -> list[tuple[int, int, int]]:
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


def test_mixture_run_logs_tokens_per_source_and_resumes_the_exact_block_sequence(tmp_path, env, launcher,
                                                                                 dropout_model):
    spec = [spec_file(tmp_path, str(tmp_path / "cache")), *flags(dropout_model, "full", 2)]
    ref = launcher(["run", *spec, "--out", tmp_path / "ref"], env, expect=0,
                   **{TEST_DUMP_ENV: str(tmp_path / "ref.pt"), TEST_SAMPLE_LOG_ENV: str(tmp_path / "ref.log")})
    order = samples(tmp_path / "ref.log")
    assert [n for n, _, _ in order] == list(range(MAX_STEPS * G))  # each sample once, in order
    assert {k for n, k, _ in order if n < 3 * G} == {0}  # stage 0: web only, until step 3
    recs = [json.loads(x) for x in (tmp_path / "ref" / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    for step, r in steps.items():  # tokens before the logged step = the samples the rank read for steps < it
        want = {name: SEQ * sum(1 for n, k, _ in order if n < step * G and k == i)
                for i, name in enumerate(["web", "code", "replay"])}
        assert r["tokens_by_source"] == want, (step, r)
    final = json.loads((tmp_path / "ref" / "manifest.json").read_text())["final"]
    assert sum(final["tokens_by_source"].values()) == MAX_STEPS * G * SEQ
    assert final["tokens_by_source"]["web"] == SEQ * sum(1 for _, k, _ in order if k == 0)
    by_source = [r["eval_loss_by_source"] for r in recs if "eval_loss_by_source" in r]
    assert {n for d in by_source for n in d} == {"web", "code", "replay"}
    assert re.search(rf"eval step {MAX_STEPS}/{MAX_STEPS} source replay loss \d", ref.stdout)
    # `launcher eval`: held-out loss per source, tuned beside base
    ev = launcher(["eval", tmp_path / "ref", "--json"], env, expect=0)
    sets = {r["name"]: r for r in json.loads(ev.stdout)["sets"]}
    assert {"held-out web", "held-out code", "held-out replay"} <= set(sets), sets.keys()
    plan = (tmp_path / "ref" / "plan.txt").read_text()
    assert re.search(r"source +web: weight 0.6, [\d,]+ tokens", plan) and "stage        1: step 3 to the end" in plan

    run = tmp_path / "run"
    code, out, err = interrupted_run(["run", *spec, "--out", run], env,
                                     **{TEST_SAMPLE_LOG_ENV: str(tmp_path / "run.log")})
    assert code == 3, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    stopped = int(re.search(r"ranks agreed to stop at step (\d+)/", out).group(1))
    assert 2 <= stopped < MAX_STEPS
    first = samples(tmp_path / "run.log")
    trained = [s for s in first if s[0] < stopped * G]
    assert trained == order[: stopped * G]
    hint = re.search(r"Resume with: launcher (run \S+ --out \S+ --force)", err)
    shutil.copytree(run, tmp_path / "run2")  # the same stop, resumed on 2 ranks below
    resumed = launcher(hint.group(1).split(), env, expect=0,
                       **{TEST_DUMP_ENV: str(tmp_path / "run.pt"), TEST_SAMPLE_LOG_ENV: str(tmp_path / "resumed.log")})
    assert "resuming from" in resumed.stdout
    # the resumed run reads exactly the uninterrupted run's blocks from the stop on: none again, none skipped
    assert samples(tmp_path / "resumed.log") == order[stopped * G:]
    assert_same_weights(load(tmp_path / "ref.pt"), load(tmp_path / "run.pt"))  # bitwise
    assert (json.loads((run / "manifest.json").read_text())["final"]["tokens_by_source"] == final["tokens_by_source"])

    # the same stopped run resumed on 2 ranks (the same global batch; DeepSpeed's universal checkpoint): the two
    # ranks read exactly the samples after the stop between them, once each; nothing trained before is read again
    run2 = tmp_path / "run2"
    two = launcher(["run", *spec, "--nproc", 2, "--micro-batch", 1, "--global-batch", G, "--out", run2, "--force"],
                   env, expect=0, **{TEST_SAMPLE_LOG_ENV: str(tmp_path / "two.log")})
    assert "through DeepSpeed's universal checkpoint" in two.stdout and "world size 2" in two.stdout
    assert sorted(samples(tmp_path / "two.log")) == order[stopped * G:]
    assert json.loads((run2 / "manifest.json").read_text())["final"]["tokens_by_source"] == final["tokens_by_source"]
