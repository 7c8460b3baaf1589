"""The pretraining loop: setup, then one optimizer step per iteration.

Pieces plug in by name: `build_run` assembles the model, optimizer, scheduler, loader,
checkpointer and metrics; `train_step` is one optimizer step through megatron-core's
forward_backward_func; `run` is the loop.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tts import cpu_compat, faults, signals, watchdog
from megatron_tts.checkpoint import CheckpointError, Checkpointer
from megatron_tts.config import (Config, dump_yaml, padded_vocab_size, resolve_backend, resolve_dtype, to_dict,
                                 vocab_layout)
from megatron_tts.model import build_model_chunks, count_parameters, uses_transformer_engine
from megatron_tts.optim import build_optimizer, build_scheduler, fused_adam_available
from megatron_tts.parallel import Layout, destroy_distributed, init_distributed
from megatron_tts.step_guard import StepGuard, Verdict
from megatron_tts.exit_codes import EXIT_CRASH, EXIT_FATAL, EXIT_REQUEUE, record_exit
from monitoring.metrics import MetricsLogger, TensorBoardSink, WandbSink
from monitoring.monitor import Monitor

log = logging.getLogger("megatron_tts")

# Segments whose loss counts as "speech" in the metrics (indices into layouts.SEGMENTS).
_SPEECH_SEGMENTS = ("speech", "speech_end")


@dataclass
class TrainState:
    """Progress counters; saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0  # packed sequences (global batch x steps), megatron's convention
    consumed_tokens: int = 0  # real (non-padding) tokens
    consumed_docs: int = 0  # utterances
    consumed_audio_s: float = 0.0  # seconds of audio in those utterances (codec frames / frame rate)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class Run:
    cfg: Config
    layout: Layout
    model: list
    optimizer: Any
    scheduler: Any
    loader: Any
    checkpointer: Checkpointer
    metrics: Optional[MetricsLogger]
    guard: StepGuard = None
    state: TrainState = field(default_factory=TrainState)
    num_params: int = 0
    attempts: int = 0  # train_step calls in this process (not rolled back): fault-injection key
    ledger: Optional[Any] = None  # JsonlWriter of sample keys per step (logging.ledger)
    incarnation: Optional[str] = None
    monitor: Optional[Monitor] = None  # timers, throughput/MFU, straggler, alerts, profiling


# ------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------


def wrap_ddp(cfg: Config, chunks: list) -> list:
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    tcfg = cfg.model.transformer
    ddp_cfg = cfg.parallel.ddp
    model = [DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=c,
                                     disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]
    # megatron's schedules find these hooks on the TransformerConfig (its documented contract).
    tcfg.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    if ddp_cfg.overlap_grad_reduce:
        tcfg.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync
    if ddp_cfg.overlap_param_gather and ddp_cfg.align_param_gather:
        tcfg.param_sync_func = [m.start_param_sync for m in model] if len(model) > 1 else model[0].start_param_sync
    return model


def build_loader(cfg: Config, layout: Layout):
    from data_pipeline.layouts import build_layout
    from data_pipeline.loader import PackedLoader
    from data_pipeline.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path,
                          expected_vocab_size=cfg.model.vocab.text_vocab_size)
    lay = build_layout(cfg.model.layout, vocab_layout(cfg), cfg.model.loss_segments)
    return PackedLoader(cfg.data.paths, layout=lay, tokenizer=tok, seq_len=cfg.data.seq_len,
                        micro_batch_size=cfg.train.micro_batch_size,
                        global_batch_size=cfg.train.global_batch_size,
                        dp_rank=layout.dp_rank, dp_size=layout.dp, seed=cfg.train.seed,
                        pack_window=cfg.data.pack_window, num_workers=cfg.data.num_workers,
                        prefetch=cfg.data.prefetch)


