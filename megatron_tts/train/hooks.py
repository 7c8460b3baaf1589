"""The loop's side concerns, each a small named hook: the hang watchdog's beats, fault injection,
the step guard's bookkeeping, the sample ledger, the metrics record and checkpoint cadence.

A hook overrides the events it needs (all are optional no-ops):

    boundary(phase, step)                  a phase boundary (data, forward_backward, optimizer,
                                           logging, checkpoint); must be ~free: every step
    before_forward(run, step, fwd)         before the forward/backward schedule
    after_backward(run, step)              gradients are in the buffers, before the statistics
    on_step_end(run, end)                  a completed step (logging phase), every rank
    on_checkpoint_point(run, end)          the step's checkpoint phase, every rank
    after_save(run, step, path)            a save committed (sync) or was scheduled (async)
    close(run)                             the run ends, on every exit path

A new concern (validation, audio samples) is a new hook in ``default_hooks``, not an edit of the
loop. Fault injection is installed only when MEGATRON_TTS_FAULT is set, so it is off the hot path.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from megatron_tts import faults, watchdog
from megatron_tts.checkpoint import format as fmt
from megatron_tts.train.step import StepResult, stats_fields
from monitoring.metrics import JsonlWriter

log = logging.getLogger("megatron_tts")


@dataclass
class StepEnd:
    """What a completed step hands to the hooks."""

    step: int
    result: StepResult
    batches: list
    step_time: float
    data_time: float
    logged: bool  # a metrics record is written for this step
    last: bool  # the last step of this invocation
    extra: dict = field(default_factory=dict)  # fields hooks add to this step's metrics record


class Hook:
    def boundary(self, phase: str, step: int) -> None: ...

    def before_forward(self, run, step: int, forward_step) -> None: ...

    def after_backward(self, run, step: int) -> None: ...

    def on_step_end(self, run, end: StepEnd) -> None: ...

    def on_checkpoint_point(self, run, end: StepEnd) -> None: ...

    def after_save(self, run, step: int, path: str) -> None: ...

    def close(self, run) -> None: ...


class Hooks:
    """The hooks of a run, called in order."""

    def __init__(self, hooks: list[Hook]) -> None:
        self.hooks = list(hooks)
        # Only the hooks that implement an event are called for it (the per-step ones are hot).
        self._boundary = [h.boundary for h in self.hooks if type(h).boundary is not Hook.boundary]

    def _each(self, name: str):
        return [getattr(h, name) for h in self.hooks if getattr(type(h), name) is not getattr(Hook, name)]

    def boundary(self, phase: str, step: int) -> None:
        for fn in self._boundary:
            fn(phase, step)

    def before_forward(self, run, step: int, forward_step) -> None:
        for fn in self._each("before_forward"):
            fn(run, step, forward_step)

    def after_backward(self, run, step: int) -> None:
        for fn in self._each("after_backward"):
            fn(run, step)

    def on_step_end(self, run, end: StepEnd) -> None:
        for fn in self._each("on_step_end"):
            fn(run, end)

    def on_checkpoint_point(self, run, end: StepEnd) -> None:
        for fn in self._each("on_checkpoint_point"):
            fn(run, end)

    def after_save(self, run, step: int, path: str) -> None:
        for fn in self._each("after_save"):
            fn(run, step, path)

    def close(self, run) -> None:
        for h in reversed(self.hooks):
            try:
                h.close(run)
            except Exception:  # noqa: BLE001 - one hook's clean-up must not skip the others'
                log.exception("closing %s failed", type(h).__name__)

    def get(self, cls: type) -> Optional[Hook]:
        return next((h for h in self.hooks if isinstance(h, cls)), None)


class WatchdogBeats(Hook):
    """A heartbeat for the hang watchdog at every phase boundary, and each step's duration."""

    def boundary(self, phase: str, step: int) -> None:
        watchdog.beat(phase, step)

    def on_step_end(self, run, end: StepEnd) -> None:
        watchdog.record_step(end.step_time)


