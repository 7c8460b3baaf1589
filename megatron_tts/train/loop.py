"""The training loop: resume, then one optimizer step per iteration until train.steps.

Its side concerns (watchdog beats, fault injection, metrics, ledger, guard bookkeeping,
checkpoint cadence) are hooks (megatron_tts.train.hooks); what stays here is the loop itself,
the guard's rollback and the stop on a signal.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from megatron_tts import signals, watchdog
from megatron_tts.checkpoint import CheckpointError
from megatron_tts.compat import cpu_active
from megatron_tts.config import Config, resolve_dtype
from megatron_tts.exit_codes import EXIT_CRASH, EXIT_FATAL, EXIT_REQUEUE, record_exit
from megatron_tts.model import uses_transformer_engine
from megatron_tts.optim import fused_adam_available
from megatron_tts.parallel import destroy_distributed
from megatron_tts.train.build import Run, build_run
from megatron_tts.train.hooks import CheckpointCadence, StepEnd, default_hooks
from megatron_tts.train.step import make_forward_step, train_step

log = logging.getLogger("megatron_tts")


class GuardFatal(RuntimeError):
    """The step guard cannot recover; the run exits EXIT_FATAL."""


def run_training(cfg: Config) -> int:
    signals.install()  # idempotent (launch.pretrain installs them before importing torch)
    with signals.helpers_shielded():  # torchrun's killpg must not kill set-up's helper processes
        run = build_run(cfg)
    watchdog.start(cfg.watchdog, cfg.train.run_dir, run.layout.rank)
    code = EXIT_CRASH
    try:
        code = _loop(run)
        run.checkpointer.wait(run.state.step)  # an async save in flight commits (or alerts) before exit
        return code
    except (GuardFatal, CheckpointError) as e:  # CheckpointError: none verifies, or an unsafe one
        log.error("fatal: %s", e)
        code = EXIT_FATAL
        return code
    except BaseException:
        watchdog.exit_if_fired()  # a hang was declared here: this error is its echo; exit 75
        raise
    finally:
        watchdog.shutting_down(run.state.step, code)
        record_exit(cfg.train.run_dir, run.layout.rank, code, step=run.state.step, signal=signals.signal_name())
        run.checkpointer.close()  # local: abandons an uncommitted async writer on an error path
        run.loader.close()
        if run.valid_loader is not None:
            run.valid_loader.close()
        if run.hooks is not None:
            run.hooks.close(run)
        run.monitor.close()  # before the metrics it writes to: closes a profile window, stops its threads
        if run.metrics:
            run.metrics.close()
        destroy_distributed()
        if run.lock is not None:
            run.lock.release()
        watchdog.stop()


def maybe_resume(run: Run) -> Optional[int]:
    """Load the checkpoint that build_run's resume plan chose (megatron_tts.resume)."""
    plan = run.resume_plan
    if plan is None or plan.path is None:
        return None
    loaded = run.checkpointer.load(plan.path, skip=("loader",) if plan.reset_data else ())
    log.info("resumed from %s (step %d)%s", loaded.path, loaded.step,
             "; the data stream restarts (train.reset_data=true)" if plan.reset_data else "")
    if run.metrics:
        run.metrics.event({"event": "resume", "step": loaded.step, "path": loaded.path,
                           "reset_data": plan.reset_data})
    return loaded.step


