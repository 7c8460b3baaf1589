"""Signals, watchdog policy and their config, in-process (no torch processes: milliseconds)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from megatron_tts.config import ConfigError, WatchdogConfig, load_config
from megatron_tts.exit_codes import EXIT_REQUEUE, read_exit_records, record_exit
from megatron_tts.watchdog import Watchdog, culprits, latest_incident, longest_window
from tests.helpers import REPO, env


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------- signals


def test_stop_signals_set_one_flag_and_repeats_are_ignored():
    """In a child interpreter: the handlers must not touch pytest's own SIGINT handling."""
    script = textwrap.dedent("""
        import os, signal
        from megatron_tts import signals
        assert signals.install() and not signals.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.requested() and signals.signal_name() == "SIGUSR1"
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), sig)   # never KeyboardInterrupt, never an exit
        assert signals.signal_name() == "SIGUSR1" and signals.count() == 5
        with signals.helpers_shielded():
            os.kill(os.getpid(), signal.SIGTERM)   # pending while blocked ...
            assert signals.count() == 5
        assert signals.count() == 6                # ... and handled afterwards, not lost
        signals.ignore_from_now()
        os.kill(os.getpid(), signal.SIGTERM)
        print("ok", signals.count())
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ok", "6"]
    assert p.stderr.count("SIGUSR1 received: will save a committed checkpoint") == 1
    assert p.stderr.count("already stopping; ignored") == 5


def test_a_stale_requeue_record_never_outlives_a_fatal_restart(tmp_path):
    """A requeued incarnation that fails fatally at start-up replaces the old 75 with 3: a
    supervisor reading RUN_DIR/exit/ must not requeue it forever."""
    from megatron_tts.exit_codes import EXIT_FATAL

    run_dir = str(tmp_path / "run")
    record_exit(run_dir, 0, EXIT_REQUEUE, step=4, signal="SIGTERM")  # the previous incarnation
    p = subprocess.run([sys.executable, "-m", "launch.pretrain", "--config", "configs/tiny.yaml",
                        f"train.run_dir={run_dir}", "data.paths=[/nonexistent/dataset]"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_FATAL, p.stderr[-2000:]
    rec = read_exit_records(run_dir)[0]
    assert rec["code"] == EXIT_FATAL and rec["reason"] == "fatal" and "/nonexistent/dataset" in rec["error"]


def test_exit_records_round_trip(tmp_path):
    record_exit(str(tmp_path), 3, EXIT_REQUEUE, step=7, signal="SIGTERM")
    record_exit(str(tmp_path), 0, 0, step=9)
    recs = read_exit_records(str(tmp_path))
    assert recs[3]["code"] == 75 and recs[3]["reason"] == "requeue" and recs[3]["step"] == 7
    assert recs[0]["reason"] == "done" and recs[0]["host"]
    record_exit("/proc/definitely/not/writable", 0, 1)  # never raises


# ---------------------------------------------------------------------------- watchdog policy


def test_windows_per_phase():
    cfg = WatchdogConfig(min_timeout_s=10, k=5, first_step_timeout_s=300, checkpoint_timeout_s=200)
    w = Watchdog(cfg, "/nonexistent", 0, clock=Clock())
    assert w.window("data") == 300  # before the first completed step
    w.record_step(50.0)  # the first step (warm-up) is not a sample
    assert w.p99() is None and w.window("forward_backward") == 10
    for s in [1.0] * 99 + [3.0]:
        w.record_step(s)
    assert w.p99() == 1.0  # one outlier in 100 is above the 99th percentile
    assert w.window("optimizer") == 10  # max(10, 5 x 1.0)
    w.record_step(4.0)
    w.record_step(4.0)
    assert w.p99() == 4.0 and w.window("optimizer") == 20
    for phase in ("startup", "checkpoint", "shutdown"):
        assert w.window(phase) == 200
    for _ in range(100):
        w.record_step(1000.0)
    assert w.window("data") == longest_window(cfg) == 300  # capped: the collective timeout stays above


def test_culprit_is_the_rank_furthest_behind():
    def h(rank, step, phase_index, t=100.0):
        return {"rank": rank, "step": step, "phase_index": phase_index, "time": t, "timeout_s": 5.0}

    incident = [h(0, 3, 2), h(1, 3, 1), h(2, 3, 2), h(3, 4, 1)]
    assert culprits(incident) == [1]
    assert culprits([h(0, 3, 2), h(1, 3, 2)]) == [0, 1]  # same phase: the stacks tell them apart
    old = [h(0, 1, 1, t=10.0)]  # an earlier incident (another restart) does not count
    assert culprits(old + incident) == [1] and len(latest_incident(old + incident)) == 4


def test_the_watchdog_fires_in_a_real_process(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from megatron_tts.config import WatchdogConfig
        from megatron_tts import watchdog
        cfg = WatchdogConfig(min_timeout_s=0.5, first_step_timeout_s=0.5, checkpoint_timeout_s=0.5, exit_grace_s=0)
        watchdog.start(cfg, {str(tmp_path)!r}, 4)
        watchdog.beat("optimizer", 12)
        time.sleep(30)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == EXIT_REQUEUE, p.stderr
    assert "last phase 'optimizer' of step 12" in p.stderr
    with open(os.path.join(tmp_path, "hang", "rank_00004.txt")) as f:
        assert 'File "<string>", line 8 in <module>' in f.read()  # the sleeping main thread
    assert read_exit_records(str(tmp_path))[4]["why"] == "hang"


def test_the_watchdog_exits_even_when_stderr_is_a_full_pipe(tmp_path):
    """A reader that stopped reading (a wedged log collector) must not keep a hung rank alive:
    the child fills its own stderr pipe before the hang, so the watchdog's message blocks."""
    script = textwrap.dedent(f"""
        import fcntl, os, time
        from megatron_tts.config import WatchdogConfig
        from megatron_tts import watchdog
        flags = fcntl.fcntl(2, fcntl.F_GETFL)
        fcntl.fcntl(2, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            while True:
                os.write(2, b"x" * 4096)
        except BlockingIOError:
            pass
        fcntl.fcntl(2, fcntl.F_SETFL, flags)
        cfg = WatchdogConfig(min_timeout_s=0.5, first_step_timeout_s=0.5, checkpoint_timeout_s=0.5, exit_grace_s=0)
        watchdog.start(cfg, {str(tmp_path)!r}, 0)
        watchdog.beat("data", 3)
        time.sleep(60)
    """)
    r, w = os.pipe()
    try:
        p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=w)
        os.close(w)
        try:
            code = p.wait(timeout=45)  # nobody reads r until it has exited
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("the watchdog's process hung on its full stderr")
    finally:
        os.close(r)
    assert code == EXIT_REQUEUE
    assert read_exit_records(str(tmp_path))[0]["why"] == "hang"


