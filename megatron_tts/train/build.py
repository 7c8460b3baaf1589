"""Assembling a run: process groups, loader, model, optimizer, scheduler, checkpointer, metrics
and monitor, in the order that fails fastest on bad input."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from data_pipeline.layouts import build_layout
from data_pipeline.loader import DataConfigError, PackedLoader, SourceSpec
from data_pipeline.shard_format import codec_identity
from data_pipeline.tokenizer import build_tokenizer
from megatron_tts import autotune, faults, resume, signals
from megatron_tts.checkpoint.checkpointer import Checkpointer
from megatron_tts.checkpoint.collective import bcast
from megatron_tts.compat.mcore import (
    DistributedDataParallel,
    unwrap,
    finalize_model_grads,
    model_parallel_cuda_manual_seed,
    parallel_state,
)
from megatron_tts.config import Config, auto_fields, dump_yaml, padded_vocab_size, resolve_backend, resolve_dtype, to_dict, vocab_layout
from megatron_tts.model import build_model_chunks, count_parameters, uses_transformer_engine
from megatron_tts.optim import build_optimizer, build_scheduler
from megatron_tts.exit_codes import clear_exit_record
from megatron_tts.parallel import Layout, init_distributed
from megatron_tts.run_lock import RunDirError, RunDirLocked, RunLock, check_usable
from megatron_tts.step_guard import StepGuard
from monitoring.metrics import MetricsLogger, TensorBoardSink, WandbSink
from monitoring.monitor import Monitor

log = logging.getLogger("megatron_tts")


@dataclass
class TrainState:
    """Progress counters; saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0  # packed sequences (global batch x steps), megatron's convention
    consumed_tokens: int = 0  # real (non-padding) tokens
    consumed_docs: int = 0  # utterances
    consumed_audio_s: float = 0.0  # seconds of audio in those utterances (codec frames / frame rate)

    def advance(self, global_batch_size: int, stats) -> None:
        """One applied (or guard-skipped) step's data, from the step's global statistics."""
        self.step += 1
        self.consumed_samples += global_batch_size
        self.consumed_tokens += int(stats.tokens)
        self.consumed_docs += int(stats.docs)
        self.consumed_audio_s += stats.audio_s

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
    guard: StepGuard
    monitor: Monitor
    state: TrainState = field(default_factory=TrainState)
    num_params: int = 0
    attempts: int = 0  # train_step calls in this process (not rolled back): fault-injection key
    incarnation: Optional[str] = None  # one id per start of the job (logging.ledger)
    hooks: Any = None  # megatron_tts.train.hooks.Hooks, installed by the loop
    resume_plan: Optional[resume.ResumePlan] = None
    valid_loader: Any = None  # data.valid_paths, when eval.interval
    lock: Optional[RunLock] = None  # rank 0: the run directory lock
    outer: Any = None  # megatron_tts.hierarchical.OuterSync with parallel.hierarchical


def wrap_ddp(cfg: Config, chunks: list, groups=None) -> list:
    """megatron's DDP around each chunk; ``groups`` (a ProcessGroupCollection) replaces the
    data-parallel group it reduces gradients over (parallel.hierarchical: the inner group)."""
    tcfg = cfg.model.transformer
    ddp_cfg = cfg.parallel.ddp
    model = [DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0),
                                     pg_collection=groups) for i, c in enumerate(chunks)]
    # megatron's schedules find these hooks on the TransformerConfig (its documented contract).
    tcfg.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    if ddp_cfg.overlap_grad_reduce:
        tcfg.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync
    if ddp_cfg.overlap_param_gather and ddp_cfg.align_param_gather:
        tcfg.param_sync_func = [m.start_param_sync for m in model] if len(model) > 1 else model[0].start_param_sync
    return model


