"""Materialising packs: read each document's byte range (ranges adjacent in a tar coalesced into one
request), decode it, lay it out and build the micro-batch. Damaged samples and unreadable shards
are skipped, counted and logged once, never fatal.

Decoding takes the fast path (``shards.decode_fast``: the member names, sizes and .npy header
checked in place, the codes viewed without a copy) and falls back to the generic tar parser for
anything else, which also names what is wrong with a damaged sample.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Optional


from storage import fs

from . import shards
from .batch import Batch, PackRow, _collate, build_pack_row
from .byte_ranges import coalesce, fetch_spans
from .layouts import Encoded, LayoutError
from .mixing import Pack
from .samples import SampleInfo
from .sources import Sources

logger = logging.getLogger("data_pipeline.loader")


@dataclass
class Counters:
    skipped_too_long: int = 0
    skipped_bad_sample: int = 0
    skipped_bad_shard: int = 0

    def add(self, other: "Counters") -> None:
        self.skipped_too_long += other.skipped_too_long
        self.skipped_bad_sample += other.skipped_bad_sample
        self.skipped_bad_shard += other.skipped_bad_shard


@dataclass
class MicroBatch:
    """One worker's job: a micro-batch read, decoded and collated."""

    batch: Batch
    counters: Counters
    bad_shards: set[str]


class PackReader:
    """Reads packs of one loader; thread-safe (worker threads share it)."""

    def __init__(self, sources: Sources, info: SampleInfo, layout, tokenizer, seq_len: int, pad_id: int,
                 fast: bool = True) -> None:
        self.sources = sources
        self.info = info
        self.layout = layout
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.fast = fast
        self.n_q = int(sources.codec["n_q"])
        self.dtype = shards.codes_dtype(int(sources.codec["codebook_size"]))
        self._log_lock = threading.Lock()
        self._warned: set[tuple[int, int]] = set()
        self._warned_shards: set[int] = set()

    # ---------------------------------------------------------------- warnings
    def warn_sample(self, shard: int, row: int, what: str) -> None:
        with self._log_lock:
            if (shard, row) in self._warned:
                return
            self._warned.add((shard, row))
        logger.warning("sample %s of shard %s %s", self.info.key(shard, row), self.sources.shard_url(shard), what)

    def _warn_shard(self, shard: int, e: BaseException) -> None:
        with self._log_lock:
            if shard in self._warned_shards:
                return
            self._warned_shards.add(shard)
        logger.error("shard %s is unreadable (%s); its samples are skipped", self.sources.shard_url(shard), e)

    # ----------------------------------------------------------------- reading
    def read_spans(self, packs: list[Pack]) -> list[tuple[int, list[list[int]], list[tuple[int, int]]]]:
        """Per shard (in order): the rows wanted, grouped in runs read with one request each, and
        each run's [start, end) bytes. What this rank reads for ``packs``, without reading it."""
        wanted: dict[int, set[int]] = {}
        for p in packs:
            for s, k in zip(p.shards, p.indices):
                wanted.setdefault(s, set()).add(k)
        out = []
        for s in sorted(wanted):
            off, nb = self.sources.column("offset", s), self.sources.column("nbytes", s)
            runs = coalesce(sorted(wanted[s], key=lambda k: int(off[k])), off, nb)
            out.append((s, runs, [(int(off[r[0]]), int(off[r[-1]]) + int(nb[r[-1]])) for r in runs]))
        return out

    def _read_docs(self, packs: list[Pack], counters: Counters, bad: set[str]
                   ) -> dict[tuple[int, int], Optional[tuple[Encoded, str]]]:
        out: dict[tuple[int, int], Optional[tuple[Encoded, str]]] = {}
        for s, runs, spans in self.read_spans(packs):
            url = self.sources.shard_url(s)
            try:
                blobs = fetch_spans(url, spans)
            except (fs.FsError, shards.ShardError) as e:
                out.update({(s, k): None for r in runs for k in r})
                counters.skipped_bad_shard += sum(len(r) for r in runs)
                bad.add(self.sources.shard_name(s))
                self._warn_shard(s, e)
                continue
            off, nb = self.sources.column("offset", s), self.sources.column("nbytes", s)
            frames = self.sources.column("n_frames", s)
            planned = self.info.shard_lengths(s)
            for run, (start, _), blob in zip(runs, spans, blobs):
                view = memoryview(blob)
                for k in run:
                    out[(s, k)] = self._decode(s, k, url, view, int(off[k]) - start, int(off[k]), int(nb[k]),
                                               int(frames[k]), int(planned[k]), counters)
        return out

    def _decode(self, s: int, k: int, url: str, blob: memoryview, lo: int, offset: int, n: int, n_frames: int,
                planned: int, counters: Counters) -> Optional[tuple[Encoded, str]]:
        try:
            if len(blob) < lo + n:
                got = max(0, len(blob) - lo)
                raise shards.SampleError(url, f"truncated range [{offset}, {offset + n}): got {got} of {n} bytes")
            fast = shards.decode_fast(blob, lo, n, self.n_q, n_frames, self.dtype) if self.fast else None
            if fast is not None:
                key, codes, text = fast
            else:
                sample = shards.parse_range(bytes(blob[lo:lo + n]), url, offset, self.n_q, n_frames)
                key, codes, text = sample.key, sample.codes, sample.text
            enc = self.layout.encode(self.tokenizer.encode(text), codes)
        except (shards.SampleError, shards.ShardError, LayoutError) as e:
            counters.skipped_bad_sample += 1
            self.warn_sample(s, k, f"is damaged ({e}); skipped")
            return None
        if len(enc) != planned:
            counters.skipped_bad_sample += 1
            self.warn_sample(s, k, f"encodes to {len(enc)} tokens but its index entry says {planned}; skipped "
                                   "(stale index)")
            return None
        return enc, f"{self.sources.shard_name(s)}:{key}"

    # --------------------------------------------------------------- batching
    def micro_batch(self, packs: list[Pack], pack_ids: list[int], epochs: list[int]) -> MicroBatch:
        """Read, decode and collate one micro-batch (a worker's unit of work)."""
        counters = Counters()
        bad: set[str] = set()
        docs = self._read_docs(packs, counters, bad)
        rows: list[PackRow] = []
        keys: list[list[str]] = []
        for p in packs:
            encs: list[Encoded] = []
            row_keys: list[str] = []
            srcs: list[int] = []
            seconds = 0.0
            for d, (s, k) in enumerate(zip(p.shards, p.indices)):
                got = docs[(s, k)]
                if got is not None:
                    encs.append(got[0])
                    row_keys.append(got[1])
                    srcs.append(int(self.sources.shard_source[s]))
                    seconds += p.seconds[d] if p.seconds else 0.0
            rows.append(build_pack_row(encs, self.seq_len, self.pad_id, srcs, seconds))
            keys.append(row_keys)
        return MicroBatch(_collate(rows, keys, pack_ids, epochs), counters, bad)

