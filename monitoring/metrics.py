"""Metrics sinks. RUN_DIR/metrics.jsonl is the source of truth; everything else is a view of it."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Optional, TextIO

from monitoring.safe import NONFATAL, catch

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric values of a record, nested dicts as 'outer/inner' keys (for wandb, TensorBoard)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = int(v) if isinstance(v, bool) else v
    return out


class JsonlWriter:
    """Appends one JSON object per line, one unbuffered O_APPEND write per record, so a crash loses
    at most one line. A failed write raises (callers that can live without it wrap it in
    monitoring.safe.catch) and leaves nothing buffered to resurface later; if it got part of a
    line out (ENOSPC mid-write), the next record starts on a new line, so only that fragment is
    unreadable (read_jsonl skips it)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._torn = False  # the last write stopped mid-line

    def write(self, record: dict) -> None:
        data = (json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n").encode()
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError:
                if len(view) < len(data):
                    self._torn = True
                raise
            view = view[n:]
        self._torn = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file; a line torn by a failed write (full disk) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    log.warning("%s: skipping an unreadable line (a torn write?): %.80s", path, line)
    return out


def console_line(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}"]
    if r.get("loss_text") is not None:
        parts.append(f"text {r['loss_text']:.3f}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}",
              f"{r['tokens_per_s']:,.0f} tok/s", f"{r['step_time_s'] * 1000:.0f} ms",
              f"data {r['data_wait_s'] * 1000:.0f} ms", f"pack {r['pack_efficiency'] * 100:.1f}%"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {r['mfu'] * 100:.1f}%")
    return " | ".join(parts)


class WandbSink:
    """Optional mirror of the step records into wandb: offline by default (logging.wandb_mode),
    under RUN_DIR/wandb unless WANDB_DIR says where. Nested values go in as 'phase_s/data', ...
    Its failures (wandb missing or broken, network) are counted as non-fatal errors, logged
    (rate-limited) and never stop training: our JSONL is the source of truth."""

    def __init__(self, project: str, run_dir: str, config: dict, mode: str = "offline") -> None:
        self.run = self._init(project, os.environ.get("WANDB_DIR") or run_dir, config, mode)

    @staticmethod
    @catch("wandb.init")
    def _init(project: str, run_dir: str, config: dict, mode: str):
        import wandb

        return wandb.init(project=project, dir=run_dir, config=config, mode=mode, reinit=True)

    @catch("wandb.log")
    def write(self, record: dict) -> None:
        if self.run is not None:
            self.run.log(flatten(record), step=record["step"])

    @catch("wandb.finish")
    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class TensorBoardSink:
    """Optional TensorBoard scalars (RUN_DIR/tensorboard), nested values as 'phase_s/data', ...
    Failures are non-fatal, as for every sink."""

    def __init__(self, log_dir: str) -> None:
        self.writer = self._init(log_dir)

    @staticmethod
    @catch("tensorboard init")
    def _init(log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir)

    def write(self, record: dict) -> None:
        if self.writer is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            # one event holding every scalar of the record: add_scalar per value costs ~40 us each
            summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in flatten(record).items()])
            self.writer.file_writer.add_summary(summary, global_step=record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricsLogger:
    """Fans a step record out to metrics.jsonl, the console and optional sinks."""

    def __init__(self, run_dir: str, console: bool = True, stream: Optional[TextIO] = None,
                 extra_sinks: Optional[list] = None) -> None:
        self.jsonl = JsonlWriter(os.path.join(run_dir, "metrics.jsonl"))
        self.console = console
        self.stream = stream or sys.stdout
        self.sinks = extra_sinks or []

    def log(self, record: dict) -> None:
        # Every write below is non-fatal (monitoring/safe.py): a full disk, a broken sink or a
        # closed console is counted (`nonfatal_errors`, the count before this record) and logged.
        record = {**record, "nonfatal_errors": NONFATAL.total}
        record.setdefault("time", time.time())
        self._write_jsonl(record)
        for sink in self.sinks:
            catch(f"sink {type(sink).__name__}")(sink.write)(record)
        if self.console:
            self._print(record)

    def event(self, record: dict) -> None:
        """A non-step record (checkpoint saved, resumed, ...) in the same stream."""
        if "time" not in record:
            record = {**record, "time": time.time()}
        self._write_jsonl(record)

    @catch("metrics.jsonl write")
    def _write_jsonl(self, record: dict) -> None:
        self.jsonl.write(record)

    @catch("console")
    def _print(self, record: dict) -> None:
        print(console_line(record), file=self.stream, flush=True)

    def close(self) -> None:
        catch("metrics.jsonl close")(self.jsonl.close)()
        for sink in self.sinks:
            catch(f"sink {type(sink).__name__} close")(sink.close)()
