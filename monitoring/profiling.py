"""Profiling windows: Nsight Systems capture ranges, torch.profiler traces, runtime triggers.

Windows are half-open step ranges [start, stop), opened before step `start` and closed before
step `stop` (or when the run ends), on the ranks in profiling.ranks; the loop calls
`step_begin(step)` before each step and `close(last_step)` at the end:

- profiling.nsys_steps: torch.cuda.profiler.start()/stop() (cudaProfilerStart/Stop), the
  capture range of `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`.
  Needs CUDA; the config refuses it on a machine without.
- profiling.torch_steps: a torch.profiler trace (CPU, and CUDA activity when present), written
  as a Chrome trace to RUN_DIR/profile/torch_rank{R}_steps{A}-{B}.json (A..B inclusive). Each
  step is a `ProfilerStep#<step>` range, each phase a range of its name.
- Runtime: `touch RUN_DIR/PROFILE` (profiling.trigger_file; any change since start or the last trigger counts) on
  profiling.ranks, or SIGUSR2 to a worker process (that worker only), traces the next
  profiling.trigger_steps steps with the torch profiler, without a restart.

Each start and stop is logged and, on the logging rank, written as a 'profile' event (`path`:
the trace file, on a torch stop; null otherwise).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


class Profiler:
    def __init__(self, cfg, rank: int, run_dir: str, emit: Optional[Callable[[dict], None]] = None,
                 cuda: Optional[bool] = None, profile_requests: Callable[[], int] = lambda: 0) -> None:
        """profile_requests: a counter that grows with each SIGUSR2 (megatron_tts.signals)."""
        self.cfg = cfg
        self.rank = rank
        self.run_dir = run_dir
        self.emit = emit
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.selected = rank in cfg.ranks
        if cfg.nsys_steps and self.selected and not self.cuda:
            raise RuntimeError("profiling.nsys_steps needs CUDA (an nsys capture range is opened with "
                               "cudaProfilerStart); use profiling.torch_steps on CPU")
        self.nsys_window = tuple(cfg.nsys_steps) if cfg.nsys_steps and self.selected else None
        self.torch_window = tuple(cfg.torch_steps) if cfg.torch_steps and self.selected else None
        self._nsys_on = False
        self._torch: Optional[torch.profiler.profile] = None
        self._torch_range: tuple[int, int] = (0, 0)
        self._trigger_path = os.path.join(run_dir, cfg.trigger_file)
        # The trigger file's state when we last looked: a file already there at start is stale.
        # (Compared for change, not against the clock: file times come from the kernel's coarse
        # clock and can lag time.time() by a tick, which made a fresh touch look old under load.)
        self._trigger_seen = self._trigger_state()
        self._next_check = 0.0
        self._profile_requests = profile_requests
        self._signals_seen = profile_requests()
        self.on_change: Optional[Callable[[Optional[Callable]], None]] = None  # phase labels on/off

    @property
    def tracing(self) -> bool:
        return self._torch is not None

    # ---- the loop's call, before each step ----
    def step_begin(self, step: int) -> None:
        """Open and close windows at this step boundary: a window [a, b) opens before step a and
        closes before step b, so step b-1's checkpoint and logging are inside it."""
        if self._nsys_on and not self.nsys_window[0] <= step < self.nsys_window[1]:
            self._stop_nsys(step - 1)
        elif self.nsys_window and not self._nsys_on and self.nsys_window[0] <= step < self.nsys_window[1]:
            torch.cuda.profiler.start()
            self._nsys_on = True
            self._event(step, "nsys", "start", None)
        if self._torch is not None:
            if self._torch_range[0] <= step < self._torch_range[1]:
                self._torch.step()  # closes ProfilerStep#(step-1), opens ProfilerStep#step
            else:  # past the window (or a rollback went back before it)
                self._stop_torch(step - 1)
        if self._torch is None:
            window = self._requested_window(step)
            if window is not None:
                self._start_torch(*window)

    def close(self, last_step: int) -> None:
        """The run ends: close an open window after `last_step` (a partial trace is still written)."""
        if self._torch is not None:
            self._stop_torch(last_step)
        if self._nsys_on:
            self._stop_nsys(last_step)

    def _stop_nsys(self, last_step: int) -> None:
        torch.cuda.synchronize()  # the capture range must hold the window's queued kernels
        torch.cuda.profiler.stop()
        self._nsys_on = False
        self.nsys_window = None  # once per process (a rollback replays step numbers)
        self._event(last_step, "nsys", "stop", None)

    # ---- torch.profiler ----
    def _requested_window(self, step: int) -> Optional[tuple[int, int]]:
        w = self.torch_window
        if w and w[0] <= step < w[1]:
            self.torch_window = None  # once per process
            return step, w[1]
        n = self.cfg.trigger_steps
        requests = self._profile_requests()
        if requests != self._signals_seen:
            self._signals_seen = requests
            log.warning("SIGUSR2: tracing steps %d-%d on rank %d", step, step + n - 1, self.rank)
            return step, step + n
        if self.selected and self._trigger_file_touched():
            log.warning("%s touched: tracing steps %d-%d on rank %d", self._trigger_path, step, step + n - 1,
                        self.rank)
            return step, step + n
        return None

    def _trigger_state(self) -> Optional[tuple[int, int, int]]:
        try:
            st = os.stat(self._trigger_path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def _trigger_file_touched(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.cfg.trigger_check_s
        state = self._trigger_state()
        if state is None or state == self._trigger_seen:
            return False
        self._trigger_seen = state
        return True

    def _start_torch(self, start: int, stop: int) -> None:
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # A schedule makes the profiler label each step "ProfilerStep#<n>"; numbering from our step.
        prof = profile(activities=activities, schedule=lambda _: ProfilerAction.RECORD)
        prof.step_num = start
        prof.start()
        self._torch = prof
        self._torch_range = (start, stop)
        if self.on_change is not None:
            self.on_change(torch.profiler.record_function)
        self._event(start, "torch", "start", None)

    def _stop_torch(self, step: int) -> None:
        prof, self._torch = self._torch, None
        if self.on_change is not None:
            self.on_change(None)
        path = self._trace_path(self._torch_range[0], step)
        try:
            prof.stop()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            prof.export_chrome_trace(path)
        except Exception as e:  # a profiler failure must not end the run
            log.error("torch profiler trace of steps %d-%d failed: %s: %s", self._torch_range[0], step,
                      type(e).__name__, e)
            path = None
        self._event(step, "torch", "stop", path)

    def _trace_path(self, first: int, last: int) -> str:
        return os.path.join(self.run_dir, "profile", f"torch_rank{self.rank}_steps{first}-{last}.json")

    def _event(self, step: int, kind: str, action: str, path: Optional[str]) -> None:
        log.info("profile %s %s at step %d on rank %d%s", kind, action, step, self.rank, f": {path}" if path else "")
        if self.emit is not None:
            self.emit({"event": "profile", "step": step, "time": time.time(), "kind": kind, "action": action,
                       "path": path})
