"""Packed, resumable, DP-elastic loader over WebDataset token shards.

The global pack sequence is a pure function of (datasets, seed, seq_len, layout, tokenizer,
pack_window, weights, sample order) -- see :mod:`data_pipeline.mixing`. The trainer consumes
``global_batch_size`` packs per optimizer step; for the step starting at global pack cursor ``c``,
DP rank ``r`` takes packs ``c + r * per_rank + j``. Its micro-batch ``m`` of step ``t`` is read by
worker thread ``(t * micro_batches + m) % num_workers``. The state is a position in that
sequence (each stream's epoch and place, the pack offset in the window), so it survives DP-size
and worker-count changes: the epoch goes on with no sample lost or repeated.

Planning reads the compact indexes' columns of the shards the plan reaches (never a tar);
materialising reads this rank's samples by byte range (ranges adjacent in a tar coalesced).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from . import shards
from .batch import Batch, PackRow, _collate, build_attention_mask, build_pack_row  # noqa: F401
from .layouts import Layout, LayoutError
from .loader_state import STATE_VERSION, StateMixin
from .mixing import Carry, NoPacks, Pack, PackStream, Planner, Position, WindowPlan
from .pack_reader import Counters, MicroBatch, PackReader
from .packing import PACKER_HYBRID
from .samples import SampleInfo
from .sources import DataConfigError, SourceSpec, load_sources
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

__all__ = ["Batch", "DataConfigError", "PackRow", "PackedLoader", "SourceSpec", "STATE_VERSION", "assignment",
           "build_attention_mask", "build_pack_row"]

_STARVED_WARN_S = 60.0
_TOO_LONG_WARNINGS = 5  # samples longer than seq_len logged one by one


@dataclass
class _Step:
    """One planned optimizer step of this rank: its micro-batches being read, and what consuming
    it changes."""

    jobs: list[Future]
    end: Position
    end_cursor: int
    global_docs: int
    global_tokens: int
    by_source: np.ndarray  # [n_sources, 3]: tokens, docs, audio seconds of the global step
    counters: Counters


@dataclass
class _Failure:
    exc: BaseException


@dataclass
class _Gen:
    """Generation state owned by whichever thread produces steps."""

    stream: PackStream
    cursor: int
    pending: Counters = field(default_factory=Counters)


def assignment(pack_id: int, step_cursor: int, global_batch_size: int, dp_size: int, micro_batch_size: int,
               num_workers: int) -> tuple[int, int]:
    """(DP rank, worker thread) that reads global pack ``pack_id`` of the step starting at pack
    ``step_cursor``: the one partition of every step over ranks x workers."""
    per_rank = global_batch_size // dp_size
    i = pack_id - step_cursor
    if not 0 <= i < global_batch_size:
        raise ValueError(f"pack {pack_id} is not in the step starting at {step_cursor}")
    rank, j = divmod(i, per_rank)
    step_no = step_cursor // global_batch_size
    return rank, (step_no * (per_rank // micro_batch_size) + j // micro_batch_size) % num_workers


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class PackedLoader(StateMixin):
    """Packed sequences for one DP rank; see the module docstring for the contract.

    Args:
        paths: dataset directories or index.json URLs (local or s3://): one unweighted stream.
        sources: instead of ``paths``, weighted sources (``SourceSpec`` or dicts with paths,
            weight, name): blended by weight, each with its own epochs.
        layout: token layout (single-stream).
        tokenizer: text tokenizer.
        seq_len: packed row length.
        micro_batch_size: rows per Batch.
        global_batch_size: packs per optimizer step over all DP ranks.
        dp_rank, dp_size: this rank's data-parallel coordinates.
        seed: order seed.
        pack_window: samples per packing window.
        num_workers: reader threads per rank.
        prefetch: steps produced ahead by a background thread (0 = synchronous).
        pad_id: token id used for padding (never a target).
        sample_order: 'shuffle' (packs of a window in a seeded order) or 'duration' (shortest
            utterances first within each window: a curriculum).
        fast_read: decode samples in place (False: the generic tar parser for every sample, as a
            cross-check and for benchmarks).
    """

    def __init__(
        self,
        paths: Sequence[str] | str | None = None,
        *,
        sources: Optional[Sequence[SourceSpec | dict]] = None,
        layout: Layout,
        tokenizer: TextTokenizer,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        pack_window: int = 1024,
        num_workers: int = 2,
        prefetch: int = 2,
        pad_id: int = 0,
        sample_order: str = "shuffle",
        fast_read: bool = True,
    ) -> None:
        if isinstance(paths, str):
            paths = [paths]
        if paths is not None and sources is not None:
            raise DataConfigError("give exactly one of paths (unweighted) or sources (weighted)")
        if paths is None and sources is None or (paths is not None and not paths):
            raise DataConfigError("PackedLoader needs at least one dataset path")
        for name, v in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                        ("global_batch_size", global_batch_size), ("pack_window", pack_window),
                        ("num_workers", num_workers)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if getattr(layout, "n_streams", 1) != 1:
            raise DataConfigError(
                f"layout {layout.name!r} has n_streams={layout.n_streams}; PackedLoader emits [B, S] token rows "
                "and supports single-stream layouts only"
            )
        if tokenizer.vocab_size > layout.vocab.text_vocab_size:
            raise DataConfigError(
                f"tokenizer {tokenizer.name!r} has vocab_size {tokenizer.vocab_size} but the layout's text vocab "
                f"is {layout.vocab.text_vocab_size}: text ids would fall into the special/speech id ranges"
            )
        specs = None if sources is None else [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in sources]
        self.paths = list(paths) if paths is not None else [p for s in specs for p in s.paths]
        self.layout = layout
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.pack_window = int(pack_window)
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.pad_id = int(pad_id)
        self.sample_order = sample_order
        self._check_dp(dp_rank, dp_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)

        self._src = load_sources(None if paths is None else self.paths, specs, self.seed, self._check_codec,
                                 tokenizer)
        self.sources = self._src.names  # metric sources: Batch.source indexes into this list
        try:
            self._codec = shards.codec_identity(self._src.codec)
            self._dataset_fingerprint = self._src.fingerprint()
            if self._src.n_samples == 0:
                raise DataConfigError(f"dataset(s) {', '.join(self.paths)} contain no samples")
            self._info = SampleInfo(self._src, layout, tokenizer)
            self._reader = PackReader(self._src, self._info, layout, tokenizer, self.seq_len, self.pad_id, fast_read)
            self._packer = PACKER_HYBRID  # a resumed state may say otherwise (loader_state)
            self._planner = self._make_planner()
        except BaseException:
            self._src.close()  # (the compact indexes' file descriptors)
            raise

        # Consumed state: only next_step() (and load_state_dict) advance it.
        self._position = Position(self._planner.start())
        self._carry: Optional[Carry] = None
        self._cursor = 0
        self._consumed_docs = 0
        self._consumed_tokens = 0
        self._by_source = np.zeros((len(self.sources), 3))

        self._counters = Counters()
        self._bad_shards: set[str] = set()
        self._last_eff = 0.0
        self._last_rank_eff = 0.0
        self._rank_tokens = 0
        self._rank_packs = 0
        self._plan_logged = False
        self._too_long_seen = 0

        # one single-thread executor per worker: micro-batch m goes to a known worker
        self._workers = [ThreadPoolExecutor(1, thread_name_prefix=f"loader-worker{w}")
                         for w in range(self.num_workers)] if self.num_workers > 1 else []
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._sync_gen: _Gen | None = None
        self._failure: BaseException | None = None
        self._closed = False
        logger.info(
            "PackedLoader: %d shards, %d samples from %s (%s); seq_len=%d gbs=%d mbs=%d dp=%d/%d; index reads %d bytes",
            self._src.n_shards, self._src.n_samples, ", ".join(self.paths),
            ", ".join(f"{s.name} x{s.weight:g}" for s in self._src.streams), self.seq_len, self.global_batch_size,
            self.micro_batch_size, self.dp_rank, self.dp_size, self._src.bytes_read,
        )

    # ------------------------------------------------------------------ setup

    def _make_planner(self) -> Planner:
        return Planner(self._src.streams, self._info.lengths, self._info.seconds, self.seq_len, self.pack_window,
                       self.seed, packer=self._packer, sample_order=self.sample_order)

    def _check_dp(self, dp_rank: int, dp_size: int) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"invalid dp_rank={dp_rank} for dp_size={dp_size}")
        if self.global_batch_size % (self.micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size * dp_size = "
                f"{self.micro_batch_size} * {dp_size}; choose a global_batch_size that is a multiple of "
                f"{self.micro_batch_size * dp_size} (or change micro_batch_size / the data-parallel size)"
            )

    @property
    def dataset_samples(self) -> int:
        """Samples in every dataset (each counted once, whatever the mixing weights)."""
        return self._src.n_samples

    def shard_digests(self) -> set[str]:
        """The sha256 of every shard of every dataset (O(shards), from the compact indexes)."""
        return {h for d in self._src.datasets for h in d.index.shard_sha256()}

    def sample_keys(self) -> Iterator[str]:
        """Every sample key of the datasets (stable ids), from the shards' sidecars: O(samples),
        so meant for datasets of a few million samples at most (e.g. validation data)."""
        for d in self._src.datasets:
            for s in range(d.index.n_shards):
                yield from (e.key for e in shards.load_shard_index(d.index.shard_url(s)).samples)

    def codec_identity(self) -> dict:
        """The codec every dataset of this loader was tokenized with (identical across them)."""
        return dict(self._codec)

    def _check_codec(self, path: str, codec: dict) -> None:
        n_q = codec.get("n_q")
        if n_q is not None:
            try:
                self.layout.length(0, 1, int(n_q))
            except LayoutError as e:
                raise DataConfigError(f"dataset {path} (codec n_q={n_q}) does not fit layout {self.layout.name!r}: {e}") from e
        cb = codec.get("codebook_size")
        if cb is not None and int(cb) > self.layout.vocab.codebook_size:
            # Not a per-sample problem: most samples of such a dataset would be dropped.
            raise DataConfigError(
                f"dataset {path} has codec codebook_size {cb} > model.vocab.codebook_size="
                f"{self.layout.vocab.codebook_size}; set model.vocab.codebook_size={cb} or use data "
                f"tokenized with a {self.layout.vocab.codebook_size}-entry codec")

    # --------------------------------------------------------------- planning

    def _on_window(self, gen: _Gen, plan: WindowPlan) -> None:
        for t in plan.too_long:
            gen.pending.skipped_too_long += 1
            self._too_long_seen += 1
            if self._too_long_seen <= _TOO_LONG_WARNINGS:  # then counted (skipped_too_long) and summarised
                self._reader.warn_sample(
                    t.shard, t.index,
                    f"is {t.length} tokens > seq_len={self.seq_len}; skipped (raise data.seq_len or split the utterance)"
                    + ("; further ones are counted in skipped_too_long, not logged one by one"
                       if self._too_long_seen == _TOO_LONG_WARNINGS else ""),
                )
        n_invalid = plan.n_samples - sum(p.n_docs for p in plan.packs) - len(plan.too_long)
        gen.pending.skipped_bad_sample += n_invalid
        level = logging.INFO if not self._plan_logged else logging.DEBUG
        self._plan_logged = True
        if logger.isEnabledFor(level):
            logger.log(level, "packing plan: epoch %d, window at %s: %d samples -> %d packs of %d tokens, efficiency %.4f",
                       plan.epoch, ", ".join(f"{s.name} {st.epoch}:{st.pos}" for s, st in
                                             zip(self._src.streams, plan.start)),
                       plan.n_samples, len(plan.packs), self.seq_len, plan.efficiency(self.seq_len))

    def _new_gen(self) -> _Gen:
        gen = _Gen(stream=PackStream(self._planner, self._position, carry=self._carry), cursor=self._cursor)
        gen.stream.on_window = functools.partial(self._on_window, gen)
        return gen

    def _plan_step(self, gen: _Gen) -> tuple[list[Pack], list[int], list[int], dict]:
        """The global step at ``gen``'s cursor: this rank's packs (with pack ids and epochs) and
        the global step's totals."""
        per_rank = self.global_batch_size // self.dp_size
        lo, hi = self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank
        mine: list[Pack] = []
        ids: list[int] = []
        epochs: list[int] = []
        all_shards: list[int] = []
        all_lengths: list[int] = []
        all_seconds: list[float] = []
        for i in range(self.global_batch_size):
            try:
                pack, epoch, _ = gen.stream.next_pack()
            except NoPacks as e:
                raise DataConfigError(f"{e} [datasets: {', '.join(self.paths)}]") from None
            all_shards.extend(pack.shards)
            all_lengths.extend(pack.lengths)
            all_seconds.extend(pack.seconds)
            if lo <= i < hi:
                mine.append(pack)
                ids.append(gen.cursor + i)
                epochs.append(epoch)
        src = self._src.shard_source[np.asarray(all_shards, np.int64)]
        n = len(self.sources)
        by_source = np.stack([np.bincount(src, weights=np.asarray(all_lengths, np.float64), minlength=n),
                              np.bincount(src, minlength=n).astype(np.float64),
                              np.bincount(src, weights=np.asarray(all_seconds, np.float64), minlength=n)], axis=1)
        totals = {"docs": len(all_lengths), "tokens": int(sum(all_lengths)), "by_source": by_source}
        return mine, ids, epochs, totals

    # ---------------------------------------------------------- materialising

    def _build_step(self, gen: _Gen) -> _Step:
        step_no = gen.cursor // self.global_batch_size
        mine, ids, epochs, totals = self._plan_step(gen)
        mbs = self.micro_batch_size
        n_micro = len(mine) // mbs
        jobs = []
        for m in range(n_micro):
            args = (mine[m * mbs:(m + 1) * mbs], ids[m * mbs:(m + 1) * mbs], epochs[m * mbs:(m + 1) * mbs])
            if self._workers:
                worker = (step_no * n_micro + m) % self.num_workers  # = assignment(ids[m * mbs], ...)[1]
                jobs.append(self._workers[worker].submit(self._reader.micro_batch, *args))
            else:
                jobs.append(_done(self._reader.micro_batch(*args)))
        gen.cursor += self.global_batch_size
        counters = gen.pending
        gen.pending = Counters()
        return _Step(jobs=jobs, end=gen.stream.position, end_cursor=gen.cursor, global_docs=totals["docs"],
                     global_tokens=totals["tokens"], by_source=totals["by_source"], counters=counters)

    def read_plan(self, n_steps: int) -> list[list[tuple[str, int, int]]]:
        """What this rank would read for its next ``n_steps`` steps, without reading or consuming
        anything: per step, the (shard URL, start, end) byte ranges (a dry run of the plan)."""
        gen = self._new_gen()
        gen.stream.on_window = None
        out = []
        for _ in range(n_steps):
            mine, _, _, _ = self._plan_step(gen)
            gen.cursor += self.global_batch_size
            out.append([(self._src.shard_url(s), a, b) for s, _, spans in self._reader.read_spans(mine)
                        for a, b in spans])
        return out

    # ---------------------------------------------------------------- prefetch

    def _produce(self, gen: _Gen, q: queue.Queue, stop: threading.Event) -> None:
        item: _Step | _Failure
        try:
            while not stop.is_set():
                item = self._build_step(gen)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            failure = _Failure(e)
            while not stop.is_set():
                try:
                    q.put(failure, timeout=0.05)
                    return
                except queue.Full:
                    continue

    def _start(self) -> None:
        if self.prefetch == 0:
            if self._sync_gen is None:
                self._sync_gen = self._new_gen()
            return
        if self._thread is not None:
            return
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(self._new_gen(), self._queue, self._stop),
            name=f"loader-prefetch-r{self.dp_rank}", daemon=True,
        )
        self._thread.start()

    def _reset(self) -> None:
        """Drop every produced-but-unconsumed step; production restarts from the consumed position."""
        dropped: list[Future] = []
        if self._thread is not None:
            assert self._stop is not None and self._queue is not None
            self._stop.set()
            while self._thread.is_alive():
                try:
                    item = self._queue.get(timeout=0.05)
                    if isinstance(item, _Step):
                        dropped += item.jobs
                except queue.Empty:
                    pass
            self._thread.join()
        for f in dropped:
            f.cancel()
        self._thread = self._queue = self._stop = None
        self._sync_gen = None
        self._failure = None

    def _wait(self, jobs: list[Future]) -> list[MicroBatch]:
        waited, warn_at = 0.0, _STARVED_WARN_S
        while True:
            _, pending = wait(jobs, timeout=1.0)
            if not pending:
                return [f.result() for f in jobs]
            waited += 1.0
            if waited >= warn_at:
                # a hung read (object store, network file system) shows up here, not as a silent stall
                logger.warning("data loader rank %d/%d: waited %.0f s for the step at pack %d (epoch %d); "
                               "%d of its micro-batches are still being read", self.dp_rank, self.dp_size, waited,
                               self._cursor, self._epoch, len(pending))
                warn_at *= 2

    # -------------------------------------------------------------------- API

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step."""
        if self._closed:
            raise RuntimeError("PackedLoader is closed")
        if self._failure is not None:
            raise self._failure
        self._start()
        try:
            if self.prefetch == 0:
                assert self._sync_gen is not None
                step = self._build_step(self._sync_gen)
            else:
                step = self._next_produced()
            results = self._wait(step.jobs)
        except BaseException as e:
            self._failure = e  # the generator may be half-way through a step: never continue from it
            raise
        self._apply(step, results)
        return [r.batch for r in results]

    def _next_produced(self) -> _Step:
        assert self._queue is not None and self._thread is not None
        waited, warn_at = 0.0, _STARVED_WARN_S
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("loader prefetch thread exited without a result") from None
                waited += 1.0
                if waited >= warn_at:
                    logger.warning("data loader rank %d/%d: waited %.0f s for the step at pack %d (epoch %d); "
                                   "the prefetch thread is still planning", self.dp_rank, self.dp_size, waited,
                                   self._cursor, self._epoch)
                    warn_at *= 2
        if isinstance(item, _Failure):
            raise item.exc
        return item

    @property
    def _epoch(self) -> int:
        return self._planner.epoch_of(self._position.streams)

    def _apply(self, step: _Step, results: list[MicroBatch]) -> None:
        before = self._epoch
        self._position = step.end
        if self._carry is not None and self._position.streams != self._carry.start:
            self._carry = None  # the window begun under the old mixture is done
        self._cursor = step.end_cursor
        self._consumed_docs += step.global_docs
        self._consumed_tokens += step.global_tokens
        self._by_source += step.by_source
        self._counters.add(step.counters)
        rank_tokens = 0
        for r in results:
            self._counters.add(r.counters)
            self._bad_shards.update(r.bad_shards)
            rank_tokens += r.batch.n_tokens
        rank_packs = self.global_batch_size // self.dp_size
        self._last_eff = step.global_tokens / (self.global_batch_size * self.seq_len)
        self._last_rank_eff = rank_tokens / (rank_packs * self.seq_len)
        self._rank_tokens += rank_tokens
        self._rank_packs += rank_packs
        if self._epoch != before:
            s = self.stats
            logger.info(
                "data epoch %d complete; now in epoch %d (consumed %d packs, %d docs; packing efficiency %.4f, "
                "skipped: %d too long, %d damaged samples, %d in unreadable shards)",
                self._epoch - 1, self._epoch, s["consumed_packs"], s["consumed_docs"],
                s["pack_efficiency_cumulative"], s["skipped_too_long"], s["skipped_bad_sample"], s["skipped_bad_shard"],
            )

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of the consumed steps. pack_efficiency* are over the global packs (planned tokens);
        rank_pack_efficiency* over this rank's rows after damaged samples were dropped. *_by_source:
        the planned documents of the global steps, per source name."""
        by = self._by_source
        return {
            "pack_efficiency": self._last_eff,
            "pack_efficiency_cumulative": (self._consumed_tokens / (self._cursor * self.seq_len)) if self._cursor else 0.0,
            "rank_pack_efficiency": self._last_rank_eff,
            "rank_pack_efficiency_cumulative": (self._rank_tokens / (self._rank_packs * self.seq_len))
            if self._rank_packs else 0.0,
            "skipped_too_long": self._counters.skipped_too_long,
            "skipped_bad_sample": self._counters.skipped_bad_sample,
            "skipped_bad_shard": self._counters.skipped_bad_shard,
            "bad_shards": sorted(self._bad_shards),
            "epoch": self._epoch,
            "epochs_by_source": {s.name: st.epoch for s, st in zip(self._src.streams, self._position.streams)},
            "consumed_packs": self._cursor,
            "consumed_docs": self._consumed_docs,
            "consumed_tokens": self._consumed_tokens,
            "tokens_by_source": {n: int(by[i, 0]) for i, n in enumerate(self.sources)},
            "audio_hours_by_source": {n: float(by[i, 2]) / 3600.0 for i, n in enumerate(self.sources)},
        }

    @property
    def n_samples(self) -> int:
        """Samples per epoch of every weighted source (before any skipping)."""
        return self._planner.samples_per_pass

    @property
    def index_bytes_read(self) -> int:
        """Bytes read from the compact indexes so far (start-up and planning)."""
        return self._src.bytes_read

    def close(self) -> None:
        """Stop the prefetch thread and the workers; idempotent."""
        if self._closed:
            return
        self._reset()
        for w in self._workers:
            w.shutdown(wait=True, cancel_futures=True)
        self._src.close()
        self._closed = True

    def __enter__(self) -> "PackedLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
