"""Packed, resumable, DP-elastic loader over WebDataset token shards.

The global pack sequence is a pure function of (dataset, seed, seq_len, layout,
tokenizer, pack_window) — see :mod:`data_pipeline.packing`. The trainer consumes
``global_batch_size`` packs per optimizer step; for the step starting at global
pack cursor ``c``, DP rank ``r`` takes packs ``c + r * per_rank + j``. The state
is a position in that sequence, so it survives DP-size changes: the epoch goes on
with no sample lost or repeated.

Planning reads only the sidecar indexes (text, n_frames, byte ranges); tars are
opened only to materialise this rank's packs, one byte range per sample (ranges
adjacent in the tar are coalesced into one read).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from storage import fs

from . import shards
from .batch import Batch, PackRow, _collate, build_attention_mask, build_pack_row  # noqa: F401
from .byte_ranges import coalesce, fetch_spans
from .layouts import Encoded, Layout, LayoutError
from .packing import NoPacks, GlobalOrder, Pack, PackPlanner, PackStream, Position, WindowPlan
from .sources import DataConfigError, load_sources
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

__all__ = ["Batch", "DataConfigError", "PackRow", "PackedLoader", "build_attention_mask", "build_pack_row"]

STATE_VERSION = 1
_MAX_COALESCED_READ = 64 << 20
_READ_RETRIES = 3
_INDEX_THREADS = 16
_STARVED_WARN_S = 60.0
_TOO_LONG_WARNINGS = 5  # samples longer than seq_len logged one by one


@dataclass
class _Counters:
    skipped_too_long: int = 0
    skipped_bad_sample: int = 0
    skipped_bad_shard: int = 0

    def add(self, other: "_Counters") -> None:
        self.skipped_too_long += other.skipped_too_long
        self.skipped_bad_sample += other.skipped_bad_sample
        self.skipped_bad_shard += other.skipped_bad_shard


@dataclass
class _Step:
    """One produced optimizer step for this rank, plus what consuming it changes."""

    batches: list[Batch]
    end: Position
    end_cursor: int
    global_docs: int
    global_tokens: int
    rank_tokens: int
    rank_packs: int
    counters: _Counters
    bad_shards: list[str]


@dataclass
class _Failure:
    exc: BaseException


@dataclass
class _Gen:
    """Generation state owned by whichever thread produces steps."""

    stream: PackStream
    cursor: int
    pending: _Counters = field(default_factory=_Counters)


class PackedLoader:
    """Packed sequences for one DP rank; see the module docstring for the contract.

    Args:
        paths: dataset directories or index.json URLs (local or s3://).
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
    """

    def __init__(
        self,
        paths: Sequence[str] | str,
        *,
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
    ) -> None:
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
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
        self.paths = list(paths)
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
        self._check_dp(dp_rank, dp_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)

        src = load_sources(self.paths, self._check_codec)
        self.sources = src.names  # one name per entry of paths: its dataset name (index.json)
        self._shard_urls, self._indexes = src.shard_urls, src.indexes
        self._shard_source, self._frame_rates = src.shard_source, src.frame_rates
        self._codec = shards.codec_identity(src.codecs[0])
        self._shard_names = [fs.basename(u) for u in self._shard_urls]
        self._dataset_fingerprint = self._fingerprint()
        sizes = [len(ix.samples) for ix in self._indexes]
        if sum(sizes) == 0:
            raise DataConfigError(f"dataset(s) {', '.join(self.paths)} contain no samples")
        self._lengths = [np.zeros(n, dtype=np.int32) for n in sizes]  # 0 = not computed yet
        self._planner = PackPlanner(GlobalOrder(sizes, self.seed), self._length_fn, self.seq_len, self.pack_window)

        # Consumed state: only next_step() advances it.
        self._position = Position()
        self._cursor = 0
        self._consumed_docs = 0
        self._consumed_tokens = 0

        self._counters = _Counters()
        self._bad_shards: set[str] = set()
        self._last_eff = 0.0
        self._last_rank_eff = 0.0
        self._rank_tokens = 0
        self._rank_packs = 0

        self._log_lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()
        self._warned_shards: set[str] = set()
        self._plan_logged = False
        self._too_long_seen = 0

        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="loader-worker") if self.num_workers > 1 else None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._sync_gen: _Gen | None = None
        self._failure: BaseException | None = None
        self._closed = False
        logger.info(
            "PackedLoader: %d shards, %d samples from %s; seq_len=%d gbs=%d mbs=%d dp=%d/%d",
            len(self._shard_urls), sum(sizes), ", ".join(self.paths), self.seq_len, self.global_batch_size,
            self.micro_batch_size, self.dp_rank, self.dp_size,
        )

    # ------------------------------------------------------------------ setup

    def _check_dp(self, dp_rank: int, dp_size: int) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"invalid dp_rank={dp_rank} for dp_size={dp_size}")
        if self.global_batch_size % (self.micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size * dp_size = "
                f"{self.micro_batch_size} * {dp_size}; choose a global_batch_size that is a multiple of "
                f"{self.micro_batch_size * dp_size} (or change micro_batch_size / the data-parallel size)"
            )

    def sample_keys(self):
        """Every sample key of the datasets (stable ids; e.g. to prove validation data disjoint)."""
        for ix in self._indexes:
            for s in ix.samples:
                yield s.key

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

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, ix in zip(self._shard_names, self._indexes):
            h.update(f"{name}\0{len(ix.samples)}\0{ix.sha256}\n".encode())
        return h.hexdigest()[:16]

    def _key(self, shard: int, index: int) -> str:
        return f"{self._shard_names[shard]}:{self._indexes[shard].samples[index].key}"

    # --------------------------------------------------------------- planning

    def _length_fn(self, shard_ids: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Token length of each sample (-1: cannot be laid out); tokenises each text once."""
        pairs = list(zip(shard_ids.tolist(), indices.tolist()))
        missing = [(s, k) for s, k in pairs if self._lengths[s][k] == 0]
        if missing:
            texts = [self._indexes[s].samples[k].text for s, k in missing]
            batch = getattr(self.tokenizer, "encode_batch", None)
            ids = batch(texts) if batch is not None else [self.tokenizer.encode(t) for t in texts]
            for (s, k), text_ids in zip(missing, ids):
                entry = self._indexes[s].samples[k]
                try:
                    n = self.layout.length(len(text_ids), entry.n_frames, entry.n_q)
                except LayoutError as e:
                    self._warn_sample(s, k, f"cannot be laid out ({e}); skipped")
                    n = -1
                self._lengths[s][k] = n
        return np.fromiter((self._lengths[s][k] for s, k in pairs), dtype=np.int64, count=len(pairs))

    def _on_window(self, gen: _Gen, plan: WindowPlan) -> None:
        for t in plan.too_long:
            gen.pending.skipped_too_long += 1
            self._too_long_seen += 1
            if self._too_long_seen <= _TOO_LONG_WARNINGS:  # then counted (skipped_too_long) and summarised
                self._warn_sample(
                    t.shard, t.index,
                    f"is {t.length} tokens > seq_len={self.seq_len}; skipped (raise data.seq_len or split the utterance)"
                    + ("; further ones are counted in skipped_too_long, not logged one by one"
                       if self._too_long_seen == _TOO_LONG_WARNINGS else ""),
                )
        n_invalid = plan.n_samples - sum(p.n_docs for p in plan.packs) - len(plan.too_long)
        gen.pending.skipped_bad_sample += n_invalid
        if not self._plan_logged:
            self._plan_logged = True
            logger.info(
                "packing plan: epoch %d window %d: %d samples -> %d packs of %d tokens, efficiency %.4f",
                plan.epoch, plan.window, plan.n_samples, len(plan.packs), self.seq_len, plan.efficiency(self.seq_len),
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "planned epoch %d window %d: %d samples -> %d packs, efficiency %.4f",
                plan.epoch, plan.window, plan.n_samples, len(plan.packs), plan.efficiency(self.seq_len),
            )

    def _warn_sample(self, shard: int, index: int, what: str) -> None:
        key = (self._shard_names[shard], self._indexes[shard].samples[index].key)
        with self._log_lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning("sample %s of shard %s %s", key[1], self._shard_urls[shard], what)

    def _new_gen(self) -> _Gen:
        gen = _Gen(stream=PackStream(self._planner, self._position), cursor=self._cursor)
        gen.stream.on_window = functools.partial(self._on_window, gen)
        return gen

    # ---------------------------------------------------------- materialising

    def _read_docs(self, packs: list[Pack]) -> tuple[dict[tuple[int, int], Encoded | None], _Counters, set[str]]:
        """Read, parse and encode every document of ``packs``; damaged ones map to None."""
        counters = _Counters()
        bad_shards: set[str] = set()
        wanted: dict[int, set[int]] = {}
        for p in packs:
            for s, k in zip(p.shards, p.indices):
                wanted.setdefault(s, set()).add(k)
        out: dict[tuple[int, int], Encoded | None] = {}
        for s in sorted(wanted):
            entries = self._indexes[s].samples
            runs = coalesce(sorted(wanted[s], key=lambda k: entries[k].offset), entries)
            spans = [(entries[r[0]].offset, entries[r[-1]].offset + entries[r[-1]].length) for r in runs]
            try:
                blobs = fetch_spans(self._shard_urls[s], spans)
            except (fs.FsError, shards.ShardError) as e:
                n = sum(len(r) for r in runs)
                out.update({(s, k): None for r in runs for k in r})
                counters.skipped_bad_shard += n
                bad_shards.add(self._shard_names[s])
                self._warn_shard(s, e)
                continue
            for run, (start, _), blob in zip(runs, spans, blobs):
                for k in run:
                    lo = entries[k].offset - start
                    out[(s, k)] = self._decode(s, k, blob[lo : lo + entries[k].length], counters)
        return out, counters, bad_shards

    def _decode(self, s: int, k: int, data: bytes, counters: _Counters) -> Encoded | None:
        entry = self._indexes[s].samples[k]
        url = self._shard_urls[s]
        try:
            sample = shards.parse_sample(data, entry, url)
            enc = self.layout.encode(self.tokenizer.encode(entry.text), sample.codes)
        except (shards.SampleError, shards.ShardError, LayoutError) as e:
            counters.skipped_bad_sample += 1
            self._warn_sample(s, k, f"is damaged ({e}); skipped")
            return None
        planned = int(self._lengths[s][k])
        if len(enc) != planned:
            counters.skipped_bad_sample += 1
            self._warn_sample(s, k, f"encodes to {len(enc)} tokens but its index entry says {planned}; skipped (stale index)")
            return None
        return enc

    def _warn_shard(self, s: int, e: BaseException) -> None:
        name = self._shard_names[s]
        with self._log_lock:
            if name in self._warned_shards:
                return
            self._warned_shards.add(name)
        logger.error("shard %s is unreadable (%s); its samples are skipped", self._shard_urls[s], e)

    def _materialise(self, packs: list[Pack]) -> tuple[list[tuple[PackRow, list[str]]], _Counters, set[str]]:
        docs, counters, bad = self._read_docs(packs)
        rows = []
        for p in packs:
            encs: list[Encoded] = []
            keys: list[str] = []
            srcs: list[int] = []
            seconds = 0.0
            for s, k in zip(p.shards, p.indices):
                enc = docs[(s, k)]
                if enc is not None:
                    encs.append(enc)
                    keys.append(self._key(s, k))
                    src = self._shard_source[s]
                    srcs.append(src)
                    entry, rate = self._indexes[s].samples[k], self._frame_rates[src]
                    seconds += entry.n_frames / rate if rate else entry.duration_s
            rows.append((build_pack_row(encs, self.seq_len, self.pad_id, srcs, seconds), keys))
        return rows, counters, bad

    def _build_step(self, gen: _Gen) -> _Step:
        per_rank = self.global_batch_size // self.dp_size
        lo, hi = self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank
        mine: list[Pack] = []
        epochs: list[int] = []
        global_docs = global_tokens = 0
        for i in range(self.global_batch_size):
            epoch = gen.stream.position.epoch
            try:
                pack, _ = gen.stream.next_pack()
            except NoPacks as e:
                raise DataConfigError(f"{e} [datasets: {', '.join(self.paths)}]") from None
            global_docs += pack.n_docs
            global_tokens += pack.n_tokens
            if lo <= i < hi:
                mine.append(pack)
                epochs.append(epoch)
        # pack j -> worker j % num_workers: each worker reads a disjoint subset
        nw = self.num_workers
        if self._pool is None:
            parts = [self._materialise(mine)]
            rows = parts[0][0]
        else:
            futures = [self._pool.submit(self._materialise, mine[w::nw]) for w in range(nw)]
            parts = [f.result() for f in futures]
            rows = [None] * len(mine)
            for w, part in enumerate(parts):
                rows[w::nw] = part[0]
        counters = gen.pending
        gen.pending = _Counters()
        bad: set[str] = set()
        for part in parts:
            counters.add(part[1])
            bad |= part[2]
        first = gen.cursor + lo
        batches = []
        for m in range(0, per_rank, self.micro_batch_size):
            chunk = rows[m : m + self.micro_batch_size]
            batches.append(
                _collate(
                    [r for r, _ in chunk], [k for _, k in chunk],
                    list(range(first + m, first + m + len(chunk))), epochs[m : m + len(chunk)],
                )
            )
        gen.cursor += self.global_batch_size
        return _Step(
            batches=batches, end=gen.stream.position, end_cursor=gen.cursor, global_docs=global_docs,
            global_tokens=global_tokens, rank_tokens=sum(r.n_tokens for r, _ in rows), rank_packs=len(rows),
            counters=counters, bad_shards=sorted(bad),
        )

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
        if self._thread is not None:
            assert self._stop is not None and self._queue is not None
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
        self._thread = self._queue = self._stop = None
        self._sync_gen = None
        self._failure = None

    # -------------------------------------------------------------------- API

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step."""
        if self._closed:
            raise RuntimeError("PackedLoader is closed")
        if self._failure is not None:
            raise self._failure
        self._start()
        if self.prefetch == 0:
            assert self._sync_gen is not None
            try:
                step = self._build_step(self._sync_gen)
            except BaseException as e:
                self._failure = e  # the generator may be half-way through a step: never continue from it
                raise
        else:
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
                        # a hung read (object store, network file system) shows up here, not as a silent stall
                        logger.warning("data loader rank %d/%d: waited %.0f s for the step at pack %d (epoch %d); "
                                       "the prefetch thread is still working", self.dp_rank, self.dp_size, waited,
                                       self._cursor, self._position.epoch)
                        warn_at *= 2
            if isinstance(item, _Failure):
                self._failure = item.exc
                raise item.exc
            step = item
        self._apply(step)
        return step.batches

    def _apply(self, step: _Step) -> None:
        new_epoch = step.end.epoch != self._position.epoch
        self._position = step.end
        self._cursor = step.end_cursor
        self._consumed_docs += step.global_docs
        self._consumed_tokens += step.global_tokens
        self._counters.add(step.counters)
        self._bad_shards.update(step.bad_shards)
        self._last_eff = step.global_tokens / (self.global_batch_size * self.seq_len)
        self._last_rank_eff = step.rank_tokens / (step.rank_packs * self.seq_len) if step.rank_packs else 0.0
        self._rank_tokens += step.rank_tokens
        self._rank_packs += step.rank_packs
        if new_epoch:
            s = self.stats
            logger.info(
                "data epoch %d complete; now in epoch %d (consumed %d packs, %d docs; packing efficiency %.4f, "
                "skipped: %d too long, %d damaged samples, %d in unreadable shards)",
                step.end.epoch - 1, step.end.epoch, s["consumed_packs"], s["consumed_docs"],
                s["pack_efficiency_cumulative"], s["skipped_too_long"], s["skipped_bad_sample"], s["skipped_bad_shard"],
            )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the consumed steps (prefetched steps are not included)."""
        # prefetched steps are not consumed: never count them in state
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "pack_window": self.pack_window,
            "layout": self.layout.name,
            "tokenizer": self.tokenizer.fingerprint,
            "dataset": self._dataset_fingerprint,
            "position": {"epoch": self._position.epoch, "window": self._position.window,
                         "offset": self._position.offset},
            "consumed_packs": self._cursor,
            "consumed_docs": self._consumed_docs,
            "consumed_tokens": self._consumed_tokens,
            "global_batch_size": self.global_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (possibly saved with a different dp_rank/dp_size)."""
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(f"loader state version {state.get('version')!r} != supported {STATE_VERSION}")
        mine = self.state_dict()
        for name, what in (("seed", "seed"), ("seq_len", "seq_len"), ("pack_window", "pack_window"),
                           ("layout", "layout name"), ("tokenizer", "tokenizer fingerprint"),
                           ("dataset", "dataset fingerprint (shard list / sizes / checksums)")):
            if state.get(name) != mine[name]:
                raise DataConfigError(
                    f"cannot resume data loader: {what} differs (checkpoint {state.get(name)!r}, "
                    f"current {mine[name]!r}); the packed sample order would not match the checkpoint. "
                    "Restore the original setting or start the data stream afresh (no load_state_dict)"
                )
        if state["global_batch_size"] != self.global_batch_size:
            logger.warning(
                "resuming with global_batch_size %d (checkpoint %d): the pack sequence continues exactly, "
                "step boundaries move", self.global_batch_size, state["global_batch_size"],
            )
        self._reset()
        pos = state["position"]
        self._position = Position(int(pos["epoch"]), int(pos["window"]), int(pos["offset"]))
        self._cursor = int(state["consumed_packs"])
        self._consumed_docs = int(state["consumed_docs"])
        self._consumed_tokens = int(state["consumed_tokens"])
        logger.info("data loader resumed at epoch %d window %d pack %d (consumed packs %d, dp %d/%d)",
                    self._position.epoch, self._position.window, self._position.offset, self._cursor,
                    self.dp_rank, self.dp_size)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of the consumed steps. pack_efficiency* are over the global packs (planned tokens);
        rank_pack_efficiency* over this rank's rows after damaged samples were dropped."""
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
            "epoch": self._position.epoch,
            "consumed_packs": self._cursor,
            "consumed_docs": self._consumed_docs,
            "consumed_tokens": self._consumed_tokens,
        }

    @property
    def n_samples(self) -> int:
        """Samples per epoch (before any skipping)."""
        return self._planner.order.epoch_size

    def close(self) -> None:
        """Stop the prefetch thread and the worker pool; idempotent."""
        if self._closed:
            return
        self._reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
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
