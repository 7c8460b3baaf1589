"""Per-phase step timers and NVTX ranges, with no host sync of their own.

    with timers.phase("optimizer"):   # host wall time + an NVTX range (+ a torch.profiler label)
        ...
    with timers.span("grad_sync"):    # a wait inside a phase, timed exactly on GPU too
        ...

Phases are timed on the host (time.perf_counter). On GPU the host runs ahead of the device, so
a host interval holds whatever queued work the next sync point waits for. The loop puts its
phase boundaries at sync points that already exist: forward_backward ends after the step's
statistics all-reduce, whose result is copied to the host; the optimizer's grad-norm reduction
syncs inside its phase, and its queued parameter updates are the only work that spills into the
next step's forward_backward. Spans (the gradient sync inside forward_backward, the statistics
all-reduce) are timed with CUDA events on GPU: recording an event does not sync, and both spans
end before the statistics copy that waits for them, so their elapsed times are read afterwards
without waiting (an event not yet complete is reported as None, never waited for).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch


class _Range:
    """A reusable context manager for one phase or span name (cheaper than a generator)."""

    __slots__ = ("timers", "name", "span", "t0", "ev0", "label")

    def __init__(self, timers: "PhaseTimers", name: str, span: bool) -> None:
        self.timers, self.name, self.span = timers, name, span
        self.t0 = 0.0
        self.ev0 = None
        self.label = None

    def __enter__(self) -> None:
        t = self.timers
        if t.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        if t.annotate is not None:
            self.label = t.annotate(self.name)
            self.label.__enter__()
        if self.span and t.cuda:
            self.ev0 = torch.cuda.Event(enable_timing=True)
            self.ev0.record()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        t = self.timers
        dt = time.perf_counter() - self.t0
        if self.span and t.cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            t._events.append((self.name, self.ev0, ev1))
        else:
            t.acc[self.name] = t.acc.get(self.name, 0.0) + dt
        if self.label is not None:
            self.label.__exit__(*exc)
            self.label = None
        if t.nvtx:
            torch.cuda.nvtx.range_pop()


class _Nothing:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


NOTHING = _Nothing()


class PhaseTimers:
    """Accumulates seconds per phase/span name until `take()`.

    enabled=False: phase() and span() return a shared no-op context (nothing is timed).
    nvtx: push/pop NVTX ranges (only where CUDA is available; a no-op otherwise).
    annotate: set while a torch.profiler trace records, to label phases in the trace."""

    def __init__(self, enabled: bool = True, nvtx: bool = True, cuda: Optional[bool] = None) -> None:
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.enabled = enabled
        self.nvtx = nvtx and self.cuda
        self.annotate: Optional[Callable[[str], object]] = None
        self.acc: dict[str, float] = {}
        self._events: list = []
        self._ranges: dict[tuple[str, bool], _Range] = {}

    def phase(self, name: str):
        return self._range(name, False)

    def span(self, name: str):
        return self._range(name, True)

    def _range(self, name: str, span: bool):
        if not (self.enabled or self.nvtx or self.annotate is not None):
            return NOTHING
        r = self._ranges.get((name, span))
        if r is None:
            r = self._ranges[(name, span)] = _Range(self, name, span)
        return r

    def resolve(self) -> None:
        """Fold completed CUDA-event spans into the totals. Call after a sync point that follows
        them (the loop: after the step's statistics reach the host); never waits."""
        pending = []
        for name, ev0, ev1 in self._events:
            if ev1.query():
                self.acc[name] = self.acc.get(name, 0.0) + ev0.elapsed_time(ev1) / 1000.0
            else:
                pending.append((name, ev0, ev1))
        self._events = pending[-64:]  # an event that never completes must not grow the list forever

    def take(self, names: tuple[str, ...]) -> dict[str, Optional[float]]:
        """The accumulated seconds of `names` (None where nothing was timed), and reset them."""
        self.resolve()
        return {n: self.acc.pop(n, None) for n in names}
