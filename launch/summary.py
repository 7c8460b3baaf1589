"""Print what a run did: its directory, the loss at the start and at the end, and how that
compares with the unigram entropy of the speech tokens it was trained on.

    python -m launch.summary RUN_DIR [--data DATASET_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from monitoring.metrics import read_jsonl


def summarize(run_dir: str, data: str | None = None) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; is {run_dir} a run directory, and did the run start?")
    steps = [r for r in read_jsonl(path) if "loss" in r and "step" in r]
    if not steps:
        raise SystemExit(f"error: {path} has no step records; did the run start?")
    first, last = steps[0], steps[-1]
    out = {"run_dir": os.path.abspath(run_dir), "first_step": first["step"], "first_loss": first["loss"],
           "last_step": last["step"], "last_loss": last["loss"],
           "resumes": sum(1 for r in read_jsonl(path) if r.get("event") == "resume")}
    build = os.path.join(data, "BUILD.json") if data else None
    if build and os.path.isfile(build):
        with open(build) as f:
            stats = json.load(f).get("stats", {})
        out["unigram_entropy_nats"] = stats.get("unigram_entropy_nats")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.summary")
    p.add_argument("run_dir")
    p.add_argument("--data", help="dataset dir with BUILD.json (for the unigram entropy)")
    a = p.parse_args(argv)
    s = summarize(a.run_dir, a.data)
    print(f"run directory : {s['run_dir']}")
    print(f"loss at start : {s['first_loss']:.4f} (step {s['first_step']})")
    print(f"loss at end   : {s['last_loss']:.4f} (step {s['last_step']}, resumed {s['resumes']}x)")
    if s.get("unigram_entropy_nats"):
        h = s["unigram_entropy_nats"]
        verdict = "below" if s["last_loss"] < h else "NOT below"
        print(f"unigram entropy of the speech tokens: {h:.4f} nats -> final loss is {verdict} it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
