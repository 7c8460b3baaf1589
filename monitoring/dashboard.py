"""Run dashboard: one self-contained HTML page (inline JS + canvas, no network) from a run directory.

    python -m monitoring.dashboard RUN_DIR [--out PATH]           # writes RUN_DIR/dashboard.html
    python -m monitoring.dashboard RUN_DIR --serve [--port P]     # live on http://127.0.0.1:P/

metrics.jsonl is read streaming and incrementally (the live server reads only the bytes appended
since its last look). Step records are kept per step, the latest incarnation only: a record for
step s drops every earlier record with a step >= s, and a resume (rollback) event drops the records
after the step it restored, so a resumed run plots what the surviving run did. Every series is
downsampled to at most MAX_POINTS buckets (mean line, min-max band); GPU samples and per-rank step
times go into step bins whose width doubles as the run grows, so memory stays bounded however
long the run. The page renders with any subset of the fields: a panel without data says so.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import json
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
import warnings
from array import array
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Optional

import numpy as np

from monitoring.metrics import read_jsonl

MAX_POINTS = 2000  # buckets per step series
GPU_BINS = 300  # step bins of the GPU panels
HEAT_BINS = 200  # step windows (columns) of the per-rank heatmap
HEAT_ROWS = 128  # more ranks than this are grouped (the slowest rank of a group is shown)
PER_GPU_LINES = 16  # more GPUs than this: one mean line with a min-max band per GPU panel
MAX_EVENTS = 5000  # kept per event kind (the newest)
TABLE_ROWS = 500  # newest events listed in the page's table
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_assets")

# Scalar step-record fields plotted or summarised; a few old names are aliases.
SCALARS = ("loss", "loss_text", "loss_speech", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu",
           "tflops_per_gpu", "mfu", "step_time_s", "data_wait_s", "pack_efficiency", "skipped_step",
           "skipped_steps", "loss_spikes", "rollbacks", "skipped_bad_sample", "skipped_bad_shard",
           "nonfatal_errors", "consumed_tokens", "consumed_samples", "audio_hours", "time", "epoch",
           "val_loss", "val_loss_speech", "val_loss_text")
_SCALAR_SET = frozenset(SCALARS)
ALIASES = {"spikes": "loss_spikes"}
NESTED = {"phase_s": "phase.", "mem": "mem.", "loss_by_source": "src.", "val_loss_by_source": "vsrc."}
SAMPLE_STEPS = 6  # newest steps of audio samples embedded in the page
SAMPLE_BYTES = 4 << 20  # a wav or png larger than this is listed, not embedded
GPU_METRICS = ("util_pct", "mem_used_gb", "power_w", "temp_c", "sm_clock_mhz")
# NVML reasons that are not a slowdown (an idle GPU, clocks set on purpose): no marker for them.
BENIGN_THROTTLE = ("idle", "applicationsclock", "applicationclock", "syncboost", "displayclock", "none")

CONFIG_KEYS = (
    "model.transformer.num_layers", "model.transformer.hidden_size", "model.transformer.num_attention_heads",
    "model.transformer.num_query_groups", "model.transformer.ffn_hidden_size", "model.layout",
    "parallel.tp", "parallel.pp", "parallel.dp", "parallel.vpp", "parallel.sequence_parallel",
    "data.seq_len", "data.paths", "train.steps", "train.micro_batch_size", "train.global_batch_size",
    "train.dtype", "train.seed", "optim.optimizer.lr", "optim.optimizer.min_lr", "optim.schedule.warmup_steps",
    "optim.schedule.decay_style", "optim.distributed", "checkpoint.interval", "checkpoint.async_save",
    "logging.interval",
)


class DashboardError(Exception):
    """A problem the user fixes (bad run dir, port in use): printed as one line, exit non-zero."""


def _num(v: Any) -> float:
    """A metrics value as a float: None/missing/unparsable -> NaN; "nan"/"inf" strings (how
    JsonlWriter stores non-finite floats) -> their float; booleans -> 0/1."""
    t = type(v)
    if t is float:
        return v
    if t is int or t is bool:
        return float(v)
    if v is None:
        return math.nan
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return math.nan
    return math.nan


def _finite(v: Any) -> Optional[float]:
    x = _num(v)
    return x if math.isfinite(x) else None


def _rounded(a: Iterable[float], digits: int = 5) -> list:
    fmt = f"{{:.{digits}g}}"
    return [float(fmt.format(v)) if math.isfinite(v) else None for v in a]


class StepColumns:
    """Step records as columns (array('d'), NaN = missing), sorted by step, one row per step."""

    def __init__(self) -> None:
        self.steps = array("q")
        self.cols: dict[str, array] = {}
        self.nonfinite: Counter = Counter()  # values stored as "nan"/"inf" (seen in the file)

    def __len__(self) -> int:
        return len(self.steps)

    def truncate_after(self, step: int) -> None:
        """Drop the rows with a step > `step` (a resume or rollback restored that step)."""
        i = bisect.bisect_right(self.steps, step)
        if i < len(self.steps):
            del self.steps[i:]
            for c in self.cols.values():
                del c[i:]

    def add(self, rec: dict) -> None:
        # The hot loop of a large run (10^5-10^6 records): plain dict/type checks only.
        step = int(rec["step"])
        if self.steps and step <= self.steps[-1]:
            self.truncate_after(step - 1)  # a later incarnation ran this step again
        row: dict[str, Any] = {}
        for k, v in rec.items():
            if k in _SCALAR_SET:
                row[k] = v
            elif k in NESTED:
                if type(v) is dict:
                    prefix = NESTED[k]
                    for sub, sv in v.items():
                        row[prefix + str(sub)] = sv
            elif k in ALIASES:
                row[ALIASES[k]] = v
        n = len(self.steps)
        self.steps.append(step)
        for name, col in self.cols.items():
            v = row.pop(name, None)
            t = type(v)
            col.append(v if t is float or t is int or t is bool else self._value(name, v))
        for name, v in row.items():  # a field first seen now: earlier rows lack it
            t = type(v)
            col = array("d", [math.nan]) * n
            col.append(v if t is float or t is int or t is bool else self._value(name, v))
            self.cols[name] = col

    def _value(self, name: str, v: Any) -> float:
        x = _num(v)
        if v is not None and not math.isfinite(x):
            self.nonfinite[name] += 1
        return x

    def last(self, name: str) -> Optional[float]:
        """The newest finite value of a column."""
        col = self.cols.get(name)
        if col is None:
            return None
        for i in range(len(col) - 1, max(-1, len(col) - 1000), -1):
            if math.isfinite(col[i]):
                return col[i]
        return None

    def downsampled(self, max_points: int = MAX_POINTS) -> dict:
        """x (bucket mean step) and, per non-empty column, y (mean of the finite values), plus lo/hi
        (min/max) when buckets hold more than one record."""
        n = len(self.steps)
        if n == 0:
            return {"x": [], "bucket": 0, "series": {}}
        nb = min(n, max_points)
        starts = np.linspace(0, n, nb + 1).astype(np.int64)[:-1]
        counts = np.diff(np.append(starts, n))
        steps = np.frombuffer(self.steps, dtype=np.int64)
        if nb == n:
            x: list = steps.tolist()
        else:
            x = _rounded(np.add.reduceat(steps.astype(np.float64), starts) / counts, 7)
        series = {}
        for name, col in self.cols.items():
            c = np.frombuffer(col, dtype=np.float64)
            ok = np.isfinite(c)
            if not ok.any():
                continue
            if nb == n:
                series[name] = {"y": _rounded(c)}
                continue
            cnt = np.add.reduceat(ok.astype(np.int64), starts)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.add.reduceat(np.where(ok, c, 0.0), starts) / cnt
            masked = np.where(ok, c, np.nan)
            series[name] = {"y": _rounded(mean), "lo": _rounded(np.fmin.reduceat(masked, starts)),
                            "hi": _rounded(np.fmax.reduceat(masked, starts))}
        return {"x": x, "bucket": int(counts.max()), "series": series}

    def flagged_steps(self, name: str, limit: int = 1000) -> list[int]:
        """Steps where column `name` is > 0 (e.g. skipped_step), at most `limit`, evenly thinned."""
        col = self.cols.get(name)
        if col is None:
            return []
        c = np.frombuffer(col, dtype=np.float64)
        hits = np.frombuffer(self.steps, dtype=np.int64)[np.nan_to_num(c) > 0]
        if len(hits) > limit:
            hits = hits[np.linspace(0, len(hits) - 1, limit).astype(np.int64)]
        return hits.tolist()


class _Bins:
    """Step bins whose width doubles (neighbours merge) whenever the steps seen would need more
    than `max_bins` of them: bounded memory for samples arriving all run long."""

    def __init__(self, max_bins: int) -> None:
        self.max_bins = max_bins
        self.width = 1
        self.lo: Optional[int] = None
        self.hi: Optional[int] = None

    def index(self, step: int) -> int:
        self.lo = step if self.lo is None else min(self.lo, step)
        self.hi = step if self.hi is None else max(self.hi, step)
        while self.hi // self.width - self.lo // self.width + 1 > self.max_bins:
            self.width *= 2
            self._merge()
        return step // self.width

    def _merge(self) -> None:
        raise NotImplementedError

    def centers(self, idx: list[int]) -> list[float]:
        # A bin covers [i*w, (i+1)*w); clipped to the steps seen so that a lone bin sits on its data.
        return [max(self.lo, min(self.hi, i * self.width + (self.width - 1) / 2)) for i in idx]


class GpuBins(_Bins):
    """Per GPU (host:index), the mean of each GPU_METRICS value per step bin."""

    def __init__(self, max_bins: int = GPU_BINS) -> None:
        super().__init__(max_bins)
        self.data: dict[str, dict[int, list[float]]] = {}  # gpu -> bin -> [sum, count] * metrics

    def add(self, gpu: str, step: int, values: list[float]) -> None:
        i = self.index(step)
        acc = self.data.setdefault(gpu, {}).get(i)
        if acc is None:
            acc = self.data[gpu][i] = [0.0] * (2 * len(values))
        for j, v in enumerate(values):
            if math.isfinite(v):
                acc[2 * j] += v
                acc[2 * j + 1] += 1

    def _merge(self) -> None:
        for gpu, bins in self.data.items():
            merged: dict[int, list[float]] = {}
            for i, acc in bins.items():
                m = merged.get(i // 2)
                merged[i // 2] = acc if m is None else [a + b for a, b in zip(m, acc)]
            self.data[gpu] = merged

    def payload(self) -> Optional[dict]:
        if not self.data:
            return None
        idx = sorted({i for bins in self.data.values() for i in bins})
        pos = {i: k for k, i in enumerate(idx)}
        gpus = sorted(self.data, key=_natural)
        means = np.full((len(GPU_METRICS), len(gpus), len(idx)), np.nan)
        for g, gpu in enumerate(gpus):
            for i, acc in self.data[gpu].items():
                for m in range(len(GPU_METRICS)):
                    if acc[2 * m + 1]:
                        means[m, g, pos[i]] = acc[2 * m] / acc[2 * m + 1]
        out: dict[str, Any] = {"x": _rounded(self.centers(idx), 7), "gpus": gpus, "metrics": {}}
        per_gpu = len(gpus) <= PER_GPU_LINES
        out["mode"] = "per_gpu" if per_gpu else "aggregate"
        with np.errstate(invalid="ignore"), _quiet_nan_warnings():
            for m, name in enumerate(GPU_METRICS):
                v = means[m]
                if not np.isfinite(v).any():
                    continue
                if per_gpu:
                    out["metrics"][name] = {gpu: _rounded(v[g], 4) for g, gpu in enumerate(gpus)
                                            if np.isfinite(v[g]).any()}
                else:
                    out["metrics"][name] = {"mean": _rounded(np.nanmean(v, axis=0), 4),
                                            "lo": _rounded(np.nanmin(v, axis=0), 4),
                                            "hi": _rounded(np.nanmax(v, axis=0), 4)}
        return out


class RankHeat(_Bins):
    """rank_step_times events: per step bin, each rank's mean step time."""

    def __init__(self, max_bins: int = HEAT_BINS) -> None:
        super().__init__(max_bins)
        self.data: dict[int, list[np.ndarray]] = {}  # bin -> [sum per rank, count per rank]
        self.hosts: list[str] = []

    def add(self, step: int, times: list, hosts: Optional[list]) -> None:
        try:
            t = np.array(times, dtype=np.float64)  # numbers, None and "nan"/"inf" strings
        except (TypeError, ValueError):
            t = np.array([_num(v) for v in times], dtype=np.float64)
        if not len(t):
            return
        if hosts:
            self.hosts = [str(h) for h in hosts]
        i = self.index(step)
        acc = self.data.get(i)
        if acc is None:
            acc = self.data[i] = [np.zeros(len(t)), np.zeros(len(t))]
        elif len(acc[0]) < len(t):  # more ranks than before (an elastic restart)
            acc[0] = np.pad(acc[0], (0, len(t) - len(acc[0])))
            acc[1] = np.pad(acc[1], (0, len(t) - len(acc[1])))
        ok = np.isfinite(t)
        acc[0][: len(t)] += np.where(ok, t, 0.0)
        acc[1][: len(t)] += ok

    def _merge(self) -> None:
        merged: dict[int, list[np.ndarray]] = {}
        for i, (s, c) in self.data.items():
            m = merged.get(i // 2)
            if m is None:
                merged[i // 2] = [s, c]
            else:
                n = max(len(m[0]), len(s))
                merged[i // 2] = [np.pad(m[0], (0, n - len(m[0]))) + np.pad(s, (0, n - len(s))),
                                  np.pad(m[1], (0, n - len(m[1]))) + np.pad(c, (0, n - len(c)))]
        self.data = merged

    def payload(self) -> Optional[dict]:
        if not self.data:
            return None
        idx = sorted(self.data)
        ranks = max(len(self.data[i][0]) for i in idx)
        mean = np.full((ranks, len(idx)), np.nan)
        for k, i in enumerate(idx):
            s, c = self.data[i]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean[: len(s), k] = np.where(c > 0, s / np.maximum(c, 1), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan_warnings():
            ratio = mean / np.nanmedian(mean, axis=0, keepdims=True)
            group = math.ceil(ranks / HEAT_ROWS)
            rows, labels = [], []
            for r0 in range(0, ranks, group):
                r1 = min(ranks, r0 + group)
                worst = np.nanmax(ratio[r0:r1], axis=0)  # the slowest rank of the group shows
                secs = np.nanmax(mean[r0:r1], axis=0)
                rows.append({"ratio": _rounded(worst, 3), "s": _rounded(secs, 4)})
                host = self.hosts[r0] if r0 < len(self.hosts) else ""
                labels.append((f"rank {r0}" if r1 - r0 == 1 else f"ranks {r0}-{r1 - 1}") + (f" ({host})" if host else ""))
        return {"x": _rounded(self.centers(idx), 7), "width": self.width, "ranks": ranks, "labels": labels,
                "rows": rows}


@contextlib.contextmanager
def _quiet_nan_warnings():
    """nanmean/nanmax warn about an all-NaN slice: an empty bin, expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _benign(reason: str) -> bool:
    key = "".join(ch for ch in str(reason).lower() if ch.isalnum())
    return any(b in key for b in BENIGN_THROTTLE)


def _event_message(e: dict) -> str:
    """One line describing an event, for the table and the marker tooltips."""
    k = e.get("event")

    def f(name: str, fmt: str = "{}", default: str = "?") -> str:
        v = e.get(name)
        if v is None:
            return default
        try:
            return fmt.format(_num(v) if fmt != "{}" else v)
        except (ValueError, TypeError):
            return str(v)

    if k == "checkpoint":
        return (f"saved step {f('step')} ({'async' if e.get('async') else 'sync'}): loop blocked "
                f"{f('blocking_s', '{:.3g}')} s, save took {f('total_s', '{:.3g}')} s, {f('attempts', default='1')} "
                f"attempt(s); {f('path', default='')}")
    if k == "checkpoint_failed":
        return f"save of step {f('step')} failed after {f('attempts')} attempt(s): {f('error', default='')}"
    if k == "resume":
        return f"resumed at step {f('step')} from {f('path', default='')}"
    if k == "rollback":
        return (f"rollback: step {f('failed_step')} broke the skip budget; restored step {f('to_step')} "
                f"({f('path', default='')})")
    if k == "stop":
        return (f"stopped at step {f('step')} on {f('signal', default='a signal on another rank')}, exit "
                f"{f('exit_code')}; checkpoint {f('path', default='none')}")
    if k == "hang":
        return (f"hang: rank {f('rank')} ({f('host', default='')}) silent {f('seconds_since_beat', '{:.1f}')} s in "
                f"phase {f('phase')} of step {f('step')}")
    if k == "straggler":
        return (f"straggler: rank {f('rank')} ({f('host', default='')}) at {f('ratio', '{:.2f}')}x the median step "
                f"time over {f('windows')} window(s)")
    if k == "alert":
        return f"{f('kind', default='alert')}: {f('message', default='')}"
    if k == "profile":
        return f"profile {f('kind', default='')} {f('action', default='')} {f('path', default='')}".strip()
    skip = {"event", "step", "time"}
    return ", ".join(f"{a}={b}" for a, b in e.items() if a not in skip)[:300]


def _event_step(e: dict) -> Optional[int]:
    v = e.get("failed_step") if e.get("event") == "rollback" else e.get("step")
    x = _num(v)
    return int(x) if math.isfinite(x) else None


class RunData:
    """Everything the page shows, updated incrementally from RUN_DIR (refresh() reads the bytes
    appended to metrics.jsonl since the last call; a replaced or shrunk file is re-read)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.inode: Optional[int] = None
        self.cols = StepColumns()
        self.events: dict[str, deque] = {}
        self.event_counts: Counter = Counter()
        self.gpu = GpuBins()
        self.heat = RankHeat()
        self.throttle: dict[tuple[str, str], list] = {}  # (gpu, reason) -> [samples, first step, last step]
        self.ecc: dict[str, list] = {}  # gpu -> [max uncorrected, first step seen > 0]
        self.gpu_marks: deque = deque(maxlen=1000)  # (step, what) for the GPU panels
        self.records = 0
        self.bad_lines = 0
        self.first_time: Optional[float] = None

    def refresh(self) -> bool:
        """Read what was appended; True if anything new was read."""
        st = os.stat(self.path)
        if self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset):
            self._reset()
        self.inode = st.st_ino
        if st.st_size == self.offset:
            return False
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a write in progress, or a torn one the next record will cut off
                self.offset += len(line)
                if line.isspace():
                    continue
                try:
                    rec = json.loads(line.decode())  # str: skips json's encoding sniffing of bytes
                except ValueError:  # UnicodeDecodeError included
                    self.bad_lines += 1  # a torn write (read_jsonl skips these too)
                    continue
                if isinstance(rec, dict):
                    self._take(rec)
                else:
                    self.bad_lines += 1
        return True

    def _take(self, rec: dict) -> None:
        kind = rec.get("event")
        if kind is None:
            if isinstance(rec.get("step"), (int, float)) and not isinstance(rec.get("step"), bool):
                self.records += 1
                self.cols.add(rec)
                t = _finite(rec.get("time"))
                if t is not None and self.first_time is None:
                    self.first_time = t
            else:
                self.bad_lines += 1
            return
        kind = str(kind)
        self.event_counts[kind] += 1
        if kind == "gpu":
            self._take_gpu(rec)
            return
        if kind == "rank_step_times":
            step = _finite(rec.get("step"))
            if step is not None and isinstance(rec.get("times_s"), list):
                self.heat.add(int(step), rec["times_s"], rec.get("hosts"))
            return
        if kind == "resume":
            s = _finite(rec.get("step"))
            if s is not None:
                self.cols.truncate_after(int(s))
        elif kind == "rollback":
            s = _finite(rec.get("to_step"))
            if s is not None:
                self.cols.truncate_after(int(s))
        self.events.setdefault(kind, deque(maxlen=MAX_EVENTS)).append(rec)

    def _take_gpu(self, rec: dict) -> None:
        step = _finite(rec.get("step"))
        if step is None or not isinstance(rec.get("gpus"), list):
            return
        step = int(step)
        host = str(rec.get("host") or f"rank{rec.get('rank', '?')}")
        for g in rec["gpus"]:
            if not isinstance(g, dict):
                continue
            gpu = f"{host}:{g.get('index', '?')}"
            self.gpu.add(gpu, step, [_num(g.get(m)) for m in GPU_METRICS])
            for reason in g.get("throttle_reasons") or ():
                if _benign(reason):
                    continue
                t = self.throttle.get((gpu, str(reason)))
                if t is None:
                    self.throttle[(gpu, str(reason))] = [1, step, step]
                    self.gpu_marks.append((step, f"{gpu} throttled: {reason}"))
                else:
                    t[0] += 1
                    t[2] = step
            ecc = _finite(g.get("ecc_uncorrected"))
            if ecc:
                e = self.ecc.get(gpu)
                if e is None:
                    self.ecc[gpu] = [ecc, step]
                    self.gpu_marks.append((step, f"{gpu}: {ecc:g} uncorrected ECC error(s)"))
                elif ecc > e[0]:
                    e[0] = ecc
                    self.gpu_marks.append((step, f"{gpu}: uncorrected ECC errors now {ecc:g}"))

    def _hang_events(self) -> list[dict]:
        """Hangs the watchdog wrote to RUN_DIR/hang/hangs.jsonl (not all reach metrics.jsonl)."""
        path = os.path.join(self.run_dir, "hang", "hangs.jsonl")
        if not os.path.isfile(path):
            return []
        seen = {(e.get("rank"), e.get("step"), e.get("time")) for e in self.events.get("hang", ())}
        return [dict(e, event="hang") for e in read_jsonl(path)
                if isinstance(e, dict) and (e.get("rank"), e.get("step"), e.get("time")) not in seen]

    def payload(self) -> dict:
        """The page's data (JSON-able, finite numbers only, small)."""
        cols = self.cols
        events = [e for q in self.events.values() for e in q] + self._hang_events()
        counts = Counter(self.event_counts)
        hangs = sum(1 for e in events if e.get("event") == "hang")
        if hangs:
            counts["hang"] = hangs
        rows = []
        for e in events:
            rows.append({"kind": str(e.get("event")), "step": _event_step(e), "time": _finite(e.get("time")),
                         "msg": _event_message(e)})
        rows.sort(key=lambda r: (r["step"] if r["step"] is not None else -1, r["time"] or 0))
        markers = [r for r in rows if r["step"] is not None][-2000:]
        ckpt = [e for e in self.events.get("checkpoint", ())]
        blocking = [b for b in (_finite(e.get("blocking_s")) for e in ckpt) if b is not None]
        summary = {
            "records": self.records, "steps": len(cols), "bad_lines": self.bad_lines,
            "step": int(cols.steps[-1]) if len(cols) else None,
            "first_step": int(cols.steps[0]) if len(cols) else None,
            **{k: cols.last(k) for k in ("loss", "loss_text", "loss_speech", "tokens_per_s", "tokens_per_s_per_gpu",
                                         "mfu", "tflops_per_gpu", "step_time_s", "consumed_tokens", "audio_hours",
                                         "lr", "skipped_steps", "loss_spikes", "rollbacks", "nonfatal_errors",
                                         "time")},
            "first_time": self.first_time,
            "checkpoints": len(ckpt), "checkpoint_failures": counts.get("checkpoint_failed", 0),
            "last_checkpoint": _event_step(ckpt[-1]) if ckpt else None,
            "blocking_mean_s": sum(blocking) / len(blocking) if blocking else None,
            "blocking_max_s": max(blocking) if blocking else None,
            "resumes": counts.get("resume", 0),
        }
        gpu = self.gpu.payload()
        if gpu is not None:
            gpu["throttle"] = [{"gpu": g, "reason": r, "samples": v[0], "first": v[1], "last": v[2]}
                               for (g, r), v in sorted(self.throttle.items(), key=lambda kv: _natural(kv[0][0]))]
            gpu["ecc"] = [{"gpu": g, "errors": v[0], "first": v[1]} for g, v in sorted(self.ecc.items())]
            gpu["marks"] = [{"step": s, "msg": m} for s, m in self.gpu_marks]
        config, config_text, config_error = _read_config(self.run_dir)
        out = {
            "run_dir": os.path.abspath(self.run_dir),
            "generated": time.time(),
            "version": f"{time.time_ns():x}",  # the live page sends it back: unchanged data are not resent
            "summary": summary,
            "nonfinite": dict(cols.nonfinite),
            "steps": cols.downsampled(),
            "skipped": cols.flagged_steps("skipped_step"),
            "events": rows[-TABLE_ROWS:][::-1],
            "event_counts": dict(counts),
            "markers": markers,
            "gpu": gpu,
            "heat": self.heat.payload(),
            "config": config, "config_text": config_text, "config_error": config_error,
            "exits": _read_exits(self.run_dir),
            "samples": _read_samples(self.run_dir),
        }
        return _clean(out)


def _clean(v: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN), recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _read_config(run_dir: str) -> tuple[Optional[list], Optional[str], Optional[str]]:
    """(selected [key, value] pairs, full text, error) of RUN_DIR/config.yaml."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None, None, None
    try:
        with open(path, errors="replace") as f:
            text = f.read(200_000)
        import yaml

        tree = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 -- any unreadable config is shown, never fatal
        return None, None, f"{path}: {e}"
    pairs = []
    for key in CONFIG_KEYS:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            pairs.append([key, json.dumps(node) if isinstance(node, (list, dict)) else str(node)])
    return pairs, text, None


def _read_samples(run_dir: str) -> dict:
    """RUN_DIR/samples/step_X/ (megatron_tts.generate.samples): the newest finished steps, their
    wavs and spectrograms embedded as data URIs (the page stays self-contained), and failures."""
    import base64

    root = os.path.join(run_dir, "samples")
    out: dict = {"steps": [], "failures": read_jsonl(os.path.join(root, "failures.jsonl"))
                 if os.path.isfile(os.path.join(root, "failures.jsonl")) else []}
    if not os.path.isdir(root):
        return out
    done = sorted((d for d in os.listdir(root) if d.startswith("step_") and
                   os.path.isfile(os.path.join(root, d, "samples.json"))), key=_natural)
    for d in done[-SAMPLE_STEPS:][::-1]:
        try:
            with open(os.path.join(root, d, "samples.json")) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            continue
        prompts = []
        for p in summary.get("prompts", []):
            item = {k: p.get(k) for k in ("index", "text", "seconds", "frames", "stop")}
            for ext, mime in (("wav", "audio/wav"), ("png", "image/png")):
                path = os.path.join(root, d, f"{p.get('index')}.{ext}")
                if os.path.isfile(path) and os.path.getsize(path) <= SAMPLE_BYTES:
                    with open(path, "rb") as f:
                        item[ext] = f"data:{mime};base64," + base64.b64encode(f.read()).decode()
                else:
                    item[ext] = None
            prompts.append(item)
        out["steps"].append({"step": int(d[5:]), "checkpoint": summary.get("checkpoint"),
                             "seconds": summary.get("seconds"), "prompts": prompts})
    return out


def _read_exits(run_dir: str) -> list[dict]:
    d = os.path.join(run_dir, "exit")
    out = []
    if not os.path.isdir(d):
        return out
    for name in sorted(os.listdir(d)):
        if name.startswith("rank_") and name.endswith(".json"):
            try:
                with open(os.path.join(d, name)) as f:
                    rec = json.loads(f.read())
            except (OSError, ValueError) as e:
                rec = {"file": name, "reason": f"unreadable: {e}"}
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _asset(name: str) -> str:
    path = os.path.join(ASSETS, name)
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise DashboardError(f"missing dashboard asset {path} ({e.strerror}): reinstall megatron-tts "
                             f"(monitoring/dashboard_assets must be installed with the package)") from e


def _script_json(obj: Any) -> str:
    # "<" escaped so that no string in the data (an error message, a path) can close the script.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def render_html(payload: dict, live_interval_s: Optional[float] = None) -> str:
    title = f"megatron-tts: {os.path.basename(payload['run_dir'].rstrip('/')) or payload['run_dir']}"
    live = {"interval_s": live_interval_s} if live_interval_s else None
    title_html = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title_html}</title>\n<style>\n{_asset('dashboard.css')}</style></head>\n"
        "<body><pre id=\"js-errors\" hidden></pre>\n"
        "<script>\n"
        # Installed first so that any later failure, even a syntax error in the script below, shows.
        "window.onerror = function (msg, src, line, col) {\n"
        "  var el = document.getElementById('js-errors'); el.hidden = false;\n"
        "  el.textContent += 'JS error: ' + msg + ' (line ' + line + ':' + col + ')\\n';\n"
        "  document.body.setAttribute('data-js-errors', el.textContent.split('\\n').length - 1);\n"
        "};\n</script>\n"
        "<div id=\"app\"></div>\n"
        f"<script id=\"dash-data\" type=\"application/json\">{_script_json(payload)}</script>\n"
        f"<script id=\"dash-live\" type=\"application/json\">{_script_json(live)}</script>\n"
        f"<script>\n{_asset('dashboard.js')}</script>\n"
        "</body></html>\n"
    )


def check_run_dir(run_dir: str) -> str:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise DashboardError(f"run directory {run_dir} does not exist; pass the train.run_dir of a run "
                             f"(started with: torchrun ... -m launch.pretrain --config CONFIG train.run_dir=DIR)")
    if not os.path.isfile(path):
        raise DashboardError(f"no metrics.jsonl in {run_dir}: not a run directory, or its run has not logged a "
                             f"step yet; start one with: torchrun ... -m launch.pretrain --config CONFIG "
                             f"train.run_dir={run_dir}")
    return path


def build(run_dir: str, out: Optional[str] = None) -> tuple[str, dict]:
    """Write the page; returns (its path, facts: records, steps, bytes, seconds, cpu_s, bad_lines)."""
    check_run_dir(run_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    data = RunData(run_dir)
    data.refresh()
    html = render_html(data.payload())
    out = out or os.path.join(run_dir, "dashboard.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(html)
    os.replace(tmp, out)  # a browser reloading the page never sees half of it
    return out, {"records": data.records, "steps": len(data.cols), "bytes": len(html.encode()),
                 "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "bad_lines": data.bad_lines}


class _LiveState:
    """The live server's RunData and its last payload, rebuilt only when a source file changed."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.lock = threading.Lock()
        self.data = RunData(run_dir)
        self.signature: Any = None
        self.json = b""
        self.payload: dict = {}

    def _side_signature(self) -> tuple:
        sig = []
        for rel in ("config.yaml", "exit", os.path.join("hang", "hangs.jsonl")):
            p = os.path.join(self.run_dir, rel)
            try:
                st = os.stat(p)
                sig.append((rel, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((rel, None))
        d = os.path.join(self.run_dir, "exit")
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                try:
                    sig.append((name, os.stat(os.path.join(d, name)).st_mtime_ns))
                except OSError:
                    pass
        return tuple(sig)

    def current(self) -> tuple[bytes, dict]:
        with self.lock:
            changed = self.data.refresh()
            sig = self._side_signature()
            if changed or sig != self.signature or not self.json:
                self.signature = sig
                self.payload = self.data.payload()
                self.json = _script_json(self.payload).encode()
            return self.json, self.payload


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8765, refresh_s: float = 5.0) -> int:
    check_run_dir(run_dir)
    state = _LiveState(run_dir)
    state.current()  # read the file once before accepting connections: the first page is fast

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- http.server's name
            route = self.path.split("?", 1)[0]
            try:
                if route in ("/", "/index.html", "/dashboard.html"):
                    body = render_html(state.current()[1], live_interval_s=refresh_s).encode()
                    ctype = "text/html; charset=utf-8"
                elif route == "/data.json":
                    body, payload = state.current()
                    have = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("have", [""])[0]
                    if have == payload["version"]:  # the page is up to date: spare it megabytes per poll
                        self.send_response(204)
                        self.send_header("Cache-Control", "no-store")
                        self.end_headers()
                        return
                    ctype = "application/json"
                else:
                    self.send_error(404, "the dashboard serves / and /data.json")
                    return
            except FileNotFoundError as e:
                self.send_error(503, f"{e.filename} is gone")
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            pass  # one line per poll every few seconds would drown the console

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise DashboardError(f"port {port} on {host} is already in use (another dashboard?); choose another "
                                 f"with --port P, or --port 0 for any free one") from e
        raise DashboardError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, _interrupt)  # stopped by a job's end or `kill`: same clean exit as Ctrl-C
    bound = server.server_address[1]
    print(f"serving {os.path.abspath(run_dir)} on http://{host}:{bound}/ (refreshes every {refresh_s:g} s; "
          f"Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitoring.dashboard", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (train.run_dir): holds metrics.jsonl")
    p.add_argument("--out", help="where to write the page (default RUN_DIR/dashboard.html)")
    p.add_argument("--serve", action="store_true", help="serve the page live instead of writing it")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind with --serve (default 127.0.0.1: reach it through an ssh tunnel)")
    p.add_argument("--port", type=int, default=8765, help="port for --serve (default 8765; 0: any free port)")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between the live page's updates")
    args = p.parse_args(argv)
    try:
        if args.serve:
            return serve(args.run_dir, args.host, args.port, args.refresh)
        path, facts = build(args.run_dir, args.out)
    except DashboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.run_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    skipped = f", {facts['bad_lines']} unreadable lines skipped" if facts["bad_lines"] else ""
    print(f"wrote {path} ({facts['bytes'] / 1e6:.2f} MB; {facts['steps']} steps from {facts['records']} step "
          f"records{skipped}; {facts['seconds']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
