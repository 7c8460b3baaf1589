"""Alerts: a log line, a metrics event, and optional hooks that never stop training.

Each alert is logged as `ALERT <kind>: <message>` (grep-able), written to metrics.jsonl as
{"event": "alert", "step", "time", "kind", "message"}, and handed to the optional hooks:
`alerts.command` (run with the record as JSON on stdin) and `alerts.webhook` (an HTTP POST of
the same JSON). Hooks run on one daemon thread, never on the training thread; a failing, slow
(`alerts.timeout_s`) or missing hook is counted as a non-fatal error (monitoring/safe.py) and
training goes on.

Kinds: stall, nonfinite, skips, straggler, throughput_drop, checkpoint_failed.

The detectors here are plain objects fed by the loop (ThroughputWatch) or by a thread
(StallWatch); their state is not checkpointed: a restarted run rebuilds its baseline.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import shlex
import statistics
import subprocess
import threading
import time
import urllib.request
from typing import Callable, Optional

from monitoring.safe import NONFATAL, catch

log = logging.getLogger(__name__)

KINDS = ("stall", "nonfinite", "skips", "straggler", "throughput_drop", "checkpoint_failed")


class Alerts:
    """Raise alerts (logging rank). emit: writes the record (MetricsLogger.event)."""

    def __init__(self, cfg, emit: Optional[Callable[[dict], None]] = None) -> None:
        self.cfg = cfg
        self.emit = emit
        self.count = 0
        self._hooks = bool(cfg.command or cfg.webhook)
        self._queue: queue.Queue = queue.Queue(maxsize=100)
        self._thread: Optional[threading.Thread] = None
        if self._hooks:
            self._thread = threading.Thread(target=self._run_hooks, name="megatron-tts-alert-hooks", daemon=True)
            self._thread.start()

    def alert(self, kind: str, message: str, step: Optional[int], **extra) -> dict:
        assert kind in KINDS, kind
        self.count += 1
        log.error("ALERT %s: %s", kind, message)
        record = {"event": "alert", "step": step, "time": time.time(), "kind": kind, "message": message, **extra}
        if self.emit is not None:
            catch("alerts.emit")(self.emit)(record)
        if self._hooks:
            try:
                self._queue.put_nowait(record)
            except queue.Full as e:  # hooks far behind (a hanging webhook): drop, count
                NONFATAL.record("alerts.hook queue", e)
        return record

    # ---- hooks, on their own thread ----
    def _run_hooks(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            data = json.dumps(record).encode()
            if self.cfg.command:
                catch("alerts.command")(self._run_command)(data)
            if self.cfg.webhook:
                catch("alerts.webhook")(self._post)(data)

    def _run_command(self, data: bytes) -> None:
        p = subprocess.run(shlex.split(self.cfg.command), input=data, capture_output=True,
                           timeout=self.cfg.timeout_s)
        if p.returncode != 0:
            raise RuntimeError(f"alerts.command exited {p.returncode}: {p.stderr.decode(errors='replace')[-500:]}")

    def _post(self, data: bytes) -> None:
        req = urllib.request.Request(self.cfg.webhook, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:
            r.read()

    def close(self, wait_s: Optional[float] = None) -> None:
        """Let queued hooks finish (at most wait_s, default timeout_s + 1), then stop the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=1)
        except queue.Full:
            pass
        self._thread.join(timeout=self.cfg.timeout_s + 1 if wait_s is None else wait_s)
        self._thread = None


class ThroughputWatch:
    """A drop: the median of the last `recent` tokens/s values falls more than `drop` below the
    median of the `window` values before them. Alerts once per drop: re-armed when the recent
    median is back above the threshold (or the baseline has caught up with the new level)."""

    def __init__(self, drop: float = 0.10, window: int = 50, recent: int = 5, min_history: int = 10) -> None:
        self.drop = drop
        self.recent = recent
        self.min_history = max(min_history, recent)
        self.values: collections.deque[float] = collections.deque(maxlen=window + recent)
        self.dropped = False

    def update(self, tokens_per_s: float) -> Optional[str]:
        """Feed one step; returns a message when a drop starts."""
        self.values.append(tokens_per_s)
        if len(self.values) < self.min_history + self.recent:
            return None
        vals = list(self.values)
        base = statistics.median(vals[:-self.recent])
        now = statistics.median(vals[-self.recent:])
        low = now < (1.0 - self.drop) * base
        started = low and not self.dropped
        self.dropped = low
        if started:
            return (f"throughput fell {100 * (1 - now / base):.0f}%: median {now:,.0f} tokens/s over the last "
                    f"{self.recent} steps vs {base:,.0f} over the {len(vals) - self.recent} before")
        return None


class StallWatch:
    """No completed step for max(stall_s, k x the median recent step time) seconds, checkpoint
    phases excluded, counted from the first completed step. `check()` is the rule; `start()`
    runs it on a daemon thread and calls on_stall(message, last_step) once per stall."""

    K = 5.0  # multiples of the median step time: long steps are not stalls

    def __init__(self, stall_s: float, on_stall: Callable[[str, int], None], clock=time.monotonic) -> None:
        self.stall_s = stall_s
        self.on_stall = on_stall
        self.clock = clock
        self.step_times: collections.deque[float] = collections.deque(maxlen=50)
        self.last_step = 0
        self._last_progress: Optional[float] = None  # None until the first step completes
        self._paused = False
        self._fired = False
        self.phase = "startup"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def progress(self, step: int, step_time: float) -> None:
        self.step_times.append(step_time)
        self.last_step = step
        self._last_progress = self.clock()
        self._fired = False

    def pause(self, paused: bool) -> None:
        """Checkpoint saves and loads are not stalls; the clock restarts when they end."""
        self._paused = paused
        if not paused and self._last_progress is not None:
            self._last_progress = self.clock()

    def limit(self) -> float:
        med = statistics.median(self.step_times) if self.step_times else 0.0
        return max(self.stall_s, self.K * med)

    def check(self) -> Optional[str]:
        last = self._last_progress
        if last is None or self._paused or self._fired:
            return None
        since = self.clock() - last
        limit = self.limit()
        if since <= limit:
            return None
        self._fired = True
        return (f"no step completed for {since:.0f} s (limit {limit:.0f} s) after step {self.last_step}; "
                f"last phase '{self.phase}'")

    def start(self, poll_s: Optional[float] = None) -> "StallWatch":
        poll = poll_s if poll_s is not None else min(5.0, self.stall_s / 4)
        self._thread = threading.Thread(target=self._run, args=(poll,), name="megatron-tts-stall", daemon=True)
        self._thread.start()
        return self

    def _run(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            message = self.check()
            if message is not None:
                catch("alerts.stall")(self.on_stall)(message, self.last_step)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
