"""Restart cost of a requeue-stop on CPU: from the signal (or the hang) to the first step after
resume, and what was lost. Real processes, the SMALL test model, torchrun with 2 workers (DP=2).

Trials:
  sigterm-agent   SIGTERM to the torchrun agent (what scancel / a preemption does); it forwards
                  SIGTERM to every worker
  sigterm-worker  SIGTERM to one worker only (the others learn it through the step's all-reduce)
  sigusr1         SIGUSR1 to every worker
  sigusr1-agent   SIGUSR1 to a torchrun started with --signals-to-handle ...,SIGUSR1 (forwards it)
  hang            MEGATRON_TTS_FAULT=hang:rank=1:step=S, watchdog.min_timeout_s=5, exit_grace_s=3;
                  periodic checkpoint every 2 steps (a hang cannot save)

Each trial: run -> wait for step >= 3 -> fault -> all workers exit -> relaunch with
train.resume=auto -> first new step record in metrics.jsonl. Reported: stop (fault -> last
worker exited), restart (exit -> first step after resume), total, the stop/resume steps, exit
codes, and whether every step's loss matches an uninterrupted reference run bit for bit.

    .venv/bin/python bench/signal_restart.py [--trials 3] [--kinds sigterm-agent,hang]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_tts.exit_codes import read_exit_records  # noqa: E402
from megatron_tts.watchdog import read_hangs  # noqa: E402
from tests.helpers import (SMALL, finish, kill_tree, pretrain, start_pretrain, wait_for_step,  # noqa: E402
                           workers)

STEPS = 10
BASE = SMALL + [f"train.steps={STEPS}", "checkpoint.keep_last=20", "logging.console=false"]


def trial(kind: str, run_dir: str) -> dict:
    extra_env, overrides = {}, ["checkpoint.interval=100"]
    if kind == "hang":
        extra_env = {"MEGATRON_TTS_FAULT": "hang:rank=1:step=4"}
        overrides = ["checkpoint.interval=2", "watchdog.min_timeout_s=5", "watchdog.k=3",
                     "watchdog.exit_grace_s=3"]
    targs = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1") if kind == "sigusr1-agent" else ()
    p = start_pretrain(run_dir, BASE + overrides, nproc=2, extra_env=extra_env, torchrun_args=targs)
    try:
        procs = workers(p, 2)
        wait_for_step(run_dir, 3, p)
        t_fault = time.time()
        if kind == "sigterm-agent":
            p.send_signal(signal.SIGTERM)
        elif kind == "sigterm-worker":
            procs[1].send_signal(signal.SIGTERM)
        elif kind == "sigusr1-agent":
            p.send_signal(signal.SIGUSR1)
        elif kind == "sigusr1":
            for w in procs.values():
                w.send_signal(signal.SIGUSR1)
        for w in procs.values():
            w.wait(timeout=120)
        t_exit = time.time()
        first = finish(p, run_dir)
    finally:
        kill_tree(p.pid)
    codes = {r: rec["code"] for r, rec in read_exit_records(run_dir).items()}
    last_logged = max(first.losses())
    p2 = start_pretrain(run_dir, BASE + overrides + ["train.resume=auto"], nproc=2)
    try:
        wait_for_step(run_dir, last_logged + 1, p2)
        t_step = time.time()
        second = finish(p2, run_dir)
    finally:
        kill_tree(p2.pid)
    resumed_from = next(m["step"] for m in reversed(second.metrics()) if m.get("event") == "resume")
    if kind == "hang":  # the hang began when the stuck rank last beat
        h = next(h for h in read_hangs(run_dir) if h["rank"] == 1)
        t_fault = h["time"] - h["seconds_since_beat"]
    return {"kind": kind, "stop_s": t_exit - t_fault, "restart_s": t_step - t_exit, "total_s": t_step - t_fault,
            "last_logged": last_logged, "resumed_from": resumed_from, "codes": codes,
            "resume_rc": second.returncode, "losses": second.losses()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--kinds", default="sigterm-agent,sigterm-worker,sigusr1,sigusr1-agent,hang")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="signal_restart_")
    ref = pretrain(os.path.join(root, "ref"), BASE + ["checkpoint.interval=100"], nproc=2)
    assert ref.returncode == 0, ref.output[-2000:]
    ref_losses = ref.losses()
    print(f"{'kind':<15} {'stop s':>7} {'restart s':>9} {'total s':>8}  steps (last logged -> resumed from)  "
          f"exit codes  losses == reference")
    results: dict[str, list[dict]] = {}
    for kind in args.kinds.split(","):
        for i in range(args.trials):
            r = trial(kind, os.path.join(root, f"{kind}-{i}"))
            same = r["losses"] == ref_losses
            results.setdefault(kind, []).append(r)
            print(f"{kind:<15} {r['stop_s']:>7.1f} {r['restart_s']:>9.1f} {r['total_s']:>8.1f}  "
                  f"{r['last_logged']:>2} -> {r['resumed_from']:<2} {'':<24} {r['codes']}  {same} "
                  f"(resume rc {r['resume_rc']})", flush=True)
    print("\nmedians:")
    for kind, rs in results.items():
        print(f"{kind:<15} stop {statistics.median(r['stop_s'] for r in rs):.1f} s, restart "
              f"{statistics.median(r['restart_s'] for r in rs):.1f} s, total "
              f"{statistics.median(r['total_s'] for r in rs):.1f} s over {len(rs)} trial(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
