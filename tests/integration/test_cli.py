"""The command lines a user runs: help, dataset inspection, a real run of configs/tiny.yaml as it
is (2 processes), its run directory (resolved config, metrics.jsonl, committed checkpoints) and
the run summary."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from megatron_tts.checkpoint import COMMITTED, step_dir_name
from tests.helpers import REPO, SMALL, env, pretrain

pytestmark = pytest.mark.slow

STEPS = 3
REQUIRED = ("step", "consumed_samples", "consumed_tokens", "loss", "loss_speech", "lr", "grad_norm",
            "tokens_per_s", "step_time_s", "pack_efficiency")


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def step_records(run) -> list[dict]:
    return [r for r in run.metrics() if "loss" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml as it is: only the run dir and a short train.steps, on 2 processes (DP=2)."""
    r = pretrain(str(tmp_path_factory.mktemp("tiny") / "run"), [f"train.steps={STEPS}"], nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    return r


@pytest.fixture(scope="module")
def text_loss_run(tmp_path_factory):
    """Text segments in the loss too: loss_text must be reported. Logs every step (SMALL)."""
    r = pretrain(str(tmp_path_factory.mktemp("text_loss") / "run"),
                 SMALL + ["train.steps=2", "model.loss_segments=[text,speech,speech_end]"], nproc=1)
    assert r.returncode == 0, r.output[-3000:]
    return r


def test_pretrain_help():
    p = run_module("launch.pretrain", "--help")
    assert p.returncode == 0, p.stderr
    assert "--config" in p.stdout and "dotted.key=value" in p.stdout
    assert "torchrun --nproc-per-node" in p.stdout  # the docstring's usage line


def test_pretrain_needs_a_config():
    p = run_module("launch.pretrain")
    assert p.returncode == 2 and "--config" in p.stderr


def test_inspect_demo_data():
    p = run_module("data_pipeline", "inspect", "data/demo")
    assert p.returncode == 0, p.stderr
    assert re.search(r"totals:\s+5 shards, 400 samples", p.stdout), p.stdout
    assert "codebook=256" in p.stdout
    for i in range(5):
        assert f"shard-{i:06d}.tar" in p.stdout


def test_tiny_recipe_runs_as_is(tiny_run):
    out = tiny_run.output
    assert "Traceback" not in out
    assert "layout tp=1 pp=1 dp=2" in out
    assert f"stopped at step {STEPS}" in out
    recs = step_records(tiny_run)
    # tiny logs every 10 steps, plus the first and the last
    assert [r["step"] for r in recs] == [1, STEPS]
    assert all(math.isfinite(r["loss"]) for r in recs)


def test_metrics_carry_every_required_key(tiny_run, text_loss_run):
    for run in (tiny_run, text_loss_run):
        recs = step_records(run)
        assert recs
        for r in recs:
            missing = [k for k in REQUIRED if k not in r]
            assert not missing, (missing, r)
            for k in REQUIRED:
                assert isinstance(r[k], (int, float)) and not isinstance(r[k], bool), (k, r[k])
                assert math.isfinite(r[k]), (k, r[k])
            assert r["consumed_samples"] == r["step"] * 8  # global batch 8 in both runs
            assert r["consumed_tokens"] > 0 and r["tokens_per_s"] > 0 and r["step_time_s"] > 0
            assert 0 < r["pack_efficiency"] <= 1
            assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0
    # speech-only loss (the default): the loss is the speech loss, no text loss
    for r in step_records(tiny_run):
        assert r["loss_speech"] == pytest.approx(r["loss"])
        assert r.get("loss_text") is None
    assert [r["step"] for r in step_records(text_loss_run)] == [1, 2]


def test_loss_text_with_text_segments(text_loss_run):
    for r in step_records(text_loss_run):
        assert isinstance(r["loss_text"], float) and math.isfinite(r["loss_text"]) and r["loss_text"] > 0, r
        assert isinstance(r["loss_speech"], float) and math.isfinite(r["loss_speech"])
        # the total is a token-weighted mean of the two parts, so it lies between them
        lo, hi = sorted((r["loss_text"], r["loss_speech"]))
        assert lo - 1e-6 <= r["loss"] <= hi + 1e-6, r


def test_resolved_config_loads_back(tiny_run):
    from megatron_tts.config import dump_yaml, load_config

    path = os.path.join(tiny_run.run_dir, "config.yaml")
    cfg = load_config(path)
    assert cfg.train.run_dir == tiny_run.run_dir
    assert cfg.train.steps == STEPS
    assert cfg.model.transformer.hidden_size == 128  # tiny's own values
    assert cfg.data.seq_len == 512
    with open(path) as f:
        header, body = f.read().split("\n", 1)
    # the first line records what was derived at launch (a comment: the file stays a recipe)
    assert header.startswith("# derived at launch: world_size=2") and "padded_vocab=1024" in header
    assert dump_yaml(cfg) == body
    # and it is the recipe: the same tree as tiny.yaml with the two overrides
    ref = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"train.run_dir={tiny_run.run_dir}", f"train.steps={STEPS}"])
    assert dump_yaml(ref) == dump_yaml(cfg)


def test_checkpoints_are_committed(tiny_run):
    root = os.path.join(tiny_run.run_dir, "checkpoints")
    final = os.path.join(root, step_dir_name(STEPS))
    assert os.path.basename(final) == f"step_{STEPS:08d}"
    assert os.path.isfile(os.path.join(final, COMMITTED)), os.listdir(root)
    assert not [d for d in os.listdir(root) if d.startswith(".tmp")]
    events = [r for r in tiny_run.metrics() if r.get("event") == "checkpoint"]
    assert [e["step"] for e in events] == [STEPS] and events[0]["path"] == final


def test_summary(tiny_run):
    p = run_module("launch.summary", tiny_run.run_dir, "--data", "data/demo")
    assert p.returncode == 0, p.stderr
    recs = step_records(tiny_run)
    first, last = recs[0], recs[-1]
    assert f"run directory : {os.path.abspath(tiny_run.run_dir)}" in p.stdout, p.stdout
    assert f"loss at start : {first['loss']:.4f} (step {first['step']})" in p.stdout, p.stdout
    assert f"loss at end   : {last['loss']:.4f} (step {last['step']}" in p.stdout, p.stdout
    assert "unigram entropy" in p.stdout


def test_summary_of_an_empty_run_dir(tmp_path):
    p = run_module("launch.summary", str(tmp_path))
    assert p.returncode != 0
    assert "metrics.jsonl does not exist" in p.stderr and "Traceback" not in p.stderr


def test_transformer_engine_seam_fails_clearly_without_it(tmp_path):
    """model.layer_spec=te where transformer-engine cannot run: one clear line, fatal exit code."""

    import torch

    from megatron_tts.exit_codes import EXIT_FATAL

    if torch.cuda.is_available():
        pytest.skip("transformer-engine may be usable on a CUDA machine")
    p = subprocess.run([sys.executable, "-m", "launch.pretrain", "--config", "configs/tiny.yaml",
                        f"train.run_dir={tmp_path}", "train.steps=1", "model.layer_spec=te"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_FATAL, p.stderr[-2000:]
    assert "model.layer_spec=te but transformer_engine does not import" in p.stderr
    assert "Traceback" not in p.stderr
