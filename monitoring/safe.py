"""Non-fatal errors: a metric sink, log writer or network call that fails must not stop training.

    @catch("wandb.log")
    def write(self, record): ...

A failure inside a wrapped call (any Exception; KeyboardInterrupt and SystemExit pass through,
and so do the types given in `reraise`) is counted and logged, and the call returns `default`.
Logging is rate-limited per name: the first failure is logged with its traceback, later ones
at most once per `interval_s` with the number suppressed in between, so a sink failing on every
step costs one line a minute, not one a step.

The counts live in a process-wide `ErrorCounter` (`NONFATAL`); MetricsLogger writes its total
into every metrics.jsonl record as `nonfatal_errors` (the logging rank's count).

Only wrap what training can do without: metrics.jsonl stays the source of truth, but a full
disk there must not kill a run whose checkpoints are elsewhere. Never wrap checkpoint saves,
the data path or collectives: their failures are real failures (exit 1 or 3).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("monitoring.safe")


class ErrorCounter:
    """Counts failures by name and logs them, rate-limited per name."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.logger = logger
        self.total = 0
        self.by_name: dict[str, int] = {}
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, name: str, exc: BaseException) -> None:
        with self._lock:
            self.total += 1
            self.by_name[name] = self.by_name.get(name, 0) + 1
            now = self.clock()
            last = self._last_logged.get(name)
            if last is not None and now - last < self.interval_s:
                self._suppressed[name] = self._suppressed.get(name, 0) + 1
                return
            first = last is None
            suppressed = self._suppressed.pop(name, 0)
            self._last_logged[name] = now
        try:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self.logger.warning("non-fatal error in %s (#%d, training continues)%s: %s: %s", name,
                                self.by_name[name], more, type(exc).__name__, exc,
                                exc_info=(type(exc), exc, exc.__traceback__) if first else None)
        except Exception:  # the log itself may be what is broken (a closed stderr)
            pass

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.by_name)


NONFATAL = ErrorCounter()


def catch(name: str, *, default: Any = None, counter: Optional[ErrorCounter] = None,
          reraise: tuple[type[BaseException], ...] = ()) -> Callable:
    """Decorator: failures of the wrapped function are counted under `name`, logged (rate-limited)
    and turned into `default`."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except reraise:
                raise
            except Exception as e:
                (counter or NONFATAL).record(name, e)
                return default

        return wrapper

    return deco


def call(name: str, fn: Callable, *args, **kwargs) -> Any:
    """Run fn(*args, **kwargs) under `catch(name)`; returns None when it fails."""
    return catch(name)(fn)(*args, **kwargs)
