"""The start-up sweep of train.micro_batch_size=auto and parallel.ddp.bucket_size=auto on the
tiny recipe (megatron_tts/autotune.py), through the real entry point (torchrun, gloo on CPU;
NCCL on a GPU machine), printed as a table of every candidate and the pick.

    .venv/bin/python bench/autotune_sweep.py [--nproc 2] [--mbs 1,2,4] [--buckets 100000,1000000,40000000]
                                              [--steps 3] [overrides ...]

The run trains one step after the sweep; the table comes from RUN_DIR/autotune.json. Exits
non-zero (with the run's output) when the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, spec)


def table(saved: dict) -> str:
    rows = ["| micro-batch | bucket (elements) | step s (median, max over ranks) | tokens/s | peak GiB | allowed GiB "
            "| status |", "|---|---|---|---|---|---|---|"]
    for m in saved["candidates"]:
        c = m["candidate"]
        mark = " **(pick)**" if c == saved["choice"] else ""
        rows.append(f"| {c['micro_batch_size']} | {c['bucket_size'] or '-'} | {_fmt(m['step_time_s'], '.3f')} | "
                    f"{_fmt(m['tokens_per_s'], ',.0f')} | {_fmt(m['peak_memory_bytes'], '.2f', 2**30)} | "
                    f"{_fmt(m['memory_limit_bytes'], '.2f', 2**30)} | {m['status']}{mark} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--mbs", default="1,2,4")
    p.add_argument("--buckets", default="100000,1000000,40000000")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.nproc),
               "--log-dir", os.path.join(run_dir, "tr"), "-m", "launch.pretrain", "--config", "configs/tiny.yaml",
               f"train.run_dir={run_dir}", "train.steps=1", "checkpoint.interval=1000", "logging.console=false",
               "train.micro_batch_size=auto", "parallel.ddp.overlap_grad_reduce=true", "parallel.ddp.bucket_size=auto",
               f"autotune.micro_batch_sizes=[{a.mbs}]", f"autotune.bucket_sizes=[{a.buckets}]",
               f"autotune.steps={a.steps}", f"autotune.warmup_steps={a.warmup}", *a.overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-4000:])
            return r.returncode or 1
        with open(os.path.join(run_dir, "autotune.json")) as f:
            saved = json.load(f)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"{time.strftime('%Y-%m-%d', time.gmtime())}, {platform.node()}, {device}, nproc={a.nproc}, "
          f"{a.warmup}+{a.steps} steps per candidate; sweep {saved['elapsed_s']:.1f} s, whole run {wall:.1f} s, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(table(saved))
    print(f"\npick: {saved['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
