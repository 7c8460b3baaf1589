"""Metrics sinks. RUN_DIR/metrics.jsonl is the source of truth; everything else is a view of it."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Optional, TextIO

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class JsonlWriter:
    """Appends one JSON object per line; flushed per record so a crash loses at most one line."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def console_line(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}"]
    if r.get("loss_text") is not None:
        parts.append(f"text {r['loss_text']:.3f}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}",
              f"{r['tokens_per_s']:,.0f} tok/s", f"{r['step_time_s'] * 1000:.0f} ms",
              f"data {r['data_wait_s'] * 1000:.0f} ms", f"pack {r['pack_efficiency'] * 100:.1f}%"]
    return " | ".join(parts)


class WandbSink:
    """Optional mirror of metrics.jsonl into wandb, offline unless WANDB_MODE says otherwise.
    Its failures are logged and never stop training."""

    def __init__(self, project: str, run_dir: str, config: dict) -> None:
        self.run = None
        os.environ.setdefault("WANDB_MODE", "offline")
        try:
            import wandb

            self.run = wandb.init(project=project, dir=run_dir, config=config, reinit=True)
        except Exception as e:  # wandb missing or broken: our JSONL is the source of truth
            log.warning("wandb disabled: %s", e)

    def write(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        except Exception as e:
            log.warning("wandb log failed: %s", e)

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                log.warning("wandb finish failed: %s", e)


class MetricsLogger:
    """Fans a step record out to metrics.jsonl, the console and optional sinks."""

    def __init__(self, run_dir: str, console: bool = True, stream: Optional[TextIO] = None,
                 extra_sinks: Optional[list] = None) -> None:
        self.jsonl = JsonlWriter(os.path.join(run_dir, "metrics.jsonl"))
        self.console = console
        self.stream = stream or sys.stdout
        self.sinks = extra_sinks or []

    def log(self, record: dict) -> None:
        self.jsonl.write(record)
        for sink in self.sinks:
            sink.write(record)
        if self.console:
            print(console_line(record), file=self.stream, flush=True)

    def event(self, record: dict) -> None:
        """A non-step record (checkpoint saved, resumed, ...) in the same stream."""
        self.jsonl.write(record)

    def close(self) -> None:
        self.jsonl.close()
        for sink in self.sinks:
            sink.close()
