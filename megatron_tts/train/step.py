"""One optimizer step: forward/backward through megatron-core's schedule, one all-reduce of the
typed step statistics, the step guard's verdict, the optimizer step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.layouts import SEGMENTS
from megatron_tts import signals
from megatron_tts.compat.mcore import PackedSeqParams, get_forward_backward_func
from megatron_tts.step_guard import Verdict

log = logging.getLogger("megatron_tts")

# Segments whose loss counts as "speech" in the metrics.
SPEECH_SEGMENTS = ("speech_start", "speech", "speech_end")
# The loss function's report per micro-batch: these sums, then per-source loss sums and counts.
_REPORT = ("loss_sum", "n_loss", "speech_sum", "n_speech", "text_sum", "n_text")


@dataclass
class StepStats:
    """What the step's one all-reduce sums over every rank. Each quantity is contributed once:
    losses by the last stage's TP rank 0, data counts by the first stage's TP rank 0 (every DP
    rank reads and skips only its own samples), flags by every rank (a sum > 0 means "some rank")."""

    loss_sum: float = 0.0
    n_loss: float = 0.0
    speech_sum: float = 0.0
    n_speech: float = 0.0
    text_sum: float = 0.0
    n_text: float = 0.0
    tokens: float = 0.0  # real (non-padding) tokens
    docs: float = 0.0  # utterances
    audio_s: float = 0.0  # seconds of audio of those utterances
    bad_samples: float = 0.0  # the loader's running counts of skipped samples / shards
    bad_shards: float = 0.0
    nonfinite: float = 0.0  # ranks that saw a non-finite loss or gradient
    stop: float = 0.0  # ranks that received a stop signal
    lock_lost: float = 0.0  # rank 0 found its run directory lock taken by another job
    source_sums: list[float] = field(default_factory=list)  # per data source: loss sums
    source_counts: list[float] = field(default_factory=list)  # per data source: target tokens

    _SCALARS = ("loss_sum", "n_loss", "speech_sum", "n_speech", "text_sum", "n_text", "tokens", "docs", "audio_s",
                "bad_samples", "bad_shards", "nonfinite", "stop", "lock_lost")

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, k) for k in self._SCALARS] + list(self.source_sums) +
                            list(self.source_counts), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, n_sources: int) -> "StepStats":
        values = t.tolist()
        n = len(cls._SCALARS)
        return cls(**dict(zip(cls._SCALARS, values[:n])), source_sums=values[n:n + n_sources],
                   source_counts=values[n + n_sources:n + 2 * n_sources])

    def add_report(self, report: torch.Tensor, n_sources: int) -> None:
        """Add the loss function's report (the sum over micro-batches)."""
        values = report.tolist()
        for k, v in zip(_REPORT, values):
            setattr(self, k, getattr(self, k) + v)
        sums, counts = values[len(_REPORT):len(_REPORT) + n_sources], values[len(_REPORT) + n_sources:]
        self.source_sums = [a + b for a, b in zip(self.source_sums, sums)] if self.source_sums else sums
        self.source_counts = [a + b for a, b in zip(self.source_counts, counts)] if self.source_counts else counts

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_loss, 1.0)


@dataclass
class StepResult:
    """The outcome of one train_step, identical on every rank."""

    applied: bool  # the optimizer step ran (not skipped by the guard, not rejected by the optimizer)
    verdict: Verdict
    grad_norm: float
    stats: StepStats  # global sums

    @property
    def loss(self) -> float:
        return self.stats.loss

    @property
    def stop(self) -> bool:
        return self.stats.stop > 0


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


def packed_seq_params(batch) -> PackedSeqParams:
    """THD boundaries for transformer-engine attention (documents never attend to each other)."""
    doc = batch.document_ids[0]
    change = torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1
    cu = torch.cat([torch.tensor([0]), change, torch.tensor([doc.numel()])]).to(torch.int32).to(doc.device)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def make_forward_step(use_thd: bool, device: torch.device, n_sources: int):
    """megatron's forward_step_func; ``forward_step.poison`` (fault injection) NaNs the loss."""
    speech = torch.tensor([SEGMENTS.index(s) for s in SPEECH_SEGMENTS], device=device)

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(device, non_blocking=True)
        if use_thd:
            out = model(batch.tokens, batch.position_ids, None, labels=batch.labels,
                        packed_seq_params=packed_seq_params(batch))
        else:
            out = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels)
        return out, partial(_loss_func, batch, speech, n_sources, forward_step.poison)

    forward_step.poison = False
    return forward_step