class FaultInjection(Hook):
    """MEGATRON_TTS_FAULT (megatron_tts.faults): hangs and slow ranks at phase boundaries, a NaN
    loss or gradient on matching steps. Installed only when the variable is set."""

    def boundary(self, phase: str, step: int) -> None:
        faults.maybe_inject(phase, step, self.rank)

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def before_forward(self, run, step: int, forward_step) -> None:
        forward_step.poison = faults.active("nan_loss", step=step, rank=self.rank, attempt=run.attempts)

    def after_backward(self, run, step: int) -> None:
        if faults.active("nan_grad", step=step, rank=self.rank, attempt=run.attempts):
            run.model[0].buffers[0].grad_data[0] = float("nan")


class GuardBookkeeping(Hook):
    """The step guard's budget resets on each committed checkpoint; its verdicts alert."""

    def after_save(self, run, step: int, path: str) -> None:
        run.guard.committed()


class OuterSyncHook(Hook):
    """parallel.hierarchical: the outer synchronisation every outer_interval applied steps
    (megatron_tts.hierarchical), before the step's metrics record and checkpoint."""

    def on_step_end(self, run, end: StepEnd) -> None:
        with run.monitor.span("outer_sync"):
            # the guard's verdict, not the optimizer's own `applied`: the verdict follows from the
            # world-wide statistics, so every node counts the same steps and meets at the sync
            run.outer.after_step(end.result.verdict.apply)
        if end.logged:
            end.extra.update(run.outer.metrics())


class Ledger(Hook):
    """logging.ledger: the sample keys each DP rank trained on per step (RUN_DIR/ledger/)."""

    def __init__(self, path: str, incarnation: str) -> None:
        self.writer = JsonlWriter(path)
        self.incarnation = incarnation

    def on_step_end(self, run, end: StepEnd) -> None:
        lay = run.layout
        self.writer.write({"step": end.step, "dp_rank": lay.dp_rank, "dp_size": lay.dp,
                           "incarnation": self.incarnation, "applied": end.result.applied, "rows": [
                               {"pack": p, "epoch": e, "keys": keys} for b in end.batches
                               for p, e, keys in zip(b.pack_ids, b.epochs, b.sample_keys)]})

    def close(self, run) -> None:
        self.writer.close()


class MetricsRecord(Hook):
    """The monitor's per-step work on every rank, and the metrics.jsonl record on the logging rank."""

    def on_step_end(self, run, end: StepEnd) -> None:
        fields = run.monitor.step_end(end.step, int(end.result.stats.tokens), end.step_time, end.logged)
        if run.metrics is not None and (end.logged or end.extra):
            run.metrics.log({**step_record(run, end), **fields, **end.extra})


class CheckpointCadence(Hook):
    """Polls an async save every step; saves every checkpoint.interval steps and at the last step.
    ``saved_step`` is the step whose committed checkpoint equals the state in memory."""

    def __init__(self, saved_step: Optional[int] = None) -> None:
        self.saved_step = saved_step

    def on_checkpoint_point(self, run, end: StepEnd) -> None:
        run.checkpointer.poll(end.step)  # commits a finished async save (collective, cheap)
        if end.step % run.cfg.checkpoint.interval == 0 or end.last:
            self.save(run, end.step)

    def save(self, run, step: int) -> Optional[str]:
        run.hooks.boundary("checkpoint", step)  # the watchdog's longer checkpoint window from here
        path = run.checkpointer.save(step)  # emits the checkpoint / checkpoint_failed events
        if path:  # None: the save failed (ALERT logged); training goes on
            self.saved_step = step
            run.hooks.after_save(run, step, path)
        return path


