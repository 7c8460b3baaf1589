"""Hang watchdog: name the rank that stopped making progress, dump every thread's stack, exit 75.

Each rank beats at its phase boundaries (`beat(phase, step)`: data, forward_backward,
optimizer, logging, checkpoint; startup and shutdown around the loop). A daemon thread checks
that the last beat is younger than the current phase's window:

    steady steps         min(max(watchdog.min_timeout_s, watchdog.k x p99 of the recent step
                         times), longest)       the first step of a process is not a sample
    first step           watchdog.first_step_timeout_s   (start-up, warm-up, lazy NCCL init)
    startup / checkpoint / shutdown   watchdog.checkpoint_timeout_s   (resume load, save)

where `longest` = max(min_timeout_s, first_step_timeout_s, checkpoint_timeout_s). When the last
beat is older, the rank writes RUN_DIR/hang/rank_XXXXX.txt (a JSON line naming rank, host, pid,
step, last phase and the seconds since that beat, then faulthandler's dump of every thread),
appends the JSON line to RUN_DIR/hang/hangs.jsonl, logs it, records exit code 75 in
RUN_DIR/exit/, waits `watchdog.exit_grace_s`, kills its own child processes and leaves with
os._exit(EXIT_REQUEUE) (the main thread is stuck: no clean shutdown is possible). The wait
lets its peers' watchdogs fire as well: a rank stuck in step s holds the others in a collective
of step s (or s+1), so they stop beating at most about one step later and each leaves its own
dump; without the wait, the first exit would break their collectives into anonymous errors.

Naming the culprit: the rank whose (step, phase) is furthest behind is the one the others wait
for (`culprits()`): e.g. a rank stuck reading data shows last phase "data" while its peers show
"forward_backward", blocked in the gradient all-reduce. A rank stuck *inside* a collective
phase (a dead GPU mid-kernel) shows the same phase as its peers; its stack dump tells it apart.

The collective timeout (parallel.timeout_s, derived from this section by default:
`Config.collective_timeout_s`) is longer than the longest window plus exit_grace_s, so the
watchdog always fires first and the culprit is named, before a gloo/NCCL timeout turns the
hang into an anonymous crash on whichever rank timed out first.

A hang that holds the GIL (a C extension spinning without releasing it) starves the Python
thread too; a faulthandler backstop (a C thread, re-armed by the Python thread on every check)
then dumps the stacks to stderr and exits 1 (crash): faulthandler cannot choose the code.

Cost when healthy: a beat stores one tuple (~0.1 us); the check thread wakes every
min(1 s, min_timeout_s / 10).
"""

from __future__ import annotations

import collections
import faulthandler
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from typing import Optional

from megatron_tts.exit_codes import EXIT_REQUEUE, record_exit

try:  # imported now: the import lock may be held by a hung main thread when the exit comes
    import psutil
except ImportError:  # pragma: no cover - a declared dependency
    psutil = None

log = logging.getLogger(__name__)

# Phase boundaries in the order a step passes them; the index orders ranks by progress.
PHASES = ("startup", "data", "forward_backward", "optimizer", "logging", "checkpoint", "shutdown")
_ORDER = {p: i for i, p in enumerate(PHASES)}
_LONG_PHASES = ("startup", "checkpoint", "shutdown")


def longest_window(cfg) -> float:
    """The longest no-progress window the watchdog allows (any phase)."""
    return max(cfg.min_timeout_s, cfg.first_step_timeout_s, cfg.checkpoint_timeout_s)


def hang_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "hang")


def exit_now(code: int) -> None:
    """os._exit(code), after killing this process's own children: os._exit skips the atexit
    hooks that stop them (megatron's checkpoint-results Manager, an async-save writer, their
    resource tracker), and orphans would hold the job's stdout/stderr open and keep running."""
    try:
        kids = psutil.Process().children(recursive=True) if psutil is not None else []
        for k in kids:
            try:
                k.kill()
            except Exception:
                pass
    except Exception:
        pass
    os._exit(code)


