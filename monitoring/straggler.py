"""Straggler detection: which rank keeps the others waiting.

In synchronous training every rank's wall-clock step time is the same: the fast ranks wait for
the slow one inside a collective. So each rank measures its *busy* time, the step time minus
what it spent waiting in the step's collectives that the loop can time on their own (the
gradient sync, timed around megatron's finalize_model_grads, and the statistics all-reduce).
A slow rank's busy time stays high while its peers' drops by the time they waited for it.

Every `interval` steps, one all_gather of one float per rank collects the mean busy time of the
window (the first step of a process, its warm-up, is left out). A rank whose busy time exceeds
`ratio` x the median for `windows` windows in a row is flagged, with its host.

Limits: waits inside tensor- or pipeline-parallel communication (inside the forward and
backward passes) cannot be told apart on the host, so under TP/PP a slow rank's delay also
shows in the busy time of its TP/PP group peers; pipeline stages also differ by design (the
last one holds the LM head). The rule then names the slow group rather than the slow rank.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional


@dataclass
class Flag:
    rank: int
    ratio: float  # busy time / median of the window
    windows: int  # consecutive slow windows so far
    new: bool  # the window in which it crossed `windows` (alert once per streak)


class StragglerDetector:
    """The rule, on gathered per-rank times (no communication here)."""

    def __init__(self, ratio: float = 1.1, windows: int = 3) -> None:
        self.ratio = ratio
        self.windows = windows
        self.streak: dict[int, int] = {}

    def update(self, times: list[float]) -> list[Flag]:
        """One window's per-rank busy times -> the ranks flagged in it (slow `windows` times in a row)."""
        if not times or any(not math.isfinite(t) for t in times):
            return []  # a rank without a timed step in this window: no verdict, streaks kept
        med = statistics.median(times)
        if med <= 0:
            return []
        flags = []
        for rank, t in enumerate(times):
            r = t / med
            if r > self.ratio:
                self.streak[rank] = self.streak.get(rank, 0) + 1
                if self.streak[rank] >= self.windows:
                    flags.append(Flag(rank, r, self.streak[rank], self.streak[rank] == self.windows))
            else:
                self.streak.pop(rank, None)
        return flags


class BusyWindow:
    """This rank's busy seconds over the current window."""

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0
        self._first = True

    def add(self, step_time: float, waits: float) -> None:
        if self._first:  # warm-up: allocations, lazy communicator set-up
            self._first = False
            return
        self.total += max(step_time - waits, 0.0)
        self.n += 1

    def take(self) -> float:
        mean = self.total / self.n if self.n else float("nan")
        self.total, self.n = 0.0, 0
        return mean


def summary(times: list[float]) -> Optional[dict]:
    finite = [t for t in times if math.isfinite(t)]
    if not finite:
        return None
    return {"min": min(finite), "median": statistics.median(finite), "max": max(finite)}
