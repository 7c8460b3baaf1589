"""Step guard: skip steps whose loss or gradients are non-finite (or spike), within a budget.

The training loop calls it once per step, between forward/backward and the optimizer:

    flag = guard.local_flag(loss_sum, model)          # this rank's view, no sync
    ... one all-reduce of the step statistics, flag included ...
    verdict = guard.judge(step, nonfinite_ranks, loss) # identical on every rank
    if verdict.apply: optimizer.step() ... else: drop the gradients

Everything it decides follows from globally reduced numbers, so every rank agrees without a
reduction of its own. When the budget (consecutive skips, or skips per window of steps) runs
out, the verdict asks for a rollback to the last committed checkpoint, skipping the data that
caused it; after `max_rollbacks` rollbacks without a committed checkpoint in between, the run
is fatal (exit 3) rather than looping.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    apply: bool  # run the optimizer step
    reason: Optional[str] = None  # 'nonfinite' or 'spike' when flagged
    rollback: bool = False  # the budget ran out: restore the last committed checkpoint
    fatal: bool = False  # rollbacks keep failing: stop with EXIT_FATAL


class StepGuard:
    def __init__(self, cfg) -> None:
        """cfg: megatron_tts.config.GuardConfig."""
        self.cfg = cfg
        self.history: collections.deque[float] = collections.deque(maxlen=cfg.spike_window)
        self.recent_skips: collections.deque[int] = collections.deque()  # steps skipped in the window
        self.consecutive = 0
        self.skipped_steps = 0
        self.spikes = 0
        self.rollbacks = 0
        self.rollbacks_since_commit = 0

    # ---- per step ----
    @torch.no_grad()
    def prepare(self, model: list, loss_sum: Optional[torch.Tensor]) -> torch.Tensor:
        """Clip gradients by value (if configured), then return this rank's non-finite flag
        (0./1., float64) to be summed with the step statistics. No host sync here."""
        buffers = [b.grad_data for m in model for b in getattr(m, "buffers", [])]
        if self.cfg.clip_value:
            for g in buffers:
                g.clamp_(-self.cfg.clip_value, self.cfg.clip_value)
        bad = torch.zeros((), dtype=torch.bool, device=buffers[0].device if buffers else "cpu")
        for g in buffers:
            # NaN/inf survive a sum, so one reduction per buffer finds any bad element.
            bad |= ~torch.isfinite(g.sum())
        if loss_sum is not None:
            bad |= ~torch.isfinite(loss_sum.to(bad.device))
        return bad.to(torch.float64)

    def judge(self, step: int, nonfinite_ranks: float, loss: float) -> Verdict:
        """Decide from globally reduced numbers (the same on every rank)."""
        reason = None
        if nonfinite_ranks > 0 or not math.isfinite(loss):
            reason = "nonfinite"
        elif self._is_spike(loss):
            self.spikes += 1
            if self.cfg.spike_action == "skip":
                reason = "spike"
            else:
                log.warning("loss spike at step %d: %.4f (median %.4f); spike_action=log: applied", step, loss,
                            float(np.median(self.history)))
        if reason is None:
            self.consecutive = 0
            self.history.append(loss)
            return Verdict(apply=True)
        self.skipped_steps += 1
        self.consecutive += 1
        self.recent_skips.append(step)
        while self.recent_skips and self.recent_skips[0] <= step - self.cfg.window_steps:
            self.recent_skips.popleft()
        if self.consecutive > self.cfg.max_consecutive_skips or len(self.recent_skips) > self.cfg.max_skips_per_window:
            self.rollbacks += 1
            self.rollbacks_since_commit += 1
            fatal = self.rollbacks_since_commit > self.cfg.max_rollbacks
            return Verdict(apply=False, reason=reason, rollback=not fatal, fatal=fatal)
        return Verdict(apply=False, reason=reason)

    def _is_spike(self, loss: float) -> bool:
        if self.cfg.spike_k <= 0 or len(self.history) < self.cfg.spike_min_history:
            return False
        h = np.asarray(self.history)
        med = float(np.median(h))
        mad = float(np.median(np.abs(h - med)))
        # 1.4826 * MAD estimates the standard deviation of normal data; a floor keeps a flat
        # history from flagging every wiggle.
        scale = max(1.4826 * mad, 1e-3 * abs(med), 1e-8)
        return loss > med + self.cfg.spike_k * scale

    def after_rollback(self) -> None:
        self.consecutive = 0
        self.recent_skips.clear()

    def committed(self) -> None:
        """A checkpoint was committed after real progress: rollbacks start counting afresh."""
        self.rollbacks_since_commit = 0

    # ---- checkpointable ----
    def state_dict(self) -> dict:
        return {"history": list(self.history), "recent_skips": list(self.recent_skips),
                "consecutive": self.consecutive, "skipped_steps": self.skipped_steps, "spikes": self.spikes,
                "rollbacks": self.rollbacks, "rollbacks_since_commit": self.rollbacks_since_commit}

    def load_state_dict(self, state: dict) -> None:
        self.history = collections.deque(state["history"], maxlen=self.cfg.spike_window)
        self.recent_skips = collections.deque(state["recent_skips"])
        for k in ("consecutive", "skipped_steps", "spikes", "rollbacks", "rollbacks_since_commit"):
            setattr(self, k, state[k])

    def counters(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "loss_spikes": self.spikes, "rollbacks": self.rollbacks}
