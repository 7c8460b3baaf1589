"""Step-time breakdown of the tiny recipe on CPU: data wait vs compute.

Runs the real entry point (torchrun, gloo, TP=2 by default) for a few dozen steps and reads
metrics.jsonl: `data_wait_s` is the time the step loop waited for the loader's next batch
(the prefetch thread builds it in the background), the rest of `step_time_s` is
forward/backward/optimizer/communication.

    .venv/bin/python bench/tiny_cpu_breakdown.py [--steps 40] [--nproc 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from monitoring.metrics import read_jsonl  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the statistics")
    p.add_argument("overrides", nargs="*", default=["parallel.tp=2"])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
               "--log-dir", os.path.join(run_dir, "tr"), "-m", "launch.pretrain", "--config",
               "configs/tiny.yaml", f"train.run_dir={run_dir}", f"train.steps={a.steps}",
               "logging.interval=1", "logging.console=false", f"checkpoint.interval={a.steps * 10}",
               *a.overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-4000:])
            return r.returncode
        recs = [x for x in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in x]
    recs = recs[a.warmup:]
    step = [x["step_time_s"] for x in recs]
    data = [x["data_wait_s"] for x in recs]
    comp = [s - d for s, d in zip(step, data)]
    tok = [x["tokens_per_s"] for x in recs]
    med = statistics.median
    print(f"tiny on CPU, {a.nproc} processes ({' '.join(a.overrides)}), {len(recs)} steps after {a.warmup} warm-up")
    print(f"{'':18}{'median':>10}{'mean':>10}")
    print(f"{'step time (ms)':18}{med(step) * 1e3:10.1f}{statistics.mean(step) * 1e3:10.1f}")
    print(f"{'data wait (ms)':18}{med(data) * 1e3:10.1f}{statistics.mean(data) * 1e3:10.1f}")
    print(f"{'compute (ms)':18}{med(comp) * 1e3:10.1f}{statistics.mean(comp) * 1e3:10.1f}")
    print(f"{'data wait share':18}{sum(data) / sum(step) * 100:9.1f}%")
    print(f"{'tokens/s':18}{med(tok):10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