def build_loader(cfg: Config, layout: Layout, valid_paths: Optional[list[str]] = None) -> PackedLoader:
    """The training loader (data.sources or data.paths), or with valid_paths a validation loader."""
    tok = build_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path,
                          expected_vocab_size=cfg.model.vocab.text_vocab_size)
    lay = build_layout(cfg.model.layout, vocab_layout(cfg), cfg.model.loss_segments, framing=chat_frame(cfg, tok))
    d = cfg.data
    valid = valid_paths is not None
    sources = None if d.sources is None or valid else \
        [SourceSpec(list(s.paths), float(s.weight), s.name) for s in d.sources]
    paths = valid_paths if valid else None if sources is not None else (d.paths if d.paths is not None else ["data/demo"])
    return PackedLoader(paths, sources=sources, layout=lay, tokenizer=tok, seq_len=cfg.data.seq_len,
                        sample_order=d.sample_order,
                        micro_batch_size=cfg.train.micro_batch_size,
                        global_batch_size=cfg.train.global_batch_size,
                        dp_rank=layout.dp_rank, dp_size=layout.dp, seed=cfg.train.seed,
                        pack_window=cfg.data.pack_window, num_workers=1 if valid else cfg.data.num_workers,
                        prefetch=0 if valid else cfg.data.prefetch)