def _loop(run: Run) -> int:
    cfg, st, lay, mon = run.cfg, run.state, run.layout, run.monitor
    resumed = maybe_resume(run)
    run.hooks = hooks = default_hooks(run, saved_step=resumed)
    cadence = hooks.get(CheckpointCadence)
    _log_start(run)
    forward_step = make_forward_step(uses_transformer_engine(cfg), lay.device, len(run.loader.sources))
    stop_at = cfg.train.steps if cfg.train.stop_after is None else min(cfg.train.steps, st.step + cfg.train.stop_after)
    while st.step < stop_at:
        mon.step_begin(st.step + 1)
        t0 = time.perf_counter()
        with mon.phase("data"):
            hooks.boundary("data", st.step + 1)
            batches = run.loader.next_step()
        t_data = time.perf_counter() - t0
        run.attempts += 1
        result = train_step(run, batches, forward_step)
        step_time = time.perf_counter() - t0
        if result.stats.lock_lost:
            log.error("another job took over the run directory %s (its lock's lease expired while this job "
                      "stalled): stopping without saving, so as not to write over it (fatal)", cfg.train.run_dir)
            return EXIT_FATAL
        mon.on_verdict(st.step + 1, result.verdict, run.guard.counters())
        if result.verdict.fatal:
            log.error("step %d: the skip budget ran out again after %d rollbacks without a new committed "
                      "checkpoint; stopping (fatal, do not requeue). Inspect the flagged samples above.",
                      st.step + 1, cfg.guard.max_rollbacks)
            return EXIT_FATAL
        if result.verdict.rollback:
            with mon.phase("checkpoint"):
                hooks.boundary("checkpoint", st.step)
                rollback(run)
            cadence.saved_step = None  # the loader now skips the window: not what the checkpoint holds
            if result.stop:
                return _requeue_stop(run, cadence)
            continue
        st.advance(cfg.train.global_batch_size, result.stats)
        logged = st.step % cfg.logging.interval == 0 or st.step == stop_at or st.step == 1
        end = StepEnd(st.step, result, batches, step_time, t_data, logged, last=st.step == stop_at)
        with mon.phase("logging"):
            hooks.boundary("logging", st.step)
            hooks.on_step_end(run, end)
        with mon.phase("checkpoint"):
            hooks.on_checkpoint_point(run, end)
        if result.stop and st.step < stop_at:  # a stop signal reached some rank (signals.py)
            return _requeue_stop(run, cadence)
    if lay.rank == 0:
        log.info("stopped at step %d (resumed from %s); run dir %s", st.step, resumed, cfg.train.run_dir)
    return 0


def _log_start(run: Run) -> None:
    cfg, lay = run.cfg, run.layout
    if lay.rank == 0:
        log.info("model: %.2fM params | layout tp=%d pp=%d dp=%d | %s | micro-batches/step=%d | %s | "
                 "layers: %s | optimizer: %s", run.num_params / 1e6, lay.tp, lay.pp, lay.dp, resolve_dtype(cfg),
                 cfg.num_microbatches(lay.dp), "CPU (gloo)" if cpu_active() else "CUDA",
                 "transformer-engine" if uses_transformer_engine(cfg) else "megatron local",
                 "fused Adam (apex/TE)" if fused_adam_available() else "torch AdamW")


def _requeue_stop(run: Run, cadence: CheckpointCadence) -> int:
    """Every rank agreed to stop at this step boundary: commit this step (unless it already is)
    and exit EXIT_REQUEUE. Further signals are ignored meanwhile (signals.py)."""
    st = run.state
    if cadence.saved_step != st.step and not run.checkpointer.is_committed(st.step):
        path = cadence.save(run, st.step)
    else:
        latest = run.checkpointer.latest()
        path = latest[1] if latest else None
    got = signals.signal_name()
    who = f"{got} on this rank" if got else "signal on another rank"
    if path:
        log.warning("stop requested (%s): checkpoint %s at step %d; exiting %d (requeue)", who, path, st.step,
                    EXIT_REQUEUE)
    else:  # still 75: the newest committed checkpoint is older but valid, a resume repeats the steps since
        log.error("stop requested (%s): the checkpoint at step %d failed; exiting %d (requeue) to resume from "
                  "the newest committed one", who, st.step, EXIT_REQUEUE)
    if run.metrics:
        run.metrics.event({"event": "stop", "step": st.step, "path": path, "signal": got,
                           "signal_time": signals.received_at(), "time": time.time(), "exit_code": EXIT_REQUEUE})
    return EXIT_REQUEUE


def rollback(run: Run) -> None:
    """Restore the last committed checkpoint and skip the data window that broke the budget."""
    latest = run.checkpointer.latest()
    if latest is None:
        raise GuardFatal("the skip budget ran out and there is no committed checkpoint to roll back to")
    failed_at = run.state.step + 1
    past_window = run.loader.state_dict()  # the cursor after the offending steps' data
    counters = {k: getattr(run.guard, k) for k in ("skipped_steps", "spikes", "rollbacks", "rollbacks_since_commit")}
    run.checkpointer.load(latest[1])
    run.loader.load_state_dict(past_window)
    for k, v in counters.items():  # the checkpoint's older counters must not hide what happened
        setattr(run.guard, k, v)
    run.guard.after_rollback()
    log.warning("rollback: step %d broke the skip budget; restored %s (step %d) and skipped the data "
                "consumed since", failed_at, latest[1], run.state.step)
    if run.metrics:
        run.metrics.event({"event": "rollback", "failed_step": failed_at, "to_step": run.state.step,
                           "path": latest[1], **run.guard.counters()})