def build_run(cfg: Config) -> Run:
    layout = init_distributed(cfg)
    _setup_logging(layout)
    if uses_transformer_engine(cfg) and cfg.train.micro_batch_size != 1:
        raise RuntimeError("with transformer-engine, packed documents are separated through THD "
                           "packed_seq_params, which need train.micro_batch_size=1 (raise "
                           "train.global_batch_size instead), or set model.layer_spec=local")
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(cfg.train.seed)
    model_parallel_cuda_manual_seed(cfg.train.seed)
    # Built before the model: a bad dataset path or tokenizer fails in seconds, not after init.
    loader = build_loader(cfg, layout)
    chunks = build_model_chunks(cfg)
    num_params = _global_param_count(chunks, layout)
    model = wrap_ddp(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    state = TrainState()
    guard = StepGuard(cfg.guard)
    checkpointer = Checkpointer(cfg.checkpoint_dir, layout, model, optimizer,
                                components={"train": state, "scheduler": scheduler, "loader": loader,
                                            "guard": guard},
                                distributed_optimizer=cfg.optim.distributed, config=cfg.checkpoint)
    metrics = None
    if layout.rank == 0:
        os.makedirs(cfg.train.run_dir, exist_ok=True)
        derived = (f"# derived at launch: world_size={layout.world_size} tp={layout.tp} pp={layout.pp} "
                   f"dp={layout.dp} micro_batches={cfg.num_microbatches(layout.dp)} "
                   f"padded_vocab={padded_vocab_size(cfg)} dtype={resolve_dtype(cfg)} "
                   f"backend={resolve_backend(cfg)} params={num_params}\n")
        text = derived + dump_yaml(cfg)
        with open(os.path.join(cfg.train.run_dir, "config.yaml"), "w") as f:
            f.write(text)
        log.info("resolved config (saved to %s/config.yaml):\n%s", cfg.train.run_dir, text)
    ledger = None
    if cfg.logging.ledger and layout.tp_rank == 0 and layout.pp_rank == 0:
        from monitoring.metrics import JsonlWriter

        ledger = JsonlWriter(os.path.join(cfg.train.run_dir, "ledger", f"rank_{layout.rank:05d}.jsonl"))
    if cfg.logging.ledger:
        # One id per incarnation of the job (restarts redo the steps after the last commit).
        ids = [f"{time.time():.6f}"]
        if dist.is_initialized():
            dist.broadcast_object_list(ids, src=0)
        run_incarnation = ids[0]
    else:
        run_incarnation = None
    if layout.is_logging_rank:
        sinks = []
        if cfg.logging.wandb:
            sinks.append(WandbSink(cfg.logging.wandb_project, cfg.train.run_dir, to_dict(cfg), cfg.logging.wandb_mode))
        if cfg.logging.tensorboard:
            sinks.append(TensorBoardSink(os.path.join(cfg.train.run_dir, "tensorboard")))
        metrics = MetricsLogger(cfg.train.run_dir, console=cfg.logging.console, extra_sinks=sinks)
    monitor = Monitor(cfg, layout, cfg.train.run_dir, metrics)  # every rank (a collective at set-up)
    tcfg = cfg.model.transformer
    tcfg.finalize_model_grads_func = monitor.wrap_grad_sync(tcfg.finalize_model_grads_func)
    if metrics is not None:
        checkpointer.on_event = monitor.on_checkpoint_event  # checkpoint, checkpoint_failed (alerts), mirror events
    return Run(cfg, layout, model, optimizer, scheduler, loader, checkpointer, metrics, guard, state, num_params,
               ledger=ledger, incarnation=run_incarnation, monitor=monitor)


def _global_param_count(chunks: list, layout: Layout) -> int:
    from megatron.core import parallel_state as ps

    n = torch.tensor([count_parameters(chunks)], dtype=torch.float64)
    if dist.is_initialized():
        # TP shards and PP stages hold disjoint parameters (tied embeddings counted per stage).
        dist.all_reduce(n, group=ps.get_model_parallel_group())
    return int(n.item())


# megatron-core warnings that do not apply to how we call it (we use GPTModel on purpose, and
# the synchronous torch_dist save path); every other megatron warning is shown.
_BENIGN = ("GPTModel IS DEPRECATED", "MCore's async save is deprecated")


def _drop_benign(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BENIGN)


def _setup_logging(layout: Layout) -> None:
    level = logging.INFO if layout.rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{layout.rank}] %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_benign)
    for noisy in ("megatron.core", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING if layout.rank == 0 else logging.ERROR)


def maybe_resume(run: Run) -> Optional[int]:
    cfg = run.cfg
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        latest = run.checkpointer.latest()
        if latest is None:
            return None
        path = latest[1]
    else:
        path = cfg.train.resume
    loaded = run.checkpointer.load(path)
    log.info("resumed from %s (step %d)", loaded.path, loaded.step)
    if run.metrics:
        run.metrics.event({"event": "resume", "step": loaded.step, "path": loaded.path})
    return loaded.step


# ------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------