class AudioSamples(Hook):
    """samples.interval: rank 0 samples the newest committed checkpoint in a side process (CPU,
    niced), never blocking a step; a failure is counted and logged, never fatal. The checkpoint
    is pinned against pruning while it is read."""

    def __init__(self, cfg, run_dir: str) -> None:
        self.cfg = cfg
        self.root = os.path.join(run_dir, "samples")
        self.proc = None
        self.started = 0.0
        self.current: Optional[tuple[int, str]] = None
        self.done_steps: set[int] = set()
        self.failures = 0

    def on_checkpoint_point(self, run, end: StepEnd) -> None:
        self._poll(run)
        if end.step % self.cfg.interval or self.proc is not None:
            return
        latest = fmt.committed_checkpoints(run.checkpointer.root)
        if not latest or latest[-1][0] in self.done_steps:
            return
        step, path = latest[-1]
        out = os.path.join(self.root, fmt.step_dir_name(step))
        os.makedirs(out, exist_ok=True)
        c = self.cfg
        cmd = [sys.executable, "-m", "megatron_tts.generate.samples", "--checkpoint", path, "--out", out,
               "--prompts", json.dumps(list(c.prompts)), "--max-tokens", str(c.max_tokens), "--seed", str(c.seed),
               "--temperature", str(c.temperature)] + (["--greedy"] if c.greedy else []) + \
            (["--codec", c.codec] if c.codec else []) + (["--codec-path", c.codec_path] if c.codec_path else [])
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # never the training GPUs
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(k, None)
        log_file = open(os.path.join(out, "log.txt"), "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=lambda: os.nice(10), start_new_session=True)
        finally:
            log_file.close()
        run.checkpointer.pinned.add(path)
        self.current, self.started = (step, path), time.monotonic()
        self.done_steps.add(step)
        log.info("audio samples of %s started in a side process -> %s", path, out)

    def _poll(self, run, wait_s: float = 0.0) -> None:
        if self.proc is None:
            return
        try:
            rc = self.proc.wait(timeout=wait_s) if wait_s else self.proc.poll()
        except subprocess.TimeoutExpired:
            rc = None
        overdue = rc is None and time.monotonic() - self.started > self.cfg.timeout_s
        if rc is None and not (overdue or wait_s):
            return
        if rc is None:
            self.proc.kill()
            self.proc.wait()
        step, path = self.current
        run.checkpointer.pinned.discard(path)
        self.proc, self.current = None, None
        if rc != 0:
            self.failures += 1
            why = "timed out" if overdue else ("stopped at the end of training" if rc is None else f"exit {rc}")
            log.warning("audio samples of step %d failed (%s; see %s/log.txt); %d failure(s) so far, training "
                        "goes on", step, why, os.path.join(self.root, fmt.step_dir_name(step)), self.failures)
            with open(os.path.join(self.root, "failures.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "why": why, "failures": self.failures, "time": time.time()}) + "\n")

    def close(self, run) -> None:
        self._poll(run, wait_s=self.cfg.timeout_s if self.proc is not None else 0.0)


def default_hooks(run, saved_step: Optional[int]) -> Hooks:
    hooks: list[Hook] = [WatchdogBeats()]
    if faults.enabled():
        hooks.append(FaultInjection(run.layout.rank))
    hooks.append(GuardBookkeeping())
    if run.outer is not None:
        hooks.append(OuterSyncHook())
    if run.valid_loader is not None:
        from megatron_tts.train.evaluate import Evaluation

        hooks.append(Evaluation(run, run.valid_loader))  # before the metrics record it adds to
    lay = run.layout
    if run.cfg.logging.ledger and lay.tp_rank == 0 and lay.pp_rank == 0:
        hooks.append(Ledger(os.path.join(run.cfg.train.run_dir, "ledger", f"rank_{lay.rank:05d}.jsonl"),
                            run.incarnation))
    hooks += [MetricsRecord(), CheckpointCadence(saved_step)]
    if run.cfg.samples.interval and lay.rank == 0:
        hooks.append(AudioSamples(run.cfg.samples, run.cfg.train.run_dir))
    return Hooks(hooks)


def step_record(run, end: StepEnd) -> dict:
    """The training fields of a metrics record (the monitor adds its own)."""
    st, stats = run.state, end.result.stats
    capacity = run.cfg.train.global_batch_size * run.cfg.data.seq_len
    r = {
        "step": st.step,
        "consumed_samples": st.consumed_samples,
        "consumed_tokens": st.consumed_tokens,
        "consumed_docs": st.consumed_docs,
        **stats_fields(stats, run.loader.sources),
        "audio_hours": st.consumed_audio_s / 3600.0,
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": end.result.grad_norm,
        "tokens_per_s": stats.tokens / end.step_time,
        "step_time_s": end.step_time,
        "data_wait_s": end.data_time,
        "pack_efficiency": stats.tokens / capacity,
        "skipped_step": not end.result.applied,
        **run.guard.counters(),
        "skipped_bad_sample": int(stats.bad_samples),
        "skipped_bad_shard": int(stats.bad_shards),
    }
    loader_stats = run.loader.stats
    for k in ("skipped_too_long", "epoch", "consumed_packs", "epochs_by_source", "tokens_by_source",
              "audio_hours_by_source"):  # the same on every rank (planned over the global steps)
        if k in loader_stats:
            r[k] = loader_stats[k]
    return r

