"""Every parallel layout reproduces the single-process loss curve (same data, same init)."""

from __future__ import annotations

import os
import re

import pytest

from megatron_tts.config import load_config, parameter_count
from tests.helpers import LAYOUT_BASE as BASE
from tests.helpers import LAYOUT_STEPS as STEPS
from tests.helpers import REPO
from tests.reference_runs import reference_run

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),  # 8 micro-batches through 1F1B
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    "dp2": (2, []),
    # Several DDP buckets, and the very run test_resume resumes (one shared reference run).
    "dp2_distopt_buckets": (2, ["optim.distributed=true", "parallel.ddp.bucket_size=20000"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    r = reference_run(tmp_path_factory, BASE, nproc=1)
    assert r.returncode == 0, r.output[-3000:]
    losses = r.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1], "the reference run does not learn"
    return losses


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path_factory):
    nproc, overrides = LAYOUTS[name]
    r = reference_run(tmp_path_factory, BASE + overrides, nproc=nproc)  # the tp2 run is test_resume's too
    assert r.returncode == 0, r.output[-3000:]
    losses = r.losses()
    assert sorted(losses) == sorted(reference)
    diffs = {s: abs(losses[s] - reference[s]) for s in reference}
    assert max(diffs.values()) <= 1e-5, f"{name}: per-step |loss - reference| = {diffs}"
    # the parameter count every layout reports is the model's, as the recipe's shape gives it
    # (what preflight sizes checkpoints by)
    with open(os.path.join(r.run_dir, "config.yaml")) as f:
        reported = int(re.search(r"params=(\d+)", f.read()).group(1))
    assert reported == parameter_count(load_config(os.path.join(REPO, "configs", "tiny.yaml"), BASE + overrides))