def _packed_seq_params(batch) -> Any:
    """THD boundaries for transformer-engine attention (documents never attend to each other)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    doc = batch.document_ids[0]
    change = torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1
    cu = torch.cat([torch.tensor([0]), change, torch.tensor([doc.numel()])]).to(torch.int32).to(doc.device)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def _loss_func(batch, speech_segments: torch.Tensor, n_sources: int, poison: bool, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    if poison:  # fault injection (MEGATRON_TTS_FAULT=nan_loss:...): a real NaN through backward
        losses = losses * float("nan")
    mask = batch.loss_mask.float()
    is_speech = torch.isin(batch.segment.long(), speech_segments).float() * mask
    is_text = mask - is_speech
    loss_sum = (losses * mask).sum()
    masked = (losses * mask).detach()
    # per data source (the data.paths entry of each token's document; bin 0 = padding), no host sync
    bins = (batch.source.long() + 1).flatten()
    by_source = torch.zeros(2, n_sources + 1, device=losses.device)
    by_source[0].scatter_add_(0, bins, masked.flatten())
    by_source[1].scatter_add_(0, bins, mask.flatten())
    report = torch.cat([torch.stack([loss_sum.detach(), mask.sum(), (losses * is_speech).sum().detach(),
                                     is_speech.sum(), (losses * is_text).sum().detach(), is_text.sum()]),
                        by_source[:, 1:].flatten()])
    return loss_sum, mask.sum().to(torch.int), {"lm": report}


def make_forward_step(use_thd: bool, device: torch.device, n_sources: int):
    from data_pipeline.layouts import SEGMENTS

    speech = torch.tensor([SEGMENTS.index(s) for s in _SPEECH_SEGMENTS], device=device)

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(device, non_blocking=True)
        poison = forward_step.poison
        if use_thd:
            out = model(batch.tokens, batch.position_ids, None, labels=batch.labels,
                        packed_seq_params=_packed_seq_params(batch))
        else:
            out = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels)
        return out, partial(_loss_func, batch, speech, n_sources, poison)

    forward_step.poison = False
    return forward_step


# The step statistics: one float64 vector, summed over every rank in the step's one all-reduce.
# Each quantity is contributed once: losses by the last stage's TP rank 0, data counts by the
# first stage's TP rank 0 (every DP rank reads and skips only its own samples).
_LOSS = slice(0, 6)  # loss sum/count: all targets, speech, text
_TOKENS, _DOCS, _BAD_SAMPLE, _BAD_SHARD, _NONFINITE, _STOP, _AUDIO = range(6, 13)
_BY_SOURCE = 13  # then per-source loss sums, then per-source target counts


def train_step(run: Run, batches: list, forward_step) -> dict:
    """One optimizer step over this rank's micro-batches, guarded. Returns global statistics."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, lay, mon = run.cfg, run.layout, run.monitor
    step = run.state.step + 1
    run.attempts += 1
    n_src = len(run.loader.sources)
    # (timing: forward_backward ends after the statistics all-reduce, the step's sync point, so
    # that on GPU the queued forward/backward work is counted here and not in the optimizer)
    with mon.phase("forward_backward"):
        _phase("forward_backward", step, lay.rank)
        for m in run.model:
            m.zero_grad_buffer()
        run.optimizer.zero_grad()
        forward_step.poison = faults.active("nan_loss", step=step, rank=lay.rank, attempt=run.attempts)
        n_chunks = len(run.model)
        iters = [iter(batches) for _ in range(n_chunks)]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if n_chunks > 1 else iters[0],
            model=run.model if n_chunks > 1 else run.model[0],
            num_microbatches=len(batches),
            seq_length=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=False,
        )
        _phase("optimizer", step, lay.rank)
        if faults.active("nan_grad", step=step, rank=lay.rank, attempt=run.attempts):
            run.model[0].buffers[0].grad_data[0] = float("nan")
        stats = torch.zeros(_BY_SOURCE + 2 * n_src, dtype=torch.float64)
        loss_sum = None
        if losses:
            report = sum(entry["lm"].double().cpu() for entry in losses)
            loss_sum = report[0]
            if lay.tp_rank == 0:
                stats[_LOSS] = report[:6]
                stats[_BY_SOURCE:] = report[6:]
        if lay.tp_rank == 0 and lay.pp_rank == 0:
            loader_stats = run.loader.stats
            stats[_TOKENS] = sum(b.n_tokens for b in batches)
            stats[_DOCS] = sum(len(row) for b in batches for row in b.sample_keys)
            stats[_BAD_SAMPLE] = loader_stats.get("skipped_bad_sample", 0)
            stats[_BAD_SHARD] = loader_stats.get("skipped_bad_shard", 0)
            stats[_AUDIO] = sum(b.audio_seconds for b in batches)
        stats[_NONFINITE] = run.guard.prepare(run.model, loss_sum).cpu() if cfg.guard.enabled else 0.0
        # one reduction per step: the stop-signal flag rides in the statistics all-reduce, which
        # already spans the world (TP/PP/DP: every rank must stop at the same step), instead of a
        # second collective and host sync of its own. Sum > 0: some rank got SIGTERM/INT/USR1.
        stats[_STOP] = 1.0 if signals.requested() else 0.0
        if dist.is_initialized():
            # CPU-GPU sync point, the one per step (megatron's grad-norm reduction aside): global
            # loss, token counts and the guard's non-finite flag, so every rank decides alike.
            # (NCCL reduces device tensors only; on gloo the device is the CPU.)
            stats = stats.to(lay.device)
            with mon.span("stats_sync"):  # time spent waiting for peers: not this rank's own work
                dist.all_reduce(stats)
            stats = stats.cpu()
    with mon.phase("optimizer"):
        loss = stats[0].item() / max(stats[1].item(), 1.0)
        verdict = run.guard.judge(step, stats[_NONFINITE].item(), loss) if cfg.guard.enabled else Verdict(apply=True)
        grad_norm = float("nan")
        if verdict.apply:
            ok, norm, _ = run.optimizer.step()
            if ok:
                run.scheduler.step(increment=1)
            grad_norm = float(norm) if norm is not None else float("nan")
        else:
            # Dropped: no parameter, optimizer or scheduler state changes. The gradient buffers are
            # zeroed at the start of the next step.
            ok = False
            if lay.tp_rank == 0 and lay.pp_rank == 0:
                keys = [k for b in batches for row in b.sample_keys for k in row]
                log.warning("step %d skipped (%s, dp rank %d): samples %s", step, verdict.reason, lay.dp_rank, keys)
    by_source = stats[_BY_SOURCE:].view(2, n_src).tolist()
    return {"ok": bool(ok), "verdict": verdict, "grad_norm": grad_norm, "loss": loss,
            "loss_sum": stats[0].item(), "n_loss": stats[1].item(), "speech_sum": stats[2].item(),
            "n_speech": stats[3].item(), "text_sum": stats[4].item(), "n_text": stats[5].item(),
            "tokens": int(stats[_TOKENS].item()), "docs": int(stats[_DOCS].item()),
            "audio_s": stats[_AUDIO].item(), "source_sums": by_source[0], "source_counts": by_source[1],
            "skipped_bad_sample": int(stats[_BAD_SAMPLE].item()), "skipped_bad_shard": int(stats[_BAD_SHARD].item()),
            "stop": stats[_STOP].item() > 0}


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


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
        run.monitor.close()  # before the metrics it writes to: closes a profile window, stops its threads
        if run.metrics:
            run.metrics.close()
        if run.ledger:
            run.ledger.close()
        destroy_distributed()
        watchdog.stop()


