"""A real 2-process gloo run with train.micro_batch_size=auto and parallel.ddp.bucket_size=auto:
the sweep logs every candidate and the winner, writes autotune.json and an autotune event, every
rank uses the same choice, the loss curve is the fixed-micro-batch run's, and a resume reuses the
choice without re-tuning."""

from __future__ import annotations

import json
import os

from tests.helpers import LAYOUT_BASE as BASE
from tests.helpers import LAYOUT_STEPS as STEPS
from tests.helpers import LAYOUT_STOP as STOP
from tests.helpers import pretrain
from tests.reference_runs import reference_run

AUTO = ["train.micro_batch_size=auto", "parallel.ddp.overlap_grad_reduce=true", "parallel.ddp.bucket_size=auto",
        "autotune.micro_batch_sizes=[1,2]", "autotune.bucket_sizes=[20000,10000000]", "autotune.steps=1",
        "autotune.warmup_steps=0"]  # the test checks the mechanics, not the timings


def events(run, kind):
    return [r for r in run.metrics() if r.get("event") == kind]


def test_auto_run_tunes_once_and_trains_as_the_fixed_run(tmp_path, tmp_path_factory):
    run_dir = str(tmp_path / "auto")
    first = pretrain(run_dir, BASE + AUTO + [f"train.stop_after={STOP}"], nproc=2)
    assert first.returncode == 0, first.output[-3000:]
    out = first.output
    assert "autotune: tuning train.micro_batch_size, parallel.ddp.bucket_size" in out
    lines = [ln for ln in out.splitlines() if "autotune: mbs=" in ln]
    assert len(lines) == 4 and all("tokens/s" in ln and ": ok" in ln for ln in lines), lines
    assert "autotune: chose mbs=" in out and "is the fastest within the memory headroom" in out
    assert "autotune: all 2 rank(s) use mbs=" in out  # checked by an all-gather in the run

    with open(os.path.join(run_dir, "autotune.json")) as f:
        saved = json.load(f)
    choice = saved["choice"]
    assert len(saved["candidates"]) == 4 and saved["fingerprint"]["dp"] == 2
    (event,) = events(first, "autotune")
    assert event["reused"] is False and event["choice"] == choice
    with open(os.path.join(run_dir, "config.yaml")) as f:
        text = f.read()
    assert "micro_batch_size: auto" in text and "bucket_size: auto" in text
    assert f"train.micro_batch_size={choice['micro_batch_size']}" in text

    resumed = pretrain(run_dir, BASE + AUTO + ["train.resume=auto"], nproc=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "autotune: reusing" in resumed.output and "autotune: tuning" not in resumed.output
    assert "resumed from" in resumed.output
    assert [e["reused"] for e in events(resumed, "autotune")] == [False, True]

    # The choice changes the micro-batching only: the global batch, data and init are the fixed
    # run's (micro_batch_size=1, no overlap); exactly so at micro-batch 1, to float reassociation else.
    ref = reference_run(tmp_path_factory, BASE, nproc=2)
    assert ref.returncode == 0, ref.output[-3000:]
    want, got = ref.losses(), resumed.losses()
    assert sorted(got) == list(range(1, STEPS + 1))
    tol = 0.0 if choice["micro_batch_size"] == 1 else 1e-5
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) <= tol, (choice, diffs)
