"""One worker: its units, each decoded, filtered, encoded in length buckets and written as one
shard (tmp + rename, sidecar, then the unit's report: a partial shard is never visible)."""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from storage import fs

from ..audio import REASONS, DecodeError, FilterConfig, audio_problem, split_at_silences, text_problem
from ..codecs import Codec, CodecError
from ..shards import Sample, ShardWriter
from .plan import Unit, clean_stale_tmp, report_name, shard_name
from .readers import Item, TarSource

log = logging.getLogger("data_pipeline.tokenize")


class Stopped(Exception):
    """A stop signal arrived; the unit in flight was abandoned (nothing of it is visible)."""


class StopFlag:
    """SIGTERM/SIGINT/SIGUSR1 -> stop at the next batch boundary (idempotent)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("signal %d: abandoning the unit in flight after this batch", signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Stopped(f"stopped by signal {self.signum}")


@dataclass
class Settings:
    filters: FilterConfig
    normalize: Callable[[str], str]
    batch_seconds: float = 60.0
    max_batch: int = 64
    window: int = 64  # items decoded together (one decode call, then encoded in length buckets)
    provenance: bool = True
    language: str = ""


@dataclass
class UnitReport:
    unit: int
    shard: Optional[str] = None
    items: int = 0
    samples: int = 0
    seconds: float = 0.0
    tokens: int = 0
    frames: int = 0
    segments_split: int = 0
    skipped: Counter = field(default_factory=Counter)
    speakers: set = field(default_factory=set)
    upsampled: int = 0
    decoders: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few origins

    def skip(self, reason: str, origin: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(origin)

    def to_dict(self) -> dict:
        return {"unit": self.unit, "shard": self.shard, "items": self.items, "samples": self.samples,
                "seconds": self.seconds, "hours": self.seconds / 3600.0, "tokens": self.tokens,
                "frames": self.frames, "segments_split": self.segments_split,
                "skipped": {r: self.skipped[r] for r in REASONS + ("oom",) if self.skipped[r]},
                "skipped_examples": self.examples, "speakers": sorted(self.speakers),
                "upsampled": self.upsampled, "decoders": dict(self.decoders)}


@dataclass
class _Pending:
    key: str
    audio: np.ndarray
    text: str
    meta: dict
    codes: Optional[np.ndarray] = None


class UnitWorker:
    def __init__(self, codec: Codec, decoder, out: str, settings: Settings, stop: StopFlag,
                 progress: Optional[Callable[[int, float], None]] = None) -> None:
        self.codec = codec
        self.codec_info = codec.codec_info()
        self.decoder = decoder
        self.out = out
        self.s = settings
        self.stop = stop
        self.progress = progress or (lambda items, seconds: None)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one unit

    def run_unit(self, unit: Unit, items: Iterable[Item], source_name: str) -> dict:
        t0 = time.monotonic()
        clean_stale_tmp(self.out, unit.id)
        rep = UnitReport(unit.id)
        writer: Optional[ShardWriter] = None
        try:
            windows = _windows(iter(items), self.s.window)
            nxt = self._pool.submit(self._decode_window, next(windows, None))
            while True:
                batch = nxt.result()
                if batch is None:
                    break
                nxt = self._pool.submit(self._decode_window, next(windows, None))
                self.stop.check()
                pending = self._filter(batch, rep, source_name)
                self._encode(pending, rep)
                for p in pending:
                    if p.codes is None:
                        continue
                    if writer is None:
                        writer = ShardWriter(fs.join(self.out, shard_name(unit.id)), self.codec_info)
                    writer.write(Sample(key=p.key, codes=p.codes, text=p.text, meta=p.meta))
                    rep.samples += 1
                    rep.seconds += p.meta["duration_s"]
                    rep.tokens += int(p.codes.size)
                    rep.frames += int(p.codes.shape[1])
                    if p.meta.get("speaker"):
                        rep.speakers.add(p.meta["speaker"])
                self.progress(len(batch), sum(p.meta["duration_s"] for p in pending if p.codes is not None))
            self.stop.check()
            if writer is not None:
                writer.close()
                rep.shard = shard_name(unit.id)
                writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        d = rep.to_dict()
        d.update(source=source_name, tar=unit.tar, item_range=None if unit.tar else [unit.start, unit.end],
                 elapsed_s=round(time.monotonic() - t0, 3), codec=self.codec_info)
        # The report last: its presence is what marks the unit done.
        fs.write_bytes_atomic(fs.join(self.out, report_name(unit.id)),
                              (json.dumps(d, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())
        return d

    # ------------------------------------------------------------------ stages

    def _decode_window(self, items: Optional[list[Item]]):
        """(item, text or reason, audio or DecodeError) for each item of a window; read + decode in
        the background thread while the previous window encodes."""
        if items is None:
            return None
        texts, datas, idx = [], [], []
        for it in items:
            raw = it.text
            t = None if raw is None else self.s.normalize(raw)
            texts.append(t)
            if self.s.filters.require_text and text_problem(t):
                continue
            try:
                datas.append(it.read())
            except OSError as e:
                datas.append(e)
            idx.append(len(texts) - 1)
        good = [i for i, d in zip(idx, datas) if isinstance(d, bytes)]
        decoded = self.decoder.decode([d for d in datas if isinstance(d, bytes)]) if good else []
        audio: list = [None] * len(items)
        for i, d in zip(idx, datas):
            if not isinstance(d, bytes):
                audio[i] = DecodeError("read_error", str(d))
        for i, a in zip(good, decoded):
            audio[i] = a
        return list(zip(items, texts, audio))

    def _filter(self, batch, rep: UnitReport, source_name: str) -> list[_Pending]:
        f = self.s.filters
        sr = self.codec.sample_rate
        out = []
        for item, text, audio in batch:
            rep.items += 1
            if f.require_text and text_problem(text):
                rep.skip(text_problem(text), item.origin)
                continue
            if isinstance(audio, DecodeError):
                rep.skip(audio.reason, item.origin)
                continue
            reason = audio_problem(audio, f, sr)
            if reason:
                rep.skip(reason, item.origin)
                continue
            rep.decoders[audio.decoder] += 1
            rep.upsampled += int(audio.source_rate < sr)
            meta = {"duration_s": audio.source_samples / audio.source_rate,
                    "speaker": item.speaker, "language": item.language or self.s.language,
                    "dataset": source_name, **item.extra}
            if self.s.provenance:
                meta.update(origin=item.origin, decoder=audio.decoder, source_sample_rate=audio.source_rate)
            seconds = audio.source_samples / audio.source_rate
            if seconds > f.max_duration:  # split_long is on (audio_problem let it through)
                ranges = split_at_silences(audio.samples, sr, f.max_duration, f.min_segment)
                rep.segments_split += 1
                for si, (a, b) in enumerate(ranges):
                    seg_s = (b - a) / sr
                    if seg_s < f.min_duration:
                        rep.skip("too_short", f"{item.origin} segment {si}")
                        continue
                    m = {**meta, "duration_s": seg_s, "segment": si, "n_segments": len(ranges),
                         "segment_start_s": a / sr}
                    if text:
                        m["source_text"] = text  # the whole file's: segments are not aligned to it
                    out.append(_Pending(f"{item.key}/seg{si:03d}", audio.samples[a:b], "", m))
                continue
            out.append(_Pending(item.key, audio.samples, text or "", meta))
        return out

    def _encode(self, pending: list[_Pending], rep: UnitReport) -> None:
        """Encode in buckets of similar length (sorted), at most batch_seconds of audio each."""
        order = sorted(range(len(pending)), key=lambda i: pending[i].audio.shape[0])
        sr = self.codec.sample_rate
        batch: list[int] = []
        longest = 0
        for i in order + [None]:
            if i is not None:
                n = pending[i].audio.shape[0]
                if not batch or ((len(batch) + 1) * max(longest, n) / sr <= self.s.batch_seconds
                                 and len(batch) < self.s.max_batch):
                    batch.append(i)
                    longest = max(longest, n)
                    continue
            if batch:
                self._encode_batch([pending[j] for j in batch], rep)
            batch, longest = ([i], pending[i].audio.shape[0]) if i is not None else ([], 0)

    def _encode_batch(self, batch: list[_Pending], rep: UnitReport) -> None:
        try:
            codes = self.codec.encode([p.audio for p in batch])
        except Exception as e:
            if not _is_oom(e):
                raise
            _free_cuda()
            if len(batch) == 1:
                rep.skip("oom", batch[0].key)
                return
            half = len(batch) // 2
            self._encode_batch(batch[:half], rep)
            self._encode_batch(batch[half:], rep)
            return
        for p, c in zip(batch, codes):
            p.codes = c


def _windows(it: Iterator[Item], n: int) -> Iterator[list[Item]]:
    while True:
        chunk = []
        for x in it:
            chunk.append(x)
            if len(chunk) >= n:
                break
        if not chunk:
            return
        yield chunk


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def auto_batch_seconds(codec: Codec, max_item_s: float, budget: float = 0.8, cap_s: float = 3600.0) -> float:
    """Seconds of audio per encode batch that fit the GPU: grow a batch of ``max_item_s``-long
    noise clips until it runs out of memory or its peak exceeds ``budget`` of the free memory,
    and keep 80% of the largest that fit. CUDA only (on CPU the setting is simply batch_seconds)."""
    import torch

    if not str(codec.device).startswith("cuda"):
        raise CodecError("batch_seconds=auto sizes batches from GPU memory: it needs device=cuda "
                         "(on CPU give batch_seconds=SECONDS)")
    free, _ = torch.cuda.mem_get_info(codec.device)
    rng = np.random.default_rng(0)
    n_item = max(1, int(max_item_s * codec.sample_rate))
    best, b = 0, 1
    while b * max_item_s <= cap_s:
        torch.cuda.reset_peak_memory_stats(codec.device)
        base = torch.cuda.memory_allocated(codec.device)
        try:
            codec.encode([rng.standard_normal(n_item).astype(np.float32) * 0.1 for _ in range(b)])
        except Exception as e:
            if not _is_oom(e):
                raise
            _free_cuda()
            break
        peak = torch.cuda.max_memory_allocated(codec.device) - base
        best = b
        if peak > budget * free:
            break
        b *= 2
    _free_cuda()
    if best == 0:
        raise CodecError(f"one {max_item_s:g} s clip does not fit the GPU's free memory; lower max_duration")
    return max(max_item_s, 0.8 * best * max_item_s)