def _local_stats(run, batches: list, losses: list) -> StepStats:
    """This rank's contribution to the step statistics."""
    lay = run.layout
    n_src = len(run.loader.sources)
    stats = StepStats(source_sums=[0.0] * n_src, source_counts=[0.0] * n_src)
    loss_sum = None
    if losses:
        report = sum(entry["lm"].double().cpu() for entry in losses)  # CPU-GPU sync point (last stage)
        loss_sum = report[0]
        if lay.tp_rank == 0:
            stats.add_report(report, n_src)
    if lay.tp_rank == 0 and lay.pp_rank == 0:
        loader_stats = run.loader.stats
        stats.tokens = sum(b.n_tokens for b in batches)
        stats.docs = sum(len(row) for b in batches for row in b.sample_keys)
        stats.audio_s = sum(b.audio_seconds for b in batches)
        stats.bad_samples = loader_stats.get("skipped_bad_sample", 0)
        stats.bad_shards = loader_stats.get("skipped_bad_shard", 0)
    if run.cfg.guard.enabled:
        stats.nonfinite = float(run.guard.prepare(run.model, loss_sum).item())
    # The stop-signal flag rides in the statistics all-reduce, which already spans the world
    # (TP/PP/DP: every rank must stop at the same step), instead of a collective of its own.
    stats.stop = 1.0 if signals.requested() else 0.0
    stats.lock_lost = 1.0 if run.lock is not None and run.lock.lost else 0.0
    return stats


def _all_reduce(run, stats: StepStats) -> StepStats:
    if not dist.is_initialized():
        return stats
    # CPU-GPU sync point, the one per step (megatron's grad-norm reduction aside): global loss,
    # token counts and the guard's non-finite flag, so that every rank decides alike.
    # (NCCL reduces device tensors only; on gloo the device is the CPU.)
    t = stats.to_tensor().to(run.layout.device)
    with run.monitor.span("stats_sync"):  # time spent waiting for peers: not this rank's own work
        dist.all_reduce(t)
    return StepStats.from_tensor(t.cpu(), len(stats.source_sums))


def train_step(run, batches: list, forward_step) -> StepResult:
    """One optimizer step over this rank's micro-batches, guarded. Returns global statistics."""
    cfg, lay, mon, hooks = run.cfg, run.layout, run.monitor, run.hooks
    step = run.state.step + 1
    # (timing: forward_backward ends after the statistics all-reduce, the step's sync point, so
    # that on GPU the queued forward/backward work is counted here and not in the optimizer)
    with mon.phase("forward_backward"):
        hooks.boundary("forward_backward", step)
        for m in run.model:
            m.zero_grad_buffer()
        run.optimizer.zero_grad()
        hooks.before_forward(run, step, forward_step)
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
        hooks.boundary("optimizer", step)
        hooks.after_backward(run, step)
        stats = _all_reduce(run, _local_stats(run, batches, losses))
    with mon.phase("optimizer"):
        verdict = run.guard.judge(step, stats.nonfinite, stats.loss) if cfg.guard.enabled else Verdict(apply=True)
        applied, grad_norm = False, float("nan")
        if verdict.apply:
            applied, norm, _ = run.optimizer.step()
            if applied:
                run.scheduler.step(increment=1)
            grad_norm = float(norm) if norm is not None else float("nan")
        elif lay.tp_rank == 0 and lay.pp_rank == 0:
            # Dropped: no parameter, optimizer or scheduler state changes; the gradient buffers
            # are zeroed at the start of the next step.
            keys = [k for b in batches for row in b.sample_keys for k in row]
            log.warning("step %d skipped (%s, dp rank %d): samples %s", step, verdict.reason, lay.dp_rank, keys)
    return StepResult(applied=bool(applied), verdict=verdict, grad_norm=grad_norm, stats=stats)


def stats_fields(stats: StepStats, sources: list[str]) -> dict[str, Any]:
    """The loss fields of a metrics record."""
    return {
        "loss": stats.loss,
        "loss_speech": stats.speech_sum / stats.n_speech if stats.n_speech else None,
        "loss_text": stats.text_sum / stats.n_text if stats.n_text else None,
        "loss_by_source": {name: total / n if n else None
                           for name, total, n in zip(sources, stats.source_sums, stats.source_counts)},
    }
