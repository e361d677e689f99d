"""A rank that finds no prepared data exits 2 at once, naming the cache entry and the fix: ranks only
read the cache (`launcher run` or the Slurm prep job fills it), none tokenizes while others wait."""

from __future__ import annotations

import time


def test_rank_without_prepared_data_exits_2_naming_the_cache_and_the_fix(tmp_path, cli):
    run_dir, cache = tmp_path / "run", tmp_path / "empty-cache"
    env = {"LAUNCHER_CACHE": str(cache), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    made = cli("slurm", "--out", str(run_dir), "--no-prep", "--nodes", "1", "--nproc", "1", "--seq-len", "64",
                   env=env, timeout=120)
    assert made.returncode == 0, made.stderr

    t0 = time.monotonic()
    rank = cli("train", str(run_dir / "spec.yaml"), env=env, timeout=300)
    elapsed = time.monotonic() - t0
    assert rank.returncode == 2, rank.stdout + rank.stderr
    assert "Traceback" not in rank.stderr, rank.stderr
    [entry] = [p for p in rank.stderr.split() if p.startswith(str(cache))]
    assert entry.startswith(str(cache / "data" / "pretrain-64-")), rank.stderr
    assert f"`launcher prepare {run_dir / 'spec.yaml'}`" in rank.stderr
    assert "without --no-prep" in rank.stderr
    assert not cache.exists()  # nothing was tokenized
    # it stops before the heavy imports and the process group (those alone take 10-20 s here)
    assert elapsed < 10, elapsed