class Watchdog:
    def __init__(self, cfg, run_dir: str, rank: int, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank = rank
        self.host = socket.gethostname()
        self.clock = clock
        self.poll_s = min(1.0, cfg.min_timeout_s / 10)
        self.exit_code = EXIT_REQUEUE
        self._last = ("startup", 0, clock())  # (phase, step, time): one atomic assignment per beat
        self._steps = collections.deque(maxlen=cfg.window_steps)
        self._first_step_done = False
        self._stop = threading.Event()
        self.fired = threading.Event()  # a hang was declared on this rank
        self.dumped = threading.Event()  # its dump is on disk
        self._thread: Optional[threading.Thread] = None

    # ---- called by the training loop ----
    def beat(self, phase: str, step: int) -> None:
        self._last = (phase, step, self.clock())

    def record_step(self, seconds: float) -> None:
        """A completed step's duration; the first of the process (warm-up) is not a sample."""
        if self._first_step_done:
            self._steps.append(seconds)
        self._first_step_done = True

    # ---- policy ----
    def p99(self) -> Optional[float]:
        if not self._steps:
            return None
        s = sorted(self._steps)
        return s[max(0, math.ceil(0.99 * len(s)) - 1)]

    def window(self, phase: str) -> float:
        c = self.cfg
        if phase in _LONG_PHASES:
            return c.checkpoint_timeout_s
        if not self._first_step_done:
            return c.first_step_timeout_s
        p99 = self.p99()
        steady = c.min_timeout_s if p99 is None else max(c.min_timeout_s, c.k * p99)
        return min(steady, longest_window(c))

    # ---- the check thread ----
    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name="megatron-tts-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self.fired.is_set():
            faulthandler.cancel_dump_traceback_later()

    def _arm_backstop(self, seconds: float) -> None:
        try:
            faulthandler.dump_traceback_later(seconds, repeat=False, file=sys.stderr, exit=True)
        except Exception:  # no usable stderr: the Python watchdog still works
            pass

    def _run(self) -> None:
        backstop = longest_window(self.cfg) + self.cfg.exit_grace_s + 5
        while not self._stop.wait(self.poll_s):
            self._arm_backstop(backstop)
            phase, step, t = self._last
            since = self.clock() - t
            window = self.window(phase)
            if since > window:
                self._fire(phase, step, since, window)
                return
        faulthandler.cancel_dump_traceback_later()

    def _fire(self, phase: str, step: int, since: float, window: float) -> None:
        self.fired.set()
        grace = self.cfg.exit_grace_s
        # If the GIL is held for good, this thread stalls and the backstop ends the process (1).
        self._arm_backstop(grace + 10)
        path = os.path.join(hang_dir(self.run_dir), f"rank_{self.rank:05d}.txt")
        info = {"event": "hang", "rank": self.rank, "host": self.host, "pid": os.getpid(), "step": step,
                "phase": phase, "phase_index": _ORDER.get(phase, -1), "seconds_since_beat": round(since, 3),
                "timeout_s": round(window, 3), "p99_step_s": self.p99(), "time": time.time(), "stacks": path}
        line = json.dumps(info)
        try:
            os.makedirs(hang_dir(self.run_dir), exist_ok=True)
            with open(path, "w") as f:
                f.write(line + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            with open(os.path.join(hang_dir(self.run_dir), "hangs.jsonl"), "a") as f:
                f.write(line + "\n")
        except Exception as e:  # a full or gone disk must not keep a hung rank alive
            info["dump_error"] = repr(e)
        record_exit(self.run_dir, self.rank, self.exit_code, why="hang", step=step, phase=phase,
                    seconds_since_beat=info["seconds_since_beat"])
        self.dumped.set()
        # The exit is scheduled before anything that could block (stderr is a pipe to torchrun
        # that may be full). It waits up to 2 s for the message below: with exit_grace_s=0 a
        # loaded machine ran the timer first and the process left without a word (seen in CI).
        said = threading.Event()

        def leave() -> None:
            said.wait(2.0)
            exit_now(self.exit_code)

        threading.Timer(grace, leave).start()
        try:
            os.write(2, (f"[r{self.rank}] ERROR megatron_tts.watchdog: no progress for {since:.1f} s "
                         f"(limit {window:.1f} s) on rank {self.rank} ({self.host}), last phase "
                         f"'{phase}' of step {step}; stacks in {path}; exiting {self.exit_code} in "
                         f"{grace:g} s\n{line}\n").encode())
        except OSError:
            pass
        finally:
            said.set()


# ------------------------------------------------------------------------------------------
# The process's watchdog (one per training process); module functions are no-ops without one.
# ------------------------------------------------------------------------------------------

_current: Optional[Watchdog] = None


def start(cfg, run_dir: str, rank: int) -> Optional[Watchdog]:
    global _current
    stop()
    if not cfg.enabled:
        return None
    _current = Watchdog(cfg, run_dir, rank).start()
    return _current


def beat(phase: str, step: int) -> None:
    w = _current
    if w is not None:
        w.beat(phase, step)


def record_step(seconds: float) -> None:
    w = _current
    if w is not None:
        w.record_step(seconds)


def shutting_down(step: int, exit_code: int) -> None:
    """The loop is over with `exit_code`: a hang in clean-up (e.g. destroying NCCL groups) still
    ends the process, with the code already decided."""
    w = _current
    if w is not None:
        w.exit_code = exit_code
        w.beat("shutdown", step)


def stop() -> None:
    global _current
    w, _current = _current, None
    if w is not None:
        w.stop()


def exit_if_fired() -> None:
    """Called when the main thread fails: if this rank already declared a hang, the failure is its
    echo (a peer left and broke a collective): finish the dump and exit 75, not 1."""
    w = _current
    if w is not None and w.fired.is_set():
        w.dumped.wait(timeout=30)
        exit_now(w.exit_code)


# ------------------------------------------------------------------------------------------
# Reading the dumps.
# ------------------------------------------------------------------------------------------


def read_hangs(run_dir: str) -> list[dict]:
    path = os.path.join(hang_dir(run_dir), "hangs.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def latest_incident(hangs: list[dict]) -> list[dict]:
    """The records of the newest hang (hangs.jsonl accumulates over restarts): those written
    within one detection window (+ 60 s) of the newest record, the newest per rank."""
    if not hangs:
        return []
    newest = max(h["time"] for h in hangs)
    span = max(h.get("timeout_s", 0) for h in hangs) + 60
    per_rank = {}
    for h in sorted(hangs, key=lambda h: h["time"]):
        if h["time"] >= newest - span:
            per_rank[h["rank"]] = h
    return [per_rank[r] for r in sorted(per_rank)]


def culprits(hangs: list[dict]) -> list[int]:
    """Ranks furthest behind (lowest step, then earliest phase) in the newest incident: the ones
    the others wait for."""
    hangs = latest_incident(hangs)
    if not hangs:
        return []
    key = min((h["step"], h["phase_index"]) for h in hangs)
    return sorted({h["rank"] for h in hangs if (h["step"], h["phase_index"]) == key})


if __name__ == "__main__":  # python -m megatron_tts.watchdog RUN_DIR: who hung?
    hangs = latest_incident(read_hangs(sys.argv[1]))
    for h in hangs:
        print(f"rank {h['rank']:>5} {h['host']}: step {h['step']} phase {h['phase']:<16} "
              f"silent {h['seconds_since_beat']:.1f} s  stacks {h['stacks']}")
    print(f"culprit(s): {culprits(hangs)}" if hangs else "no hang recorded")
