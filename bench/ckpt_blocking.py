"""How long checkpoint saves block the training loop: sync vs async (checkpoint.async_save).

Runs the real entry point twice (same model, data, steps and save interval), once per mode, and
reads the `checkpoint` events of metrics.jsonl: `blocking_s` is the time the step loop spent in
save() and in the poll()/wait() that committed it; `total_s` runs from save() to the commit.

    .venv/bin/python bench/ckpt_blocking.py [--steps 24] [--interval 4] [--nproc 1] [overrides ...]

The first save of each run is left out (one-time set-up: plan validation, the writer queue).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from monitoring.metrics import read_jsonl  # noqa: E402

# ~17M parameters: a 210 MB checkpoint with the Adam moments
DEFAULT = ["model.transformer.num_layers=8", "model.transformer.hidden_size=384",
           "model.transformer.ffn_hidden_size=1152", "model.transformer.num_attention_heads=6",
           "model.transformer.num_query_groups=2", "data.seq_len=256", "train.micro_batch_size=1",
           "train.global_batch_size=4", "data.num_workers=1"]


def run(mode_async: bool, a, run_dir: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "--log-dir",
           os.path.join(run_dir, "tr"), "-m", "launch.pretrain", "--config", "configs/tiny.yaml",
           f"train.run_dir={run_dir}", f"train.steps={a.steps}", f"checkpoint.interval={a.interval}",
           "checkpoint.keep_last=2", f"checkpoint.async_save={str(mode_async).lower()}", "logging.interval=1",
           "logging.console=false", *(a.overrides or DEFAULT)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stdout[-2000:] + r.stderr[-3000:])
    recs = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    saves = [e for e in recs if e.get("event") == "checkpoint"][1:]
    steps = [e["step_time_s"] for e in recs if "loss" in e][2:]
    ledger = [json.loads(line) for line in open(os.path.join(run_dir, "checkpoints", "COMMITS.jsonl"))]
    return {"blocking": [e["blocking_s"] for e in saves], "total": [e["total_s"] for e in saves],
            "step": statistics.median(steps), "mb": ledger[-1]["bytes"] / 1e6}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {m: run(m, a, os.path.join(tmp, "async" if m else "sync")) for m in (False, True)}
    s, y = res[False], res[True]
    print(f"checkpoint {s['mb']:.0f} MB, median step {s['step']:.3f} s (sync run) / {y['step']:.3f} s (async run), "
          f"{len(s['blocking'])} saves each after the first")
    for name, r in (("sync", s), ("async", y)):
        print(f"  {name:5s}: loop blocked median {statistics.median(r['blocking']):.3f} s "
              f"(max {max(r['blocking']):.3f}); save to commit median {statistics.median(r['total']):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
