"""monitoring.safe: failing sinks, writers and the console are counted and logged (rate-limited),
never raised; metrics.jsonl survives a full disk; the count shows up as `nonfatal_errors`."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from monitoring import metrics, safe
from monitoring.metrics import JsonlWriter, MetricsLogger, read_jsonl
from monitoring.safe import ErrorCounter, catch


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def counter(caplog):
    caplog.set_level(logging.WARNING, logger="test.safe")
    clock = Clock()
    c = ErrorCounter(interval_s=60.0, clock=clock, logger=logging.getLogger("test.safe"))
    c.clock_ = clock
    return c


def record(step: int = 1) -> dict:
    return {"step": step, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0,
            "step_time_s": 0.1, "data_wait_s": 0.01, "pack_efficiency": 0.9}


def test_a_raising_sink_is_counted_and_logged_never_raised(counter, caplog):
    calls = []

    @catch("flaky sink", counter=counter, default="fallback")
    def write(x):
        calls.append(x)
        raise ConnectionError("network down")

    assert write(1) == "fallback"
    assert calls == [1]
    assert counter.total == 1 and counter.snapshot() == {"flaky sink": 1}
    assert "non-fatal error in flaky sink (#1, training continues): ConnectionError: network down" in caplog.text
    assert "Traceback" in caplog.text  # the first failure of a kind carries its traceback


def test_logging_is_rate_limited_per_name(counter, caplog):
    boom = catch("sink a", counter=counter)(lambda: 1 / 0)
    other = catch("sink b", counter=counter)(lambda: [][1])
    for _ in range(100):
        boom()
    assert counter.total == 100
    assert caplog.text.count("non-fatal error in sink a") == 1  # 99 suppressed
    other()  # another name is reported at once
    assert caplog.text.count("non-fatal error in sink b") == 1
    counter.clock_.t += 61  # a minute later: one line, saying how many were suppressed
    boom()
    assert caplog.text.count("non-fatal error in sink a") == 2
    assert "(99 more since the last report)" in caplog.text
    assert caplog.text.count("Traceback") == 2  # a and b once each, not the repeat
    assert counter.snapshot() == {"sink a": 101, "sink b": 1} and counter.total == 102


def test_fatal_exits_pass_through(counter):
    @catch("sink", counter=counter)
    def interrupted():
        raise KeyboardInterrupt

    @catch("sink", counter=counter)
    def exiting():
        raise SystemExit(3)

    @catch("sink", counter=counter, reraise=(MemoryError,))
    def oom():
        raise MemoryError

    for fn, exc in ((interrupted, KeyboardInterrupt), (exiting, SystemExit), (oom, MemoryError)):
        with pytest.raises(exc):
            fn()
    assert counter.total == 0


def test_success_returns_the_value(counter):
    assert catch("x", counter=counter)(lambda a, b=2: a + b)(1, b=5) == 6
    assert counter.total == 0


class BrokenSink:
    def write(self, record):
        raise RuntimeError("sink exploded")

    def close(self):
        raise RuntimeError("close exploded")


class ClosedStream(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_metrics_logger_survives_a_full_disk_a_broken_sink_and_a_dead_console(tmp_path, monkeypatch):
    monkeypatch.setattr(safe.NONFATAL, "total", 0)
    logger = MetricsLogger(str(tmp_path), console=True, stream=ClosedStream(), extra_sinks=[BrokenSink()])
    logger.log(record(1))  # sink + console fail: 2 errors; the JSONL line is written
    good = JsonlWriter(logger.jsonl.path)
    logger.jsonl.close()
    logger.jsonl = JsonlWriter("/dev/full")  # every write: ENOSPC
    logger.log(record(2))  # JSONL + sink + console: 3 more
    logger.event({"event": "checkpoint", "step": 2})  # 1 more
    logger.jsonl.close()
    logger.jsonl = good  # space again
    logger.log(record(3))  # sink + console
    logger.close()  # the sink's close fails too
    assert safe.NONFATAL.total == 9
    recs = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 3]
    # each record carries the count of non-fatal errors before it
    assert [r["nonfatal_errors"] for r in recs] == [0, 6]


def test_a_torn_line_is_isolated_and_skipped(tmp_path, monkeypatch):
    path = str(tmp_path / "m.jsonl")
    w = JsonlWriter(path)
    w.write({"step": 1})
    real_write = os.write
    calls = {"n": 0}

    def half_then_enospc(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:5]))  # part of the line made it out
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", half_then_enospc)
    with pytest.raises(OSError):
        w.write({"step": 2, "loss": 1.0})
    monkeypatch.setattr(metrics.os, "write", real_write)
    w.write({"step": 3})
    w.close()
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == '{"step": 1}' and lines[1] == '{"ste' and json.loads(lines[2]) == {"step": 3}
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]


def test_wandb_sink_failures_are_nonfatal(monkeypatch):
    monkeypatch.setattr(safe.NONFATAL, "total", 0)

    class Run:
        def log(self, *a, **k):
            raise TimeoutError("wandb backend unreachable")

        def finish(self):
            raise TimeoutError("still unreachable")

    sink = metrics.WandbSink.__new__(metrics.WandbSink)
    sink.run = Run()
    sink.write(record())
    sink.close()
    assert safe.NONFATAL.total == 2
