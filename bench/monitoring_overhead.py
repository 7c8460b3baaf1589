"""Monitoring overhead: steps/s with everything on vs everything off, side by side in one job.

One torchrun job (2 processes, gloo, DP=2) builds the tiny recipe once, then alternates
segments of the real training loop (megatron_tts.train.loop._loop) with two monitors swapped in:

    on   phase timers, NVTX, memory, GPU stats thread, straggler all_gather every N steps,
         alerts (stall thread, throughput watch, a command hook), wandb offline, TensorBoard
    off  all of those disabled (metrics.jsonl is always written: it is the source of truth)

in short segments, in the order on/off, off/on, on/off, ... so that drift on a shared machine
hits both alike. Two measures per segment:

- wall: steps/s = 1 / the median wall time between consecutive step records (robust to a
  hiccup); overhead = 1 - median(on) / median(off). On a shared, oversubscribed machine this
  carries the other jobs' noise.
- CPU: CPU seconds per step of every training process (all threads) plus their children (the
  wandb-core service, alert hooks); overhead = median(on) / median(off) - 1. The step is
  CPU-bound here, so this is the cost in compute, and other jobs' load barely moves it.

On a CPU machine NVTX and the GPU stats thread are no-ops (no CUDA, no NVML).

    .venv/bin/python bench/monitoring_overhead.py [--reps 20] [--steps 8] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

OFF = ["monitoring.phase_timers=false", "monitoring.nvtx=false", "monitoring.memory=false",
       "monitoring.gpu_stats=false", "monitoring.straggler_interval=0", "alerts.enabled=false"]


def on_overrides(straggler_every: int) -> list[str]:
    return ["logging.wandb=true", "logging.wandb_mode=offline", "logging.tensorboard=true",
            f"monitoring.straggler_interval={straggler_every}", "monitoring.gpu_stats_interval_s=1",
            "alerts.command=/bin/true"]


def step_times(path: str, last: int) -> list[float]:
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    t = [r["time"] for r in recs if "loss" in r][-last:]
    return [b - a for a, b in zip(t, t[1:])]


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its children, alive or reaped."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def worker(a: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from megatron_tts import signals
    from megatron_tts.config import load_config
    from megatron_tts.parallel import destroy_distributed
    from megatron_tts.compat.mcore import finalize_model_grads
    from megatron_tts.config import padded_vocab_size, resolve_dtype
    from megatron_tts.train.build import build_run
    from megatron_tts.train.loop import _loop
    from monitoring.metrics import MetricsLogger
    from monitoring.monitor import Monitor

    base = ["train.resume=never", "train.steps=1000000", "checkpoint.interval=1000000", "checkpoint.keep_last=1",
            "logging.interval=1", "logging.console=false", *a.overrides]
    cfg_on = load_config("configs/tiny.yaml",
                         base + [f"train.run_dir={a.run_dir}/on"] + on_overrides(a.straggler_every))
    cfg_off = load_config("configs/tiny.yaml", base + [f"train.run_dir={a.run_dir}/off"] + OFF)

    signals.install()
    with signals.helpers_shielded():
        run = build_run(cfg_on)  # the "on" monitor and sinks; the model, loader and optimizer are shared
    tcfg = run.cfg.model.transformer
    logging_rank = run.metrics is not None
    metrics_off = MetricsLogger(cfg_off.train.run_dir, console=False) if logging_rank else None
    variants = {
        "on": (run.monitor, run.metrics, tcfg.finalize_model_grads_func),
        "off": (Monitor(cfg_off, run.layout, cfg_off.train.run_dir, metrics_off, dtype=resolve_dtype(cfg_off),
                        vocab_size=padded_vocab_size(cfg_off), profile_requests=signals.profile_requests),
                metrics_off, finalize_model_grads),
    }
    rates: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for rep in range(a.reps):
            for name in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                run.monitor, run.metrics, tcfg.finalize_model_grads_func = variants[name]
                run.cfg.train.stop_after = a.steps
                c0 = cpu_seconds()
                _loop(run)
                used = torch.tensor([cpu_seconds() - c0], dtype=torch.float64)
                dist.all_reduce(used)  # every rank's CPU: the straggler gather and sinks cost all of them
                cpu[name].append(used.item() / a.steps)
                if logging_rank:
                    dt = step_times(os.path.join(a.run_dir, name, "metrics.jsonl"), a.steps)
                    rates[name].append(1.0 / statistics.median(dt))
    finally:
        for mon, metrics, _ in variants.values():
            mon.close()
            if metrics is not None:
                metrics.close()
        run.checkpointer.close()
        run.loader.close()
        destroy_distributed()
    if logging_rank:
        with open(os.path.join(a.run_dir, "rates.json"), "w") as f:
            json.dump({"rates": rates, "cpu": cpu}, f)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20, help="on/off segment pairs")
    p.add_argument("--steps", type=int, default=8, help="steps per segment")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--straggler-every", type=int, default=10, help="monitoring.straggler_interval when on")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of configs/tiny.yaml")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
               "--log-dir", os.path.join(run_dir, "tr"), os.path.abspath(__file__), "--worker",
               "--run-dir", run_dir, "--reps", str(a.reps), "--steps", str(a.steps),
               "--straggler-every", str(a.straggler_every), *a.overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        t0 = time.time()
        load0 = os.getloadavg()[0]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-6000:], file=sys.stderr)
            print(f"error: the benchmark job failed (exit {r.returncode})", file=sys.stderr)
            return r.returncode or 1
        with open(os.path.join(run_dir, "rates.json")) as f:
            got = json.load(f)
    med = statistics.median
    on, off = got["rates"]["on"], got["rates"]["off"]
    con, coff = got["cpu"]["on"], got["cpu"]["off"]
    print(f"configs/tiny.yaml {' '.join(a.overrides)} on {a.nproc} processes (gloo), {a.reps} x {a.steps} steps "
          f"per variant, {time.time() - t0:.0f} s; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'segment':>8}{'on steps/s':>12}{'off steps/s':>13}{'on/off':>9}{'on CPU s/step':>15}"
          f"{'off CPU s/step':>16}")
    for i, (x, y, cx, cy) in enumerate(zip(on, off, con, coff)):
        print(f"{i + 1:>8}{x:12.3f}{y:13.3f}{x / y:9.3f}{cx:15.4f}{cy:16.4f}")
    pairs = [x / y for x, y in zip(on, off)]
    print(f"{'median':>8}{med(on):12.3f}{med(off):13.3f}{med(pairs):9.3f}{med(con):15.4f}{med(coff):16.4f}")
    wall = med(on) / med(off)
    print(f"wall: steps/s on/off = {wall:.4f} -> overhead {(1 - wall) * 100:+.2f}% (target <= 2%)")
    print(f"CPU:  CPU s/step on/off = {med(con) / med(coff):.4f} -> overhead {(med(con) / med(coff) - 1) * 100:+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