def _phase(name: str, step: int, rank: int) -> None:
    """A phase boundary: heartbeat for the hang watchdog, then any injected fault (both ~free)."""
    watchdog.beat(name, step)
    faults.maybe_inject(name, step, rank)


def _loop(run: Run) -> int:
    cfg, st, lay = run.cfg, run.state, run.layout
    resumed = maybe_resume(run)
    if lay.rank == 0:
        log.info("model: %.2fM params | layout tp=%d pp=%d dp=%d | %s | micro-batches/step=%d | %s | "
                 "layers: %s | optimizer: %s", run.num_params / 1e6, lay.tp, lay.pp, lay.dp, resolve_dtype(cfg),
                 cfg.num_microbatches(lay.dp), "CPU (gloo)" if cpu_compat.is_active() else "CUDA",
                 "transformer-engine" if uses_transformer_engine(cfg) else "megatron local",
                 "fused Adam (apex/TE)" if fused_adam_available() else "torch AdamW")
    use_thd = uses_transformer_engine(cfg)
    forward_step = make_forward_step(use_thd, lay.device, len(run.loader.sources))
    stop_at = cfg.train.steps if cfg.train.stop_after is None else min(cfg.train.steps, st.step + cfg.train.stop_after)
    tokens_per_step_capacity = cfg.train.global_batch_size * cfg.data.seq_len
    saved_step = resumed  # the step whose committed checkpoint equals the state in memory
    mon = run.monitor
    while st.step < stop_at:
        mon.step_begin(st.step + 1)
        t0 = time.perf_counter()
        with mon.phase("data"):
            _phase("data", st.step + 1, lay.rank)
            batches = run.loader.next_step()
        t_data = time.perf_counter() - t0
        out = train_step(run, batches, forward_step)
        step_time = time.perf_counter() - t0
        mon.on_verdict(st.step + 1, out["verdict"], run.guard.counters())
        if out["verdict"].fatal:
            log.error("step %d: the skip budget ran out again after %d rollbacks without a new committed "
                      "checkpoint; stopping (fatal, do not requeue). Inspect the flagged samples above.",
                      st.step + 1, cfg.guard.max_rollbacks)
            return EXIT_FATAL
        if out["verdict"].rollback:
            _phase("checkpoint", st.step, lay.rank)
            with mon.phase("checkpoint"):
                rollback(run)
            saved_step = None  # the loader now skips the window: not what the checkpoint holds
            if out["stop"]:
                return _requeue_stop(run, saved_step)
            continue
        st.step += 1
        watchdog.record_step(step_time)
        with mon.phase("logging"):
            _phase("logging", st.step, lay.rank)
            if run.ledger:
                run.ledger.write({"step": st.step, "dp_rank": lay.dp_rank, "dp_size": lay.dp,
                                  "incarnation": run.incarnation, "applied": out["ok"], "rows": [
                                      {"pack": p, "epoch": e, "keys": keys} for b in batches
                                      for p, e, keys in zip(b.pack_ids, b.epochs, b.sample_keys)]})
            st.consumed_samples += cfg.train.global_batch_size
            st.consumed_tokens += out["tokens"]
            st.consumed_docs += out["docs"]
            st.consumed_audio_s += out["audio_s"]
            logged = st.step % cfg.logging.interval == 0 or st.step == stop_at or st.step == 1
            fields = mon.step_end(st.step, out, step_time, logged)  # every rank (straggler all_gather)
            if run.metrics and logged:
                run.metrics.log({**_record(run, out, step_time, t_data, tokens_per_step_capacity), **fields})
        with mon.phase("checkpoint"):
            run.checkpointer.poll(st.step)  # commits a finished async save (collective, cheap)
            if st.step % cfg.checkpoint.interval == 0 or st.step == stop_at:
                if _save(run):  # a failed save leaves nothing to skip at a stop
                    saved_step = st.step
        if out["stop"] and st.step < stop_at:  # a stop signal reached some rank (signals.py)
            return _requeue_stop(run, saved_step)
    if lay.rank == 0:
        log.info("stopped at step %d (resumed from %s); run dir %s", st.step, resumed, cfg.train.run_dir)
    return 0


