"""StepGuard decisions: non-finite skips, the MAD spike rule, the budget, rollback and fatal."""

from __future__ import annotations

import math

from megatron_tts.config import GuardConfig
from megatron_tts.step_guard import StepGuard


def guard(**kw) -> StepGuard:
    return StepGuard(GuardConfig(**kw))


def test_finite_steps_apply_and_nonfinite_skip():
    g = guard()
    assert g.judge(1, 0.0, 3.0).apply
    v = g.judge(2, 1.0, 3.0)  # one rank saw a NaN gradient
    assert not v.apply and v.reason == "nonfinite" and not v.rollback
    v = g.judge(3, 0.0, math.nan)
    assert not v.apply and v.reason == "nonfinite"
    assert g.counters() == {"skipped_steps": 2, "loss_spikes": 0, "rollbacks": 0}


def test_spike_rule_is_robust_and_action_configurable():
    losses = [3.0 + 0.01 * (i % 5) for i in range(30)]
    for action, applied in (("log", True), ("skip", False)):
        g = guard(spike_action=action, spike_min_history=20, spike_k=6.0)
        for i, l in enumerate(losses):
            assert g.judge(i, 0.0, l).apply
        assert g.judge(31, 0.0, 3.04).apply  # within the noise
        v = g.judge(32, 0.0, 9.0)
        assert v.apply is applied and g.spikes == 1
        # a single outlier does not move the median: the next normal loss is fine
        assert g.judge(33, 0.0, 3.02).apply


def test_budget_consecutive_then_window_then_fatal():
    g = guard(max_consecutive_skips=2, max_skips_per_window=3, window_steps=10, max_rollbacks=1)
    assert not g.judge(1, 1.0, 1.0).rollback
    assert not g.judge(2, 1.0, 1.0).rollback
    v = g.judge(3, 1.0, 1.0)
    assert v.rollback and not v.fatal
    g.after_rollback()
    g.judge(4, 1.0, 1.0)
    assert g.judge(5, 0.0, 1.0).apply
    g.judge(6, 1.0, 1.0)
    g.judge(7, 0.0, 1.0)
    g.judge(8, 1.0, 1.0)
    g.judge(9, 0.0, 1.0)
    v = g.judge(10, 1.0, 1.0)  # 4th skip within 10 steps, second rollback without a commit
    assert v.fatal and not v.rollback
    g2 = guard(max_consecutive_skips=0, max_rollbacks=1)
    assert g2.judge(1, 1.0, 1.0).rollback
    g2.committed()  # progress was checkpointed: the rollback count starts afresh
    v = g2.judge(2, 1.0, 1.0)
    assert v.rollback and not v.fatal


def test_state_dict_round_trip():
    g = guard()
    for i in range(25):
        g.judge(i, 0.0, 2.0 + i * 0.01)
    g.judge(26, 1.0, 1.0)
    h = guard()
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict()
