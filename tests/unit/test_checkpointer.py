"""The Checkpointer in-process (a world of one, gloo): save and load round trips of every piece of
state, a failed save's retry and alert, retention, fallback past a damaged checkpoint, and the
RNG reseed on a layout change."""

from __future__ import annotations

import json
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("in-process CPU world (the GPU path runs under torchrun)", allow_module_level=True)

from megatron_tts.checkpoint import format as fmt  # noqa: E402
from megatron_tts.checkpoint.checkpointer import Checkpointer  # noqa: E402
from megatron_tts.checkpoint.errors import CheckpointError  # noqa: E402
from megatron_tts.compat.mcore import get_cuda_rng_tracker  # noqa: E402
from megatron_tts.config import load_config  # noqa: E402
from megatron_tts.train.build import TrainState, build_model_and_optimizer  # noqa: E402
from tests.helpers import REPO, SMALL, world_of_one  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One process group and one model + optimizer (with Adam states) for the module."""
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      SMALL + ["model.transformer.num_layers=2", "watchdog.enabled=false",
                               f"train.run_dir={tmp_path_factory.mktemp('run')}"])
    with world_of_one(cfg) as layout:
        model, optimizer, _ = build_model_and_optimizer(cfg, seed=0)
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        optimizer.step()  # Adam moments exist
        yield cfg, layout, model, optimizer


def checkpointer(world, root, events=None, fail=None, **overrides):
    cfg, layout, model, optimizer = world
    ckcfg = cfg.checkpoint
    for k, v in overrides.items():
        setattr(ckcfg, k, v)
    state = TrainState()
    ck = Checkpointer(str(root), layout, model, optimizer, {"train": state}, config=ckcfg,
                      distributed_optimizer=False, seed=cfg.train.seed,
                      on_event=events.append if events is not None else None, fail=fail)
    return ck, state


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for m in model for p in m.parameters()]


def perturb(model, optimizer, by: float) -> None:
    with torch.no_grad():
        for m in model:
            for p in m.parameters():
                p.add_(by)
        for o in getattr(optimizer, "chained_optimizers", [optimizer]):
            for st in o.optimizer.state.values():
                st["exp_avg"].add_(by)


def test_save_then_load_restores_every_piece_of_state(world, tmp_path):
    cfg, layout, model, optimizer = world
    events = []
    ck, state = checkpointer(world, tmp_path / "ck", events, keep_last=3, keep_every=0)
    try:
        state.step, state.consumed_tokens = 7, 1234
        before = params(model)
        moments = [st["exp_avg"].clone() for o in [optimizer] for st in o.optimizer.state.values()]
        torch.manual_seed(42)
        with get_cuda_rng_tracker().fork():
            torch.rand(3)
        rng_before = torch.get_rng_state()
        path = ck.save(7)
        assert path and fmt.verify(path) is None and os.path.isfile(os.path.join(path, fmt.COMMITTED))
        assert [e["event"] for e in events] == ["checkpoint"]
        expect_next = torch.rand(5)

        perturb(model, optimizer, 1.0)
        state.step, state.consumed_tokens = 99, 0
        torch.manual_seed(1)
        assert ck.latest() == (7, path)
        loaded = ck.load(path)
        assert loaded.step == 7 and state.step == 7 and state.consumed_tokens == 1234
        assert all(torch.equal(a, b) for a, b in zip(before, params(model)))
        got = [st["exp_avg"] for st in optimizer.optimizer.state.values()]
        assert all(torch.equal(a, b) for a, b in zip(moments, got))
        assert torch.equal(torch.get_rng_state(), rng_before) and torch.equal(torch.rand(5), expect_next)
        ts = json.load(open(os.path.join(path, fmt.STATE_FILE)))
        assert ts["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    finally:
        ck.close()


def test_a_failed_write_is_retried_once_then_alerted_and_nothing_partial_is_left(world, tmp_path):
    events = []
    calls = []

    def fail(rank, step, attempt):
        calls.append((rank, step, attempt))
        return step == 2  # every attempt of step 2 fails

    root = tmp_path / "ck"
    ck, _ = checkpointer(world, root, events, fail=fail, keep_last=3, keep_every=0)
    try:
        good = ck.save(1)
        assert good is not None
        assert ck.save(2) is None
        assert [c for c in calls if c[1] == 2] == [(0, 2, 1), (0, 2, 2)]
        failed = [e for e in events if e["event"] == "checkpoint_failed"]
        assert len(failed) == 1 and failed[0]["attempts"] == 2 and "injected checkpoint write error" in failed[0]["error"]
        assert ck.failures == 1
        assert sorted(os.listdir(root)) == [fmt.LEDGER, "step_00000001"]  # no .tmp, no partial step_2
        assert fmt.verify(good) is None
        assert ck.save(3) is not None  # the next save works
    finally:
        ck.close()


def test_retention_keeps_the_newest_and_every_nth(world, tmp_path):
    root = tmp_path / "ck"
    ck, _ = checkpointer(world, root, keep_last=2, keep_every=3)
    try:
        for step in range(1, 8):
            assert ck.save(step)
        ck._deletions_done()
        assert [i.step for i in fmt.list_checkpoints(str(root))] == [3, 6, 7]
        assert fmt.ledger_steps(str(root)) == list(range(1, 8))
    finally:
        ck.close()


def test_latest_falls_back_past_a_damaged_checkpoint_and_refuses_when_none_verifies(world, tmp_path):
    root = tmp_path / "ck"
    ck, _ = checkpointer(world, root, keep_last=5, keep_every=0)
    try:
        ck.save(1)
        newest = ck.save(2)
        shard = next(f for f in os.listdir(newest) if f.endswith(".distcp"))
        with open(os.path.join(newest, shard), "r+b") as f:
            f.seek(10)
            f.write(b"\xff\xfe")
        ck2, _ = checkpointer(world, root)  # a new process: nothing verified yet
        try:
            assert ck2.latest()[0] == 1
            assert os.path.isdir(newest + fmt.QUARANTINE)
            os.remove(os.path.join(root, "step_00000001", fmt.MANIFEST))
            with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
                ck2.latest()
        finally:
            ck2.close()
    finally:
        ck.close()


def test_a_resume_under_another_layout_reseeds_deterministically(world, tmp_path, caplog):
    from megatron_tts.checkpoint.rng import reseed

    root = tmp_path / "ck"
    ck, _ = checkpointer(world, root, keep_last=2, keep_every=0)
    try:
        path = ck.save(5)
        ts_path = os.path.join(path, fmt.STATE_FILE)
        ts = json.load(open(ts_path))
        ts["layout"] = {"tp": 2, "pp": 1, "dp": 1}
        ts["world_size"] = 2
        with open(ts_path, "w") as f:
            json.dump(ts, f)
        fmt.seal(path, 5)  # a checkpoint written by a TP=2 job
        torch.manual_seed(0)
        ck._verified.clear()
        with caplog.at_level("WARNING"):
            ck.load(path)
        assert "reseeded from (train.seed=" in caplog.text and "tp=2 pp=1 dp=1" in caplog.text
        after = torch.rand(4)
        reseed(ck.seed, 5, 0)
        assert torch.equal(torch.rand(4), after)  # what reseed(seed, step, rank) gives, not the saved stream
    finally:
        ck.close()
