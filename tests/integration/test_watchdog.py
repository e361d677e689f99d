"""The hang watchdog (launcher/rank/watchdog.py): a rank that makes no progress for
cluster.hang_timeout_s writes every thread's stack to its log and exits 4, and `launcher run` exits 4
naming it; a healthy run with the watchdog on is not disturbed.

The stall is the test-only fault `stall` (LAUNCHER_TEST_FAULT): the rank sleeps in Python inside the
step, so its threads still run and the stack shows where it stalls (`_stall_forever`). The fault `gil`
sleeps in C holding the GIL, where only the watchdog's faulthandler backstop still runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launcher.rundir.metrics import parse_step_lines

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HANG_S = 15


def flags(nproc, max_steps):
    return ["--model", "tiny", "--task", "pretrain", "--method", "full", "--zero", 2, "--nproc", nproc,
            "--precision", "fp32", "--max-steps", max_steps, "--seq-len", 64, "--micro-batch", 2,
            "--set", "output.log_every=1", "--set", f"cluster.hang_timeout_s={HANG_S}"]


def test_stalled_rank_dumps_every_stack_and_launcher_run_exits_4(tmp_path, env, launcher):
    """Rank 1 of 2 sleeps in Python after step 2: its watchdog writes the line and every thread's stack
    (the stall site among them), records an exit marker (reason hang, exit 4) and exits 4 within the
    limit; `launcher run` exits 4 and its failure note names the rank and the cause."""
    run = tmp_path / "run"
    proc = launcher(["run", *flags(2, 8), "--out", run], env, LAUNCHER_TEST_FAULT="stall:rank=1:step=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-6000:]
    assert "made no progress for" in out and "stacks of every thread follow" in out, out[-6000:]
    # the stuck rank fires first (the other, blocked in a collective, is given longer and leaves when it goes)
    line = next(ln for ln in proc.stdout.splitlines() if "made no progress for" in ln)
    assert line.startswith("launcher: rank 1 on ") and "(last step 1); stacks of every thread follow" in line, line
    # faulthandler's dump: every thread, the stalled main thread down to the stall site
    assert "most recent call first" in out and "in _stall_forever" in out and "in on_step_end" in out, out[-6000:]
    assert "launcher-hang-watchdog" in out or out.count("Thread 0x") >= 2
    markers = tmp_path / "run" / "markers"
    [fault] = [json.loads(p.read_text()) for p in markers.glob("fault-*-rank1.json")]
    [hung] = [json.loads(p.read_text()) for p in markers.glob("exit-*-rank1.json")]
    assert fault["kind"] == "stall" and hung["reason"] == "hang" and hung["exit_code"] == 4, hung
    # it fired when the limit ran out since its last finished step (step 1), not before, and not much later
    waited = hung["time"] - fault["time"]
    assert 0 < waited <= HANG_S + 10, waited
    # launcher run: exit 4 (the other rank's failed collective is an echo), explained
    assert "no progress for cluster.hang_timeout_s" in proc.stderr, proc.stderr[-3000:]
    assert "launcher: rank 1 on" in proc.stderr and ": hang: " in proc.stderr, proc.stderr[-3000:]
    assert "exit 4" in (run / "jobs.jsonl").read_text()
    # rank 0 writes the run record; here it left on the collective that rank 1's exit broke
    [attempt] = json.loads((run / "manifest.json").read_text())["attempts"]
    assert attempt["end"] is not None and attempt["exit_reason"] in ("collective_timeout", "failed"), attempt


def test_a_hang_on_rank_zero_ends_the_attempt_in_the_run_record(tmp_path, env, launcher):
    """The watchdog exits through os._exit, past the loop's own end-of-attempt record: it tells the record
    first, so the manifest says the attempt ended in a hang, with when and why."""
    run = tmp_path / "run"
    proc = launcher(["run", *flags(1, 6), "--out", run], env, LAUNCHER_TEST_FAULT="stall:rank=0:step=2")
    assert proc.returncode == 4, (proc.stdout + proc.stderr)[-6000:]
    [attempt] = json.loads((run / "manifest.json").read_text())["attempts"]
    assert attempt["exit_reason"] == "hang" and attempt["end"] is not None, attempt
    # the stall sits in step 2's end-of-step callbacks: its update is done (the Trainer counts it), the
    # watchdog had not yet seen it finish ("last step 1" in its message)
    assert "made no progress for" in attempt["message"] and attempt["end_step"] == 2, attempt


def test_a_rank_stuck_in_c_holding_the_gil_is_ended_by_the_backstop(tmp_path, env, launcher):
    """Rank 1 of 2 sleeps in C holding the GIL after step 2, so no Python thread of it runs, the watchdog's
    included: faulthandler's backstop dumps every stack ("Timeout (...)!") and ends it, before the other
    rank (blocked in the next collective, given the grace) fires; `launcher run` exits 4 and says so."""
    run = tmp_path / "run"
    proc = launcher(["run", *flags(2, 8), "--out", run], env, LAUNCHER_TEST_FAULT="gil:rank=1:step=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-6000:]
    assert "stalls in C holding the GIL at step 2" in out and "Timeout (0:00:" in out, out[-6000:]
    assert "in _hold_gil_forever" in out and "in inject_step_faults" in out, out[-6000:]
    # the culprit went first: rank 0 (in a collective, given the grace) did not fire its own watchdog
    assert not [ln for ln in out.splitlines() if ln.startswith("launcher: rank 0") and "made no progress" in ln]
    assert "a collective failed (collective timeout 1800 s)" in proc.stderr, proc.stderr[-3000:]  # its echo
    markers = run / "markers"
    [fault] = [json.loads(p.read_text()) for p in markers.glob("fault-*-rank1.json")]
    assert fault["kind"] == "gil" and not list(markers.glob("exit-*-rank1.json"))  # Python never ran again
    assert "rank 1 on" in proc.stderr and "watchdog's backstop ended a hang" in proc.stderr, proc.stderr[-3000:]
    assert "no progress for cluster.hang_timeout_s" in proc.stderr


def test_healthy_run_with_the_watchdog_on_finishes_untouched(tmp_path, env, launcher):
    """A run with the watchdog on (15 s) and checkpoint saves finishes every step with exit 0: neither the
    first step nor a save nor the end of training trips it."""
    run = tmp_path / "run"
    proc = launcher(["run", *flags(1, 6), "--save-every", 2, "--out", run], env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert [s["step"] for s in parse_step_lines(proc.stdout)] == [1, 2, 3, 4, 5, 6]
    assert "made no progress" not in proc.stdout + proc.stderr
    assert (run / "final" / "config.json").is_file()


# --------------------------------------------------------------------------- the Watchdog itself (no ranks)

def _python(code: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": "3"})


def test_watchdog_fires_after_the_limit_with_every_stack_and_a_marker(tmp_path):
    t0 = time.monotonic()
    proc = _python(f"""
        import time
        from launcher.rank.watchdog import Watchdog
        w = Watchdog(1.0, {str(tmp_path)!r})
        w.arm(None)
        w.pet(7)  # step 7 finished: the first-step allowance is over

        def stuck_here():
            time.sleep(30)

        stuck_here()
        """, tmp_path)
    took = time.monotonic() - t0
    assert proc.returncode == 4, proc.stderr
    assert "launcher: rank 3 on " in proc.stderr and "made no progress for 1 s (last step 7)" in proc.stderr
    assert "in stuck_here" in proc.stderr and "launcher-hang-watchdog" not in proc.stdout
    assert took < 20
    [rec] = [json.loads(p.read_text()) for p in (tmp_path / "markers").glob("exit-*-rank3.json")]
    assert rec["reason"] == "hang" and rec["exit_code"] == 4 and rec["step"] == 7 and rec["watchdog"] is True


def test_backstop_ends_a_process_whose_gil_is_held(tmp_path):
    """No Python thread runs while C code holds the GIL: faulthandler's timer thread, armed with the
    deadline plus its slack, writes every stack and exits 1."""
    t0 = time.monotonic()
    proc = _python("""
        import ctypes
        from launcher.rank.watchdog import Watchdog
        w = Watchdog(1.0)
        w.arm(None)
        w.pet(7)

        def stuck_in_c():
            ctypes.PyDLL(None).sleep(60)  # libc's sleep, the GIL held throughout

        stuck_in_c()
        """, tmp_path)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Timeout (0:00:06.400000)!") and "in stuck_in_c" in proc.stderr, proc.stderr
    assert "made no progress" not in proc.stderr and 6 < took < 20, took


def test_watchdog_kept_alive_by_progress_and_off_at_zero(tmp_path):
    proc = _python("""
        import time
        from launcher.rank.watchdog import Watchdog
        w = Watchdog(1.0)
        w.arm(0)
        for step in range(1, 12):  # 3.3 s of steps of 0.3 s each, over a 1 s limit
            time.sleep(0.3)
            w.pet(step)
        w.pet(12, factor=4)  # a save: 4 s allowed
        time.sleep(2)
        w.disarm()
        time.sleep(1.5)
        off = Watchdog(0)
        off.arm(0)
        time.sleep(0.5)
        assert off._thread is None
        print("alive")
        """, tmp_path)
    assert proc.returncode == 0 and "alive" in proc.stdout, proc.stderr


def test_first_step_gets_the_generous_limit(tmp_path):
    proc = _python("""
        import time
        from launcher.rank import watchdog
        w = watchdog.Watchdog(1.0)
        w.arm(None)
        time.sleep(1.8)  # under FIRST_STEP_FACTOR x 1 s: compilation, first collectives
        w.pet(1)
        print("alive")
        time.sleep(3)
        """, tmp_path)
    assert proc.returncode == 4 and "alive" in proc.stdout and "(last step 1)" in proc.stderr, proc.stderr


def test_a_rank_blocked_in_a_collective_waits_longer_and_says_so(tmp_path):
    """The victim of a stuck peer (blocked in torch.distributed) gets COLLECTIVE_GRACE_S more (at most the
    limit), so that the stuck rank fires first; its line names the collective."""
    t0 = time.monotonic()
    proc = _python("""
        import time
        from launcher.rank.watchdog import Watchdog
        ns = {}
        exec(compile("import time\\ndef all_reduce():\\n    time.sleep(30)\\n",
                     "/site-packages/torch/distributed/distributed_c10d.py", "exec"), ns)
        w = Watchdog(1.0)
        w.arm(None)
        w.pet(3)
        ns["all_reduce"]()
        """, tmp_path)
    took = time.monotonic() - t0
    assert proc.returncode == 4, proc.stderr
    assert "(last step 3; waiting in torch.distributed all_reduce: another rank may be the one stuck)" in proc.stderr
    assert took >= 1.9, took  # 1 s limit + 1 s grace


def test_status_names_a_hang_as_the_watchdogs():
    from launcher.ops import reasons

    # the backstop's dump on one rank; the other's marker says its collective failed (an echo)
    log = ("[rank1]:launcher: test fault\n[rank1]:Timeout (0:00:21.500000)!\n[rank1]:Thread 0x7f (most recent call "
           "first):\n[rank1]:  File \"/x/faults.py\", line 9 in _hold_gil_forever\n")
    assert reasons.classify("FAILED", 1, None, log, {"reason": "collective_timeout", "message": "rank 0: a collective "
                                                     "failed"}) == (reasons.HANG, "[rank1]: Timeout (0:00:21.500000)!")

    reason, line = reasons.classify("FAILED", 1, None, "", {"reason": "hang", "message": "rank 1 on node2 made no "
                                                                                         "progress for 15 s"})
    assert reason == "hang" and reasons.describe(reason, 1, None, line).startswith("hang (watchdog): exit code 1")
