"""Hang watchdog on real processes: one rank sleeps forever inside a step (fault injection); every
rank notices within the configured window, dumps its stacks and a JSON line naming rank, host
and last phase, and exits 75; the stuck rank is the one named. A hang that holds the GIL is
caught by the faulthandler backstop (exit 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_tts.exit_codes import EXIT_CRASH, EXIT_REQUEUE, read_exit_records
from megatron_tts.watchdog import culprits, read_hangs
from tests.helpers import REPO, SMALL, env, pretrain

pytestmark = pytest.mark.slow

MIN_TIMEOUT, GRACE = 5.0, 3.0
WATCHDOG = [f"watchdog.min_timeout_s={MIN_TIMEOUT}", "watchdog.k=3", f"watchdog.exit_grace_s={GRACE}"]


def test_a_rank_stuck_in_a_step_is_named_and_every_rank_exits_75(tmp_path):
    t0 = time.monotonic()
    r = pretrain(str(tmp_path / "run"), SMALL + WATCHDOG + ["train.steps=8", "checkpoint.interval=100"], nproc=2,
                 timeout=120, extra_env={"MEGATRON_TTS_FAULT": "hang:rank=1:step=3"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.output[-3000:]  # torchrun: its workers failed
    assert max(r.losses()) == 2  # steps 1-2 ran, step 3 never finished

    records = read_exit_records(r.run_dir)
    assert sorted(records) == [0, 1], r.output[-3000:]
    for rank, rec in records.items():
        assert rec["code"] == EXIT_REQUEUE and rec["why"] == "hang", rec
    assert "exitcode  : 75" in r.output

    hangs = {h["rank"]: h for h in read_hangs(r.run_dir)}
    assert sorted(hangs) == [0, 1]
    stuck, waiting = hangs[1], hangs[0]
    # the stuck rank never left the data phase of step 3; its peer waits in the step's collective
    assert (stuck["step"], stuck["phase"]) == (3, "data"), stuck
    assert (waiting["step"], waiting["phase"]) == (3, "forward_backward"), waiting
    assert culprits(list(hangs.values())) == [1]
    for h in hangs.values():
        assert h["host"] and h["pid"] > 0
        # detected within the window: the steady floor (k x p99 of ~0.2-1 s steps stays below it
        # on this machine) plus one 0.5 s poll, with scheduling slack on 2 shared cores
        assert h["timeout_s"] == pytest.approx(MIN_TIMEOUT, abs=1e-6) or h["timeout_s"] > MIN_TIMEOUT
        assert h["timeout_s"] <= h["seconds_since_beat"] <= h["timeout_s"] + 2.0, h
    with open(stuck["stacks"]) as f:
        header, stacks = f.readline(), f.read()
    assert json.loads(header)["rank"] == 1
    assert "in maybe_inject" in stacks and "faults.py" in stacks  # where it sleeps
    with open(waiting["stacks"]) as f:
        waiting_stacks = f.read()
    assert "finalize_model_grads" in waiting_stacks  # blocked in the gradient all-reduce
    assert "no progress for" in r.output and "last phase 'data' of step 3" in r.output
    # start-up and two steps, then the window, the grace and the exit: under a minute when quiet.
    # The detection itself is bounded above (seconds_since_beat); this only catches a stuck exit,
    # so it leaves room for a start-up slowed by a loaded machine.
    assert elapsed < 100, elapsed


def test_a_hang_that_holds_the_gil_is_caught_by_the_backstop(tmp_path):
    """The Python watchdog thread cannot run while the main thread holds the GIL (a regex
    backtracking forever stands in for a stuck C extension): faulthandler's C thread dumps and
    exits 1. No torch import: seconds."""
    script = textwrap.dedent(f"""
        import re, sys, time
        from megatron_tts.config import WatchdogConfig
        from megatron_tts import watchdog
        cfg = WatchdogConfig(min_timeout_s=1, first_step_timeout_s=2, checkpoint_timeout_s=2, exit_grace_s=0.5)
        watchdog.start(cfg, {str(tmp_path)!r}, 0)
        print(time.time(), flush=True)
        watchdog.beat("data", 1)
        time.sleep(1)  # the Python thread runs (its window is 2 s) and arms the backstop
        re.match(r"(a+)+$", "a" * 64 + "b")  # exponential backtracking, GIL held throughout
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    elapsed = time.time() - float(p.stdout.split()[0])  # from the watchdog's start: imports excluded
    assert p.returncode == EXIT_CRASH, (p.returncode, p.stderr[-2000:])
    assert "Timeout" in p.stderr and "in <module>" in p.stderr, p.stderr[-2000:]
    # backstop = longest window (2 s) + exit_grace_s (0.5 s) + 5 s after its last re-arming; the regex
    # alone would run for centuries, so the bound only has to be loose enough for a loaded machine
    assert elapsed < 45, elapsed
    assert not os.path.exists(os.path.join(tmp_path, "hang"))  # the Python side never ran
