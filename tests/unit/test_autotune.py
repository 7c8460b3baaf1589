"""train.micro_batch_size=auto and parallel.ddp.bucket_size=auto: the loader accepts them and the
dump writes them back, validation lists every problem, the winner is chosen from the
measurements (headroom, time budget), and RUN_DIR/autotune.json is reused only while it applies."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from megatron_tts.autotune import (
    AutotuneError,
    Candidate,
    Measurement,
    bucket_candidates,
    candidates,
    choose,
    fingerprint,
    load_choice,
    micro_batch_candidates,
    pre_verdict,
    predicted_peak,
    save_choice,
)
from megatron_tts.config import ConfigError, auto_fields, build_config, dump_yaml, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
BOTH = ["train.micro_batch_size=auto", "parallel.ddp.overlap_grad_reduce=true", "parallel.ddp.bucket_size=auto"]
GiB = 2**30


def test_auto_is_parsed_resolved_later_and_dumped_back():
    cfg = load_config(TINY, BOTH)
    assert auto_fields(cfg) == ("train.micro_batch_size", "parallel.ddp.bucket_size")
    assert cfg.train.micro_batch_size == 1  # the placeholder every check accepts, until the sweep
    text = dump_yaml(cfg)
    saved = yaml.safe_load(text)
    assert saved["train"]["micro_batch_size"] == "auto"
    assert saved["parallel"]["ddp"] == {"overlap_grad_reduce": True, "bucket_size": "auto"}
    cfg.train.micro_batch_size = 4  # what the sweep chose stays out of the recipe (autotune.json has it)
    again = build_config(yaml.safe_load(dump_yaml(cfg)))
    assert auto_fields(again) == auto_fields(cfg)
    assert auto_fields(load_config(TINY, [])) == ()
    assert yaml.safe_load(dump_yaml(load_config(TINY, [])))["train"]["micro_batch_size"] == 2


def test_validation_lists_every_autotune_problem():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["parallel.ddp.bucket_size=auto", "autotune.micro_batch_sizes=[3,0,2]",
                           "autotune.bucket_sizes=[big,25MB]", "autotune.headroom=1.5", "autotune.steps=0",
                           "autotune.budget_s=0"])
    text = "\n".join(info.value.problems)
    for needle in ("overlap_grad_reduce=true", "[0] are not positive", "[3] do not divide train.global_batch_size=8",
                   "'big': give a positive number", "autotune.headroom=1.5", "autotune.steps=0",
                   "autotune.budget_s=0"):
        assert needle in text, (needle, text)
    assert len(info.value.problems) == 7


def test_candidates_divide_the_global_batch_and_buckets_convert_megabytes():
    cfg = load_config(TINY, BOTH + ["autotune.bucket_sizes=[25MB,1000]", "model.layer_spec=local"])
    assert micro_batch_candidates(cfg, dp=2) == ([1, 2, 4], [8, 16])  # global 8 / dp 2 = 4 per rank
    interleaved = load_config(TINY, ["train.micro_batch_size=auto", "parallel.pp=2", "parallel.vpp=2"])
    assert micro_batch_candidates(interleaved, dp=2) == ([1, 2], [4, 8, 16])  # micro-batches: a multiple of pp
    assert bucket_candidates(cfg) == [1000, 6_250_000]  # fp32 gradients on CPU: 4 bytes each
    assert [c.label() for c in candidates(cfg, dp=4)] == [
        "mbs=1 bucket=0.001M", "mbs=1 bucket=6.25M", "mbs=2 bucket=0.001M", "mbs=2 bucket=6.25M"]


def measured(mbs, bucket, step_s, tokens=8000, peak=GiB, limit=4 * GiB, base=GiB // 2):
    status = "ok" if peak <= limit else "over_memory"
    return Measurement(Candidate(mbs, bucket), status, step_s, [step_s], tokens / step_s, peak, limit, base)


def test_choose_the_fastest_within_the_headroom():
    ms = [measured(1, None, 1.0), measured(2, None, 0.8), measured(4, None, 0.5, peak=5 * GiB)]
    winner, why = choose(ms)
    assert winner == Candidate(2, None)
    assert "25.0% above the runner-up mbs=1" in why and "mbs=4 bucket=- over_memory" in why
    with pytest.raises(AutotuneError, match="no autotune candidate fits"):
        choose([measured(4, None, 0.5, peak=5 * GiB)])


def test_not_run_past_the_budget_or_a_predicted_peak():
    first = measured(1, 10, 1.0, peak=3 * GiB, limit=4 * GiB)
    assert pre_verdict([], Candidate(1, 10), elapsed_s=99.0, budget_s=1.0) is None  # the first always runs
    status, note = pre_verdict([first], Candidate(1, 20), elapsed_s=2.0, budget_s=1.0)
    assert status == "over_budget" and "autotune.budget_s=1" in note
    status, note = pre_verdict([first], Candidate(2, 10), elapsed_s=0.5, budget_s=1.0)
    # one point: its growth over the memory held before its model (0.5 -> 3 GiB) doubles
    assert status == "predicted_over_memory" and "5.50 GiB predicted from mbs=1" in note
    assert pre_verdict([first], Candidate(2, 20), elapsed_s=0.5, budget_s=1.0) is None  # other buckets: unknown
    two = [measured(1, 10, 1.0, peak=GiB), measured(2, 10, 1.0, peak=GiB + GiB // 4)]
    assert predicted_peak(two, Candidate(8, 10))[0] == 2 * GiB + 3 * GiB // 4  # the line through both: +0.25 GiB/mbs
    winner, why = choose([first, Measurement(Candidate(1, 20), status="over_budget")])
    assert winner == first.candidate and "only candidate" in why and "over_budget" in why


def test_autotune_json_is_reused_only_while_it_applies(tmp_path):
    cfg = load_config(TINY, BOTH)
    fp = fingerprint(cfg, world_size=2, dp=2)
    assert load_choice(str(tmp_path), fp) == (None, "no autotune.json in the run directory")
    save_choice(str(tmp_path), {"choice": {"micro_batch_size": 2, "bucket_size": 1000}, "reason": "r",
                                "fingerprint": fp, "candidates": []})
    saved, why = load_choice(str(tmp_path), json.loads(json.dumps(fp)))
    assert why == "" and saved["choice"] == {"micro_batch_size": 2, "bucket_size": 1000}
    saved, why = load_choice(str(tmp_path), fingerprint(cfg, world_size=1, dp=1))  # an elastic resize
    assert saved is None and "dp 2 -> 1" in why and "world_size 2 -> 1" in why
    cfg.autotune.steps = 5
    assert load_choice(str(tmp_path), fingerprint(cfg, world_size=2, dp=2))[1].endswith(": autotune.steps 3 -> 5")
    (tmp_path / "autotune.json").write_text("{")
    saved, why = load_choice(str(tmp_path), fp)
    assert saved is None and "unreadable" in why


def test_host_probe_sees_a_peak_inside_a_step():
    from megatron_tts.autotune import HostMemory, memory_probe

    probe = memory_probe(__import__("torch").device("cpu"))
    assert isinstance(probe, HostMemory)
    probe.reset()
    base = probe.peak()
    block = bytearray(64 * 2**20)  # touched: resident, then freed before any sample
    del block
    if probe.kernel_peak:  # Linux: the kernel's high-water mark saw it
        assert probe.peak() >= base + 48 * 2**20
    probe.reset()
    assert probe.peak() < base + 48 * 2**20
    assert probe.peak() < probe.limit(0.1)
