"""The training loop's one handle on monitoring and profiling (docs/monitoring.md).

    monitor.step_begin(step)                 # profiling windows and triggers, NVTX step range
    with monitor.phase("data"): ...          # timer + NVTX range (+ a torch.profiler label)
    with monitor.span("stats_sync"): ...     # a wait inside a phase (CUDA events on GPU)
    fields = monitor.step_end(step, tokens, step_time, logged)   # every rank, every step
    monitor.alert(kind, message, step)       # (logging rank) ALERT line, event, hooks

Every rank times its phases and joins the straggler all_gather every
monitoring.straggler_interval steps (the only collective here); the logging rank also owns the
alerts, the stall and throughput watches and the GPU stats thread. Nothing here adds a host
sync to a step (timers.py explains how the timings stay honest on GPU).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any, Callable, Optional

import psutil
import torch
import torch.distributed as dist

from monitoring import flops
from monitoring.alerts import Alerts, StallWatch, ThroughputWatch
from monitoring.gpu_stats import GpuStats
from monitoring.profiling import Profiler
from monitoring.straggler import BusyWindow, StragglerDetector, summary
from monitoring.timers import PhaseTimers

log = logging.getLogger(__name__)

STEP_PHASES = ("data", "forward_backward", "grad_sync", "optimizer")
TAIL_PHASES = ("checkpoint", "logging")  # run after a step's record is written: reported in the next one
WAITS = ("grad_sync", "stats_sync")  # time spent waiting for peers: not a rank's own work


class Monitor:
    def __init__(self, cfg, layout, run_dir: str, metrics=None, *, dtype: str, vocab_size: int,
                 profile_requests: Callable[[], int] = lambda: 0) -> None:
        """cfg: the run's config tree (its monitoring, alerts, profiling, train and data sections are
        read); dtype: 'bf16' or 'fp32' as resolved; vocab_size: the padded vocabulary (MFU);
        profile_requests: a counter of SIGUSR2 profile requests."""
        m = cfg.monitoring
        self.cfg = cfg
        self.layout = layout
        self.metrics = metrics  # MetricsLogger on the logging rank, else None
        self.cuda = torch.cuda.is_available()
        self.world = layout.world_size
        self.straggler_every = m.straggler_interval if self.world > 1 else 0
        # the straggler rule needs the waits (grad_sync, stats_sync) even without phase_s
        self.timers = PhaseTimers(enabled=m.phase_timers or self.straggler_every > 0, nvtx=m.nvtx, cuda=self.cuda)
        emit = metrics.event if metrics is not None else None
        self.profiler = Profiler(cfg.profiling, layout.rank, run_dir, emit, self.cuda, profile_requests)
        self.profiler.on_change = self._label_phases

        self.flops_per_step = (flops.model_flops_per_token(cfg.model.transformer, cfg.data.seq_len, vocab_size) *
                               cfg.train.global_batch_size * cfg.data.seq_len)
        device_name = torch.cuda.get_device_name() if self.cuda else None
        self.peak_tflops = flops.peak_tflops(device_name, dtype, m.peak_tflops)
        if layout.rank == 0:
            log.info("MFU: %.3g GFLOP per token (docs/monitoring.md); peak %s", self.flops_per_step / 1e9 /
                     (cfg.train.global_batch_size * cfg.data.seq_len),
                     f"{self.peak_tflops:g} TFLOP/s per GPU" if self.peak_tflops else
                     "unknown (MFU null; set monitoring.peak_tflops)")

        self.busy = BusyWindow()
        self.detector = StragglerDetector(m.straggler_ratio, m.straggler_windows)
        self.host = socket.gethostname()
        self.hosts = self._gather_hosts() if self.straggler_every else None

        self.alerts = self.stall = self.throughput = self.gpu = None
        if metrics is not None:
            a = cfg.alerts
            if a.enabled:
                self.alerts = Alerts(a, emit)
                self.stall = StallWatch(a.stall_s, lambda msg, step: self.alert("stall", msg, step)).start()
                self.throughput = ThroughputWatch(a.throughput_drop, a.throughput_window, a.throughput_recent)
            if m.gpu_stats:
                gpu = GpuStats(m.gpu_stats_interval_s)
                self.gpu = gpu if gpu.start() else None
        self._step_range_open = False
        self._last_step = 0
        self._process = psutil.Process()

    # ---- phases ----
    def phase(self, name: str):
        if self.stall is not None:
            self.stall.phase = name
            if name == "checkpoint":
                return self._checkpoint_phase()
        return self.timers.phase(name)

    @contextlib.contextmanager
    def _checkpoint_phase(self):
        self.stall.pause(True)  # a long save or a rollback's load is not a stall
        try:
            with self.timers.phase("checkpoint"):
                yield
        finally:
            self.stall.pause(False)

    def span(self, name: str):
        return self.timers.span(name)

    def wrap_grad_sync(self, finalize: Callable) -> Callable:
        """Time megatron's finalize_model_grads (the DP gradient all-reduce with
        overlap_grad_reduce off; its exposed tail with it on) as the grad_sync span."""

        def finalize_model_grads(*args, **kwargs):
            with self.timers.span("grad_sync"):
                return finalize(*args, **kwargs)

        return finalize_model_grads

    def _label_phases(self, record_function: Optional[Callable]) -> None:
        self.timers.annotate = record_function

    # ---- steps ----
    def step_begin(self, step: int) -> None:
        self.profiler.step_begin(step)
        if self.timers.nvtx:
            if self._step_range_open:  # a rollback skipped step_end
                torch.cuda.nvtx.range_pop()
            torch.cuda.nvtx.range_push(f"step {step}")
            self._step_range_open = True

    def step_end(self, step: int, tokens: int, step_time: float, logged: bool) -> dict[str, Any]:
        """After a completed step, on every rank. Returns the record's monitoring fields when
        `logged` (and {} otherwise)."""
        self._last_step = step
        t = self.timers.take(STEP_PHASES + ("stats_sync",))
        waits = sum(t[w] or 0.0 for w in WAITS)
        self.busy.add(step_time, waits)
        if self.straggler_every and step % self.straggler_every == 0:
            self._straggler_window(step)
        tokens_per_s = tokens / step_time
        if self.stall is not None:
            self.stall.progress(step, step_time)
        if self.throughput is not None:
            drop = self.throughput.update(tokens_per_s)
            if drop:
                self.alert("throughput_drop", f"step {step}: {drop}", step)
        if self.gpu is not None:
            gpus = self.gpu.take()
            if gpus is not None:
                self._emit({"event": "gpu", "step": step, "rank": self.layout.rank, "host": self.host, "gpus": gpus})
        if self._step_range_open:
            torch.cuda.nvtx.range_pop()
            self._step_range_open = False
        if not logged:
            return {}
        tflops = self.flops_per_step / step_time / self.world / 1e12
        return {
            "phase_s": self._phase_s(t) if self.cfg.monitoring.phase_timers else None,
            "tokens_per_s_per_gpu": tokens_per_s / self.world,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "mem": self._memory() if self.cfg.monitoring.memory else None,
        }

    def _phase_s(self, t: dict) -> dict:
        tail = self.timers.take(TAIL_PHASES)
        fb = t["forward_backward"]
        if fb is not None and t["grad_sync"] is not None:
            fb = max(fb - t["grad_sync"], 0.0)  # disjoint phases: grad_sync runs inside forward_backward
        return {"data": t["data"], "forward_backward": fb, "grad_sync": t["grad_sync"], "optimizer": t["optimizer"],
                "checkpoint": tail["checkpoint"] or 0.0, "logging": tail["logging"]}

    def _memory(self) -> dict:
        gb = 1024 ** 3
        mem = {"allocated_gb": None, "reserved_gb": None, "peak_gb": None,
               "rss_gb": self._process.memory_info().rss / gb}
        if self.cuda:  # the caching allocator's counters: host-side, no sync
            mem.update(allocated_gb=torch.cuda.memory_allocated() / gb, reserved_gb=torch.cuda.memory_reserved() / gb,
                       peak_gb=torch.cuda.max_memory_allocated() / gb)
        return mem

    # ---- straggler ----
    def _gather_hosts(self) -> list[str]:
        hosts: list[Any] = [None] * self.world
        dist.all_gather_object(hosts, self.host)
        return hosts

    def _straggler_window(self, step: int) -> None:
        mine = torch.tensor([self.busy.take()], dtype=torch.float64, device=self.layout.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)  # every straggler_interval steps: one small collective + sync
        times = torch.cat(parts).cpu().tolist()
        if self.metrics is None:
            return
        s = summary(times)
        if s is None:
            return
        self._emit({"event": "rank_step_times", "step": step, "times_s": times, "hosts": self.hosts, **s})
        for f in self.detector.update(times):
            host = self.hosts[f.rank]
            self._emit({"event": "straggler", "step": step, "rank": f.rank, "host": host, "ratio": f.ratio,
                        "windows": f.windows})
            if f.new:
                self.alert("straggler", f"rank {f.rank} on {host} is {f.ratio:.2f}x the median busy step time "
                           f"({times[f.rank]:.3f} s vs {s['median']:.3f} s) for {f.windows} windows of "
                           f"{self.straggler_every} steps", step)

    # ---- alerts ----
    def alert(self, kind: str, message: str, step: Optional[int]) -> None:
        """An alert from the loop or a watch; only the logging rank raises them (others: no-op)."""
        if self.alerts is not None:
            self.alerts.alert(kind, message, step)

    def on_verdict(self, step: int, verdict, counters: dict) -> None:
        """The step guard's decision (identical on every rank): skipped steps and rollbacks alert."""
        if verdict.apply:
            return
        what = (f"step {step} skipped ({verdict.reason}); skipped_steps={counters['skipped_steps']}, "
                f"rollbacks={counters['rollbacks']}")
        if verdict.fatal:
            what += "; the skip budget ran out again after the allowed rollbacks: exiting (fatal)"
        elif verdict.rollback:
            what += "; the skip budget ran out: rolling back to the last committed checkpoint"
        self.alert("nonfinite" if verdict.reason == "nonfinite" else "skips", what, step)

    def on_checkpoint_event(self, record: dict) -> None:
        """The checkpointer's events go to metrics.jsonl; a failed save also alerts."""
        self._emit(record)
        if record.get("event") == "checkpoint_failed":
            self.alert("checkpoint_failed", f"checkpoint save at step {record.get('step')} failed: "
                       f"{record.get('error')}; training continues", record.get("step"))

    def _emit(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.event(record)

    def close(self) -> None:
        self.profiler.close(self._last_step)
        if self.stall is not None:
            self.stall.stop()
        if self.gpu is not None:
            self.gpu.stop()
        if self.alerts is not None:
            self.alerts.close()  # lets queued alert hooks finish (bounded by alerts.timeout_s)
