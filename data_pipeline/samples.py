"""Per-sample facts the planner needs, read from the compact indexes' columns shard by shard: the
token length a sample takes in the layout, its audio seconds, and (for warnings only) its key."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np

from . import shards
from .sources import DataConfigError, Sources

logger = logging.getLogger("data_pipeline.loader")

_CACHE_SHARDS = 4096


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class SampleInfo:
    """Token lengths (layout tokens; -1 where a sample cannot be laid out), audio seconds and keys
    of samples given as (loader shard ordinals, row within the shard)."""

    def __init__(self, sources: Sources, layout, tokenizer) -> None:
        self.sources = sources
        self.layout = layout
        self.tokenizer = tokenizer
        self.n_q = int(sources.codec["n_q"])
        self._tokens = [d.index.tokens_column(tokenizer.fingerprint) for d in sources.datasets]
        self._lengths = _LRU(_CACHE_SHARDS)
        self._keys = _LRU(64)
        self._fallback_warned: set[int] = set()

    # ----------------------------------------------------------------- lengths
    def shard_lengths(self, shard: int) -> np.ndarray:
        hit = self._lengths.get(shard)
        if hit is not None:
            return hit
        d = int(self.sources.shard_dataset[shard])
        frames = self.sources.column("n_frames", shard)
        col = self._tokens[d]
        text = self.sources.column(col, shard) if col is not None else self._tokenize(shard)
        out = self.layout.lengths(text, frames, self.n_q)
        self._lengths.put(shard, out)
        return out

    def _tokenize(self, shard: int) -> np.ndarray:
        """Text token counts of one shard from its sidecar's transcripts: for a tokenizer the
        compact index holds no counts of."""
        ds = self.sources.dataset_of(shard)
        d = int(self.sources.shard_dataset[shard])
        if d not in self._fallback_warned:
            self._fallback_warned.add(d)
            logger.warning(
                "%s has no token counts for tokenizer %s: tokenizing the transcripts of each shard's sidecar as the "
                "plan reaches it (every rank reads every sidecar over an epoch). Add them once: python -m "
                "data_pipeline index --dataset %s --compact-only --text-tokenizer hf --tokenizer-path PATH",
                ds.index.url, self.tokenizer.fingerprint, ds.index.base_url)
        url = self.sources.shard_url(shard)
        try:
            side = shards.load_shard_index(url)
        except Exception as e:
            raise DataConfigError(f"cannot load the sidecar index of shard {url}: {e}") from e
        want = int(self.sources.column("n_frames", shard).shape[0])
        if len(side.samples) != want:
            raise DataConfigError(f"sidecar index of {url} has {len(side.samples)} samples, the compact index "
                                  f"{want}: stale index; rebuild the dataset index")
        texts = [e.text for e in side.samples]
        batch = getattr(self.tokenizer, "encode_batch", None)
        ids = batch(texts) if batch is not None else [self.tokenizer.encode(t) for t in texts]
        return np.fromiter((len(i) for i in ids), np.int64, len(ids))

    def lengths(self, shard_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self._gather(self.shard_lengths, shard_ids, rows, np.int64)

    def seconds(self, shard_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Audio seconds: codec frames / frame rate (what the codes represent), else the index's
        duration."""
        def block(shard: int) -> np.ndarray:
            rate = self.sources.dataset_of(shard).frame_rate
            if rate:
                return self.sources.column("n_frames", shard) / rate
            return self.sources.column("duration_s", shard).astype(np.float64)

        return self._gather(block, shard_ids, rows, np.float64)

    @staticmethod
    def _gather(block, shard_ids: np.ndarray, rows: np.ndarray, dtype) -> np.ndarray:
        shard_ids = np.asarray(shard_ids)
        rows = np.asarray(rows)
        out = np.empty(len(rows), dtype)
        if not len(rows):
            return out
        uniq, inv = np.unique(shard_ids, return_inverse=True)
        if len(uniq) == 1:
            out[:] = block(int(uniq[0]))[rows]
            return out
        for j, s in enumerate(uniq.tolist()):
            m = inv == j
            out[m] = block(s)[rows[m]]
        return out

    # -------------------------------------------------------------------- keys
    def key(self, shard: int, row: int) -> str:
        """The sample's key, from its shard's sidecar (read for warnings only); ``#row`` when the
        sidecar is gone."""
        keys: Optional[list[str]] = self._keys.get(shard)
        if keys is None:
            try:
                keys = [e.key for e in shards.load_shard_index(self.sources.shard_url(shard)).samples]
            except Exception:  # noqa: BLE001 - a warning must not fail on a missing sidecar
                keys = []
            self._keys.put(shard, keys)
        return keys[row] if row < len(keys) else f"#{row}"