def check_dataset_codec(expected: Optional[dict], actual: dict) -> None:
    """data.codec (the recipe's codec) against the datasets' codec: every field the recipe gives
    must match, or DataConfigError (exit 3) naming each differing field."""
    if not expected:
        return
    want, have = codec_identity(expected), codec_identity(actual)
    diffs = [f"{k}: data.codec has {v!r}, the datasets {have.get(k, 'do not record it')!r}"
             for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise DataConfigError("the datasets were tokenized with another codec than the recipe's data.codec ("
                              + "; ".join(diffs) + "); point data.paths at data tokenized with that codec, "
                              "or fix data.codec")


def build_model_and_optimizer(cfg: Config, seed: Optional[int] = None, ddp_groups=None) -> tuple[list, Any, int]:
    """The DDP-wrapped model chunks of this rank, megatron's optimizer over them, and the global
    parameter count (a collective over the model-parallel group). ``ddp_groups``: see wrap_ddp."""
    seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    chunks = build_model_chunks(cfg)
    num_params = _global_param_count(chunks)
    model = wrap_ddp(cfg, chunks, ddp_groups)
    return model, build_optimizer(cfg, model), num_params


def chat_frame(cfg: Config, tokenizer):
    """model.framing=llasa_chat: the chat template's constant pieces (data_pipeline.chat)."""
    if cfg.model.framing != "llasa_chat":
        return None
    from data_pipeline.chat import ChatTemplateError, llasa_chat_frame

    try:
        return llasa_chat_frame(tokenizer.path, cfg.model.chat_date)
    except ChatTemplateError as e:
        raise DataConfigError(str(e)) from None


def build_run(cfg: Config) -> Run:
    """Everything a run needs, in the order that fails fastest and writes nothing into the run
    directory until the lock is held and the resume is known to be valid."""
    layout = init_distributed(cfg)
    setup_logging(layout)
    lock = _lock_run_dir(cfg, layout)
    try:
        return _build(cfg, layout, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(cfg: Config, layout: Layout, lock: Optional[RunLock]) -> Run:
    clear_exit_record(cfg.train.run_dir, layout.rank)  # a previous incarnation's code must not stand for this one
    # parallel.hierarchical: DDP reduces over the node's group only (an autotune sweep times that)
    hierarchy, ddp_groups = None, None
    if cfg.parallel.hierarchical.enabled:
        from megatron_tts.hierarchical import build_hierarchy, ddp_process_groups

        hierarchy = build_hierarchy(cfg, parallel_state.get_data_parallel_group())
        ddp_groups = ddp_process_groups(hierarchy)
    # micro_batch_size=auto / ddp.bucket_size=auto: resolved into cfg before the loader and the
    # model are built from it (a sweep on throwaway copies, or the run's autotune.json)
    tuned = autotune.resolve(cfg, layout, ddp_groups)
    if uses_transformer_engine(cfg) and cfg.train.micro_batch_size != 1:
        raise RuntimeError("with transformer-engine, packed documents are separated through THD "
                           "packed_seq_params, which need train.micro_batch_size=1 (raise "
                           "train.global_batch_size instead), or set model.layer_spec=local")
    # Built before the model: a bad dataset path or tokenizer fails in seconds, not after init.
    loader = build_loader(cfg, layout)
    check_dataset_codec(cfg.data.codec, loader.codec_identity())
    valid_loader = None
    if cfg.eval.interval:
        from megatron_tts.train.evaluate import check_disjoint

        valid_loader = build_loader(cfg, layout, cfg.data.valid_paths)
        check_disjoint(valid_loader, loader)
    model, optimizer, num_params = build_model_and_optimizer(cfg, ddp_groups=ddp_groups)
    scheduler = build_scheduler(cfg, optimizer)
    state = TrainState()
    guard = StepGuard(cfg.guard)
    components = {"train": state, "scheduler": scheduler, "loader": loader, "guard": guard}
    outer = None
    if hierarchy is not None:
        from megatron_tts.hierarchical import OuterSync

        outer = components[OuterSync.name] = OuterSync(cfg, hierarchy, optimizer, layout)
        tcfg = cfg.model.transformer
        tcfg.finalize_model_grads_func = outer.finalize(tcfg.finalize_model_grads_func)
        if layout.rank == 0:
            log.info("parallel.hierarchical: %d node(s) x %d DP rank(s); outer sync every %d applied step(s), %s",
                     hierarchy.nodes, hierarchy.inner_size, cfg.parallel.hierarchical.outer_interval,
                     cfg.parallel.hierarchical.outer_optimizer)
    fail = None
    if faults.enabled():
        def fail(rank: int, step: int, attempt: int) -> bool:
            return faults.active("checkpoint_write_error", rank=rank, step=step, attempt=attempt)
    on_commit = (lambda step, path: resume.record_commit(cfg.train.run_dir, step, path)) if layout.rank == 0 else None
    checkpointer = Checkpointer(cfg.checkpoint_dir, layout, model, optimizer,
                                components=components, config=cfg.checkpoint, extension=outer, distributed_optimizer=cfg.optim.distributed,
                                seed=cfg.train.seed, fail=fail, fingerprint=resume.fingerprint(cfg, loader),
                                on_commit=on_commit, config_text=dump_yaml(cfg))
    try:
        plan = resume.plan(cfg, checkpointer, loader, layout.rank == 0)  # may refuse: nothing written yet
    except BaseException:
        checkpointer.close()  # lets its helper process finish starting: killing it half-started is noisy
        loader.close()
        raise
    if cfg.train.init_from:
        _init_from(cfg, layout, model, optimizer, resumed=plan.path is not None)
        if outer is not None and plan.path is None:
            outer.reset_anchor()  # the imported weights are the start
    if layout.rank == 0:
        if cfg.train.resume == "never":
            for moved in resume.archive_history(cfg.train.run_dir, cfg.checkpoint_dir):
                log.warning("train.resume=never in a run directory with history: archived %s", moved)
        for note in plan.notes:
            log.warning("%s", note)
        _save_resolved_config(cfg, layout, num_params)
    autotune.save(cfg, tuned, layout.rank)
    metrics = _metrics(cfg) if layout.is_logging_rank else None
    if metrics is not None and tuned is not None:
        metrics.event(tuned.event())
    monitor = Monitor(cfg, layout, cfg.train.run_dir, metrics, dtype=resolve_dtype(cfg),  # every rank: a collective
                      vocab_size=padded_vocab_size(cfg), profile_requests=signals.profile_requests)
    tcfg = cfg.model.transformer
    tcfg.finalize_model_grads_func = monitor.wrap_grad_sync(tcfg.finalize_model_grads_func)
    if metrics is not None:
        checkpointer.on_event = monitor.on_checkpoint_event  # checkpoint, checkpoint_failed (alerts), mirror events
    return Run(cfg, layout, model, optimizer, scheduler, loader, checkpointer, metrics, guard, monitor, state,
               num_params, incarnation=_incarnation() if cfg.logging.ledger else None, resume_plan=plan, lock=lock,
               valid_loader=valid_loader, outer=outer)


def _init_from(cfg: Config, layout: Layout, model: list, optimizer, resumed: bool) -> None:
    """train.init_from: pretrained weights for a new run (a resumed run has its own)."""
    if resumed:
        if layout.rank == 0:
            log.warning("train.init_from=%s ignored: resuming from the run's checkpoint", cfg.train.init_from)
        return
    from megatron_tts.hf.importer import load_hf

    kind, _, path = cfg.train.init_from.partition(":")
    summary = load_hf([unwrap(m) for m in model], cfg, path)
    optimizer.reload_model_params()  # its fp32 main copies were taken from the random init
    if layout.rank == 0:
        log.info("train.init_from: %s", summary)


def _lock_run_dir(cfg: Config, layout: Layout) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock; every rank learns whether it did."""
    lock, error = None, None
    if layout.rank == 0:
        lock = RunLock(cfg.train.run_dir, cfg.train.lock_lease_s)
        try:
            check_usable(cfg.train.run_dir)
            if cfg.checkpoint.dir:
                check_usable(cfg.checkpoint.dir, "checkpoint.dir")
            how = lock.acquire()
            log.info("run directory lock %s: %s", lock.path, how)
        except (RunDirLocked, RunDirError) as e:
            lock, error = None, (type(e).__name__, str(e))
    error = bcast(error)
    if error:
        raise (RunDirLocked if error[0] == "RunDirLocked" else RunDirError)(error[1])
    return lock


def _save_resolved_config(cfg: Config, layout: Layout, num_params: int) -> None:
    os.makedirs(cfg.train.run_dir, exist_ok=True)
    derived = (f"# derived at launch: world_size={layout.world_size} tp={layout.tp} pp={layout.pp} "
               f"dp={layout.dp} micro_batches={cfg.num_microbatches(layout.dp)} "
               f"padded_vocab={padded_vocab_size(cfg)} dtype={resolve_dtype(cfg)} "
               f"backend={resolve_backend(cfg)} params={num_params}\n")
    if auto_fields(cfg):
        derived += (f"# autotuned ({autotune.FILE}): train.micro_batch_size={cfg.train.micro_batch_size} "
                    f"parallel.ddp.bucket_size={cfg.parallel.ddp.bucket_size}\n")
    text = derived + dump_yaml(cfg)
    with open(os.path.join(cfg.train.run_dir, "config.yaml"), "w") as f:
        f.write(text)
    log.info("resolved config (saved to %s/config.yaml):\n%s", cfg.train.run_dir, text)


def _metrics(cfg: Config) -> MetricsLogger:
    sinks = []
    if cfg.logging.wandb:
        sinks.append(WandbSink(cfg.logging.wandb_project, cfg.train.run_dir, to_dict(cfg), cfg.logging.wandb_mode))
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(os.path.join(cfg.train.run_dir, "tensorboard")))
    return MetricsLogger(cfg.train.run_dir, console=cfg.logging.console, extra_sinks=sinks)


def _incarnation() -> str:
    """One id per incarnation of the job (restarts redo the steps after the last commit)."""
    ids = [f"{time.time():.6f}"]
    if dist.is_initialized():
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def _global_param_count(chunks: list) -> int:
    n = torch.tensor([count_parameters(chunks)], dtype=torch.float64)
    if dist.is_initialized():
        # TP shards and PP stages hold disjoint parameters (tied embeddings counted per stage).
        dist.all_reduce(n, group=parallel_state.get_model_parallel_group())
    return int(n.item())


# megatron-core warnings that do not apply to how we call it (we use GPTModel on purpose, and
# the synchronous torch_dist save path); every other megatron warning is shown.
_BENIGN = ("GPTModel IS DEPRECATED", "MCore's async save is deprecated")


def _drop_benign(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BENIGN)


def setup_logging(layout: Layout) -> None:
    level = logging.INFO if layout.rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{layout.rank}] %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_benign)
    for noisy in ("megatron.core", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING if layout.rank == 0 else logging.ERROR)
