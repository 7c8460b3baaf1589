"""Validation loss (eval.interval): the same batches of data.valid_paths every time, forward only,
summed over every rank like the training statistics; the record gets val_loss, val_loss_speech,
val_loss_text and val_loss_by_source. A validation sample that is also a training sample is refused
at start (compared by sample key)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megatron_tts.compat.mcore import get_forward_backward_func
from megatron_tts.train.hooks import Hook, StepEnd
from megatron_tts.train.step import StepStats, make_forward_step, stats_fields

log = logging.getLogger("megatron_tts")


class ValidationOverlap(ValueError):
    """Validation data that the run also trains on (a user error: exit 3)."""


KEY_CHECK_MAX_SAMPLES = 4_000_000  # above this, reading every training sidecar costs more than a start-up should


def check_disjoint(valid, train, key_check_max: int = KEY_CHECK_MAX_SAMPLES) -> None:
    """Refuse validation data that the run also trains on: a shard whose bytes are a training
    shard's (always; O(shards)), or a sample key that is a training sample's (keys are stable ids;
    O(samples) of sidecar reads, so only while the training data has at most ``key_check_max``).
    Rank 0 reads, every rank raises the same error."""
    problem = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        problem = _overlap(valid, train, key_check_max)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ValidationOverlap(problem)


def _overlap(valid, train, key_check_max: int) -> str | None:
    shared = valid.shard_digests() & train.shard_digests()
    if shared:
        return (f"{len(shared)} validation shard(s) are training shards too (same sha256): validation would not "
                "measure held-out data; use disjoint data.valid_paths")
    if train.dataset_samples > key_check_max:
        log.info("validation data: no training shard among its shards; sample keys not compared (%d training "
                 "samples > %d)", train.dataset_samples, key_check_max)
        return None
    valid_keys = set(valid.sample_keys())
    overlap = sorted(k for k in train.sample_keys() if k in valid_keys)
    if overlap:
        return (f"{len(overlap)} validation sample(s) are training samples too (e.g. {overlap[0]}): validation would "
                "not measure held-out data; use disjoint data.valid_paths")
    return None


class Evaluation(Hook):
    def __init__(self, run, loader) -> None:
        self.loader = loader
        self.start = loader.state_dict()  # every evaluation reads the same batches
        self.forward_step = make_forward_step(False, run.layout.device, len(loader.sources))

    def on_step_end(self, run, end: StepEnd) -> None:
        if end.step % run.cfg.eval.interval and not end.last:
            return
        end.extra.update(self.evaluate(run))

    @torch.no_grad()
    def evaluate(self, run) -> dict:
        cfg = run.cfg
        self.loader.load_state_dict(self.start)
        n_src = len(self.loader.sources)
        total = StepStats(source_sums=[0.0] * n_src, source_counts=[0.0] * n_src)
        for m in run.model:
            m.eval()
        try:
            for _ in range(cfg.eval.batches):
                batches = self.loader.next_step()
                n_chunks = len(run.model)
                iters = [iter(batches) for _ in range(n_chunks)]
                losses = get_forward_backward_func()(
                    forward_step_func=self.forward_step, data_iterator=iters if n_chunks > 1 else iters[0],
                    model=run.model if n_chunks > 1 else run.model[0], num_microbatches=len(batches),
                    seq_length=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size, forward_only=True)
                if losses and run.layout.tp_rank == 0:
                    total.add_report(sum(e["lm"].double().cpu() for e in losses), n_src)
        finally:
            for m in run.model:
                m.train()
        t = total.to_tensor().to(run.layout.device)
        if dist.is_initialized():
            dist.all_reduce(t)  # every rank: the losses of the last stage's TP rank 0 of each DP rank
        stats = StepStats.from_tensor(t.cpu(), n_src)
        fields = stats_fields(stats, self.loader.sources)
        return {f"val_{k}": v for k, v in fields.items()}