# ---------------------------------------------------------------------------- config


def test_watchdog_config_defaults_and_derived_collective_timeout():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.watchdog.enabled and cfg.parallel.timeout_s is None
    # longest window 480 + grace 15 + 60, rounded up to minutes: the old 600 s default
    assert cfg.collective_timeout_s == 600
    cfg = load_config("configs/tiny.yaml", ["watchdog.checkpoint_timeout_s=1200"])
    assert cfg.collective_timeout_s == 1320
    assert load_config("configs/tiny.yaml", ["watchdog.enabled=false"]).collective_timeout_s == 600
    assert load_config("configs/tiny.yaml", ["parallel.timeout_s=900"]).collective_timeout_s == 900


@pytest.mark.parametrize("overrides,expected", [
    (["watchdog.min_timeout_s=0"], "watchdog.min_timeout_s: must be > 0"),
    (["watchdog.k=0.5"], "watchdog.k: must be >= 1"),
    (["watchdog.window_steps=0"], "watchdog.window_steps: must be >= 1"),
    (["watchdog.exit_grace_s=-1"], "watchdog.exit_grace_s: must be >= 0"),
    (["watchdog.bogus=1"], "watchdog.bogus: unknown key"),
    (["parallel.timeout_s=300"], "parallel.timeout_s=300 is shorter than the watchdog's longest window (480 s)"),
])
def test_watchdog_config_problems(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", overrides)
    assert expected in str(e.value), str(e.value)


def test_a_short_collective_timeout_is_fine_without_the_watchdog():
    cfg = load_config("configs/tiny.yaml", ["parallel.timeout_s=300", "watchdog.enabled=false"])
    assert cfg.collective_timeout_s == 300