def _save(run: Run) -> str:
    _phase("checkpoint", run.state.step, run.layout.rank)
    path = run.checkpointer.save(run.state.step)  # emits the checkpoint / checkpoint_failed events
    if path:  # None: the save failed (ALERT logged); training goes on
        run.guard.committed()
    return path


def _requeue_stop(run: Run, saved_step: Optional[int]) -> int:
    """Every rank agreed to stop at this step boundary: commit this step (unless it already is)
    and exit EXIT_REQUEUE. Further signals are ignored meanwhile (signals.py)."""
    st = run.state
    if saved_step != st.step:
        path = _save(run)
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


class GuardFatal(RuntimeError):
    """The step guard cannot recover; the run exits EXIT_FATAL."""


def _record(run: Run, out: dict, step_time: float, t_data: float, capacity: int) -> dict:
    st = run.state
    r = {
        "step": st.step,
        "consumed_samples": st.consumed_samples,
        "consumed_tokens": st.consumed_tokens,
        "consumed_docs": st.consumed_docs,
        "loss": out["loss"],
        "loss_speech": out["speech_sum"] / out["n_speech"] if out["n_speech"] else None,
        "loss_text": out["text_sum"] / out["n_text"] if out["n_text"] else None,
        "loss_by_source": {name: total / n if n else None
                           for name, total, n in zip(run.loader.sources, out["source_sums"], out["source_counts"])},
        "audio_hours": st.consumed_audio_s / 3600.0,
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": out["grad_norm"],
        "tokens_per_s": out["tokens"] / step_time,
        "step_time_s": step_time,
        "data_wait_s": t_data,
        "pack_efficiency": out["tokens"] / capacity,
        "skipped_step": not out["ok"],
        **run.guard.counters(),
    }
    loader_stats = run.loader.stats
    r["skipped_bad_sample"] = out["skipped_bad_sample"]
    r["skipped_bad_shard"] = out["skipped_bad_shard"]
    for k in ("skipped_too_long", "epoch", "consumed_packs"):  # the same on every rank
        if k in loader_stats:
            r[k] = loader_stats[k]
    return r
