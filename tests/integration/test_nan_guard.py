"""Step guard under injected NaNs (real processes, real NaN through backward):
skipped steps change nothing; an exhausted budget rolls back and skips the data window;
repeated failure is fatal rather than a loop."""

from __future__ import annotations

import os

import torch

from megatron_tts.exit_codes import EXIT_FATAL
from tests.helpers import SMALL, pretrain

BASE = SMALL + ["logging.interval=1", "checkpoint.keep_last=10"]


def model_tensors(ckpt: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.rstrip("/") + ".pt"
    dcp_to_torch_save(ckpt, out)
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if k.startswith(("embedding.", "decoder.", "output_layer."))
            and isinstance(v, torch.Tensor)}


def by_step(r) -> dict[int, dict]:
    return {x["step"]: x for x in r.metrics() if "loss" in x}


def test_nan_steps_are_skipped_without_touching_state(tmp_path):
    r = pretrain(str(tmp_path / "nan"), BASE + ["train.steps=6", "checkpoint.interval=2"],
                 extra_env={"MEGATRON_TTS_FAULT": "nan_loss:step=3-4"})
    assert r.returncode == 0, r.output[-3000:]
    m = by_step(r)
    assert [s for s in m if m[s]["skipped_step"]] == [3, 4]
    assert m[6]["skipped_steps"] == 2 and m[6]["rollbacks"] == 0
    # the scheduler did not move on the skipped steps
    assert m[2]["lr"] == m[3]["lr"] == m[4]["lr"] != m[5]["lr"]
    # nor did any parameter: the checkpoint after the two skipped steps equals the one before
    a = model_tensors(os.path.join(r.run_dir, "checkpoints", "step_00000002"))
    b = model_tensors(os.path.join(r.run_dir, "checkpoints", "step_00000004"))
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert "step 3 skipped (nonfinite" in r.output and "shard-0" in r.output  # sample keys logged
    assert all(m[s]["loss"] == m[s]["loss"] for s in (5, 6))  # training resumed, finite


def test_nan_gradient_on_one_rank_is_skipped_by_all(tmp_path):
    r = pretrain(str(tmp_path / "g"), BASE + ["train.steps=4", "checkpoint.interval=100"], nproc=2,
                 extra_env={"MEGATRON_TTS_FAULT": "nan_grad:step=2:rank=1"})
    assert r.returncode == 0, r.output[-3000:]
    m = by_step(r)
    assert [s for s in m if m[s]["skipped_step"]] == [2]
    assert m[1]["lr"] == m[2]["lr"] != m[3]["lr"]


def test_exhausted_budget_rolls_back_and_skips_the_data_window(tmp_path):
    # attempts 5-7 are poisoned: 3 consecutive skips > budget 2 -> rollback to step 4
    r = pretrain(str(tmp_path / "rb"), BASE + ["train.steps=8", "checkpoint.interval=4",
                                                "guard.max_consecutive_skips=2"],
                 extra_env={"MEGATRON_TTS_FAULT": "nan_loss:attempt=5-7"})
    assert r.returncode == 0, r.output[-3000:]
    events = [x for x in r.metrics() if x.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["failed_step"] == 7 and events[0]["to_step"] == 4
    final = by_step(r)  # later records of a step replace earlier ones
    assert max(final) == 8 and not any(final[s]["skipped_step"] for s in (5, 6, 7, 8))
    # the data of the three poisoned steps was skipped: step 5 now trains on packs 56..63
    gbs = 8
    assert final[5]["consumed_packs"] == (7 + 1) * gbs
    assert final[8]["rollbacks"] == 1 and final[8]["skipped_steps"] == 3


def test_repeated_failure_is_fatal_not_a_loop(tmp_path):
    r = pretrain(str(tmp_path / "fatal"), BASE + ["train.steps=12", "checkpoint.interval=2",
                                                   "guard.max_consecutive_skips=1", "guard.max_rollbacks=2"],
                 extra_env={"MEGATRON_TTS_FAULT": "nan_loss:attempt=3-100"})
    assert r.returncode != 0
    assert f"exitcode  : {EXIT_FATAL}" in r.output or r.returncode == EXIT_FATAL, r.output[-3000:]
    assert "fatal, do not requeue" in r.output
    assert len([x for x in r.metrics() if x.get("event") == "rollback"]) == 2
