"""The training loop's parts in-process: typed step statistics, the hook registry, fault injection
off the hot path."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_tts import faults
from megatron_tts.train import hooks as H
from megatron_tts.train.step import StepStats, stats_fields


def test_step_stats_round_trip_through_one_tensor():
    a = StepStats(loss_sum=12.5, n_loss=5, speech_sum=10.0, n_speech=4, text_sum=2.5, n_text=1, tokens=640,
                  docs=7, audio_s=12.25, bad_samples=1, bad_shards=0, nonfinite=0, stop=1,
                  source_sums=[3.0, 9.5], source_counts=[1.0, 4.0])
    t = a.to_tensor()
    assert t.dtype == torch.float64 and t.shape == (len(StepStats._SCALARS) + 4,)
    assert StepStats.from_tensor(t, 2) == a
    # the all-reduce sums field by field
    b = StepStats(loss_sum=1, n_loss=1, tokens=10, stop=0, nonfinite=1, source_sums=[1.0, 0.0], source_counts=[1.0, 0.0])
    s = StepStats.from_tensor(a.to_tensor() + b.to_tensor(), 2)
    assert (s.loss_sum, s.n_loss, s.tokens, s.stop, s.nonfinite) == (13.5, 6, 650, 1, 1)
    assert s.source_sums == [4.0, 9.5] and s.loss == 13.5 / 6
    f = stats_fields(a, ["demo", "other"])
    assert f["loss"] == 2.5 and f["loss_speech"] == 2.5 and f["loss_text"] == 2.5
    assert f["loss_by_source"] == {"demo": 3.0, "other": 9.5 / 4}


def test_the_loss_report_fills_the_loss_fields():
    s = StepStats(source_sums=[0.0], source_counts=[0.0])
    s.add_report(torch.tensor([4.0, 2.0, 3.0, 1.0, 1.0, 1.0, 4.0, 2.0], dtype=torch.float64), 1)
    assert (s.loss_sum, s.n_loss, s.speech_sum, s.n_text) == (4.0, 2.0, 3.0, 1.0)
    assert s.source_sums == [4.0] and s.source_counts == [2.0]


class Recorder(H.Hook):
    def __init__(self, log):
        self.log = log

    def boundary(self, phase, step):
        self.log.append(("boundary", phase, step))

    def on_step_end(self, run, end):
        self.log.append(("end", end.step))


class Silent(H.Hook):
    pass


def test_only_the_events_a_hook_implements_are_called():
    log = []
    hooks = H.Hooks([Silent(), Recorder(log), Silent()])
    assert len(hooks._boundary) == 1
    hooks.boundary("data", 3)
    hooks.on_step_end(None, types.SimpleNamespace(step=3))
    hooks.after_backward(None, 3)  # nobody implements it: nothing happens
    assert log == [("boundary", "data", 3), ("end", 3)]
    assert hooks.get(Recorder) is hooks.hooks[1] and hooks.get(H.Ledger) is None


def _run(ledger=False):
    cfg = types.SimpleNamespace(logging=types.SimpleNamespace(ledger=ledger), train=types.SimpleNamespace(run_dir="."),
                                samples=types.SimpleNamespace(interval=0))
    lay = types.SimpleNamespace(rank=0, tp_rank=0, pp_rank=0)
    return types.SimpleNamespace(cfg=cfg, layout=lay, incarnation=None, valid_loader=None, outer=None)


def test_fault_injection_is_off_the_hot_path_unless_configured(monkeypatch):
    monkeypatch.setattr(faults, "_SPECS", [])
    kinds = [type(h) for h in H.default_hooks(_run(), None).hooks]
    assert H.FaultInjection not in kinds
    assert kinds == [H.WatchdogBeats, H.GuardBookkeeping, H.MetricsRecord, H.CheckpointCadence]
    monkeypatch.setattr(faults, "_SPECS", faults.parse("nan_loss:step=3"))
    hooks = H.default_hooks(_run(), 5)
    assert H.FaultInjection in [type(h) for h in hooks.hooks] and hooks.get(H.CheckpointCadence).saved_step == 5
    fwd = types.SimpleNamespace(poison=False)
    hooks.before_forward(types.SimpleNamespace(attempts=1), 3, fwd)
    assert fwd.poison is True
    hooks.before_forward(types.SimpleNamespace(attempts=2), 4, fwd)
    assert fwd.poison is False


@pytest.mark.parametrize("ledger", [False, True])
def test_the_ledger_hook_follows_the_config(tmp_path, monkeypatch, ledger):
    monkeypatch.setattr(faults, "_SPECS", [])
    run = _run(ledger)
    run.cfg.train.run_dir = str(tmp_path)
    hooks = H.default_hooks(run, None)
    assert (hooks.get(H.Ledger) is not None) == ledger
    hooks.close(run)
