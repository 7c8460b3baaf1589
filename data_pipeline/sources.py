"""The datasets of a run: each ``data.paths`` entry's dataset index and every shard's sidecar index,
loaded (concurrently: latency-bound on object stores) and cross-checked, with a source name per
entry for per-source metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from storage import fs

from . import shards

_INDEX_THREADS = 16


class DataConfigError(ValueError):
    """The loader's inputs are unusable (missing dataset, missing/stale index, mismatched
    layout/tokenizer, incompatible resume state). The message names the URL or setting."""


def _frame_rate(codec: dict) -> float | None:
    """Codec frames per second of audio (xcodec2: 50), or None if the index does not say."""
    try:
        rate = float(codec.get("frame_rate"))
    except (TypeError, ValueError):
        return None
    return rate if rate > 0 else None


@dataclass
class Sources:
    names: list[str]  # one per paths entry: its dataset name (a repeated name gets "#i")
    codecs: list[dict]  # per paths entry
    frame_rates: list[Optional[float]]  # per paths entry: codec frames per second of audio
    shard_urls: list[str]
    shard_source: list[int]  # per shard: which paths entry it came from
    indexes: list[shards.ShardIndex]  # per shard


def load_sources(paths: list[str], check_codec: Callable[[str, dict], None]) -> Sources:
    """Load and cross-check every index; ``check_codec(path, codec)`` raises DataConfigError for a
    dataset the layout cannot take."""
    names: list[str] = []
    codecs: list[dict] = []
    urls: list[str] = []
    summaries: list[shards.ShardSummary] = []
    shard_source: list[int] = []
    frame_rates: list[Optional[float]] = []
    for path in paths:
        if not fs.exists(path):
            raise DataConfigError(f"dataset path {path} does not exist")
        try:
            ds = shards.DatasetIndex.load(path)
        except Exception as e:
            raise DataConfigError(f"cannot load dataset index of {path}: {e}") from e
        check_codec(path, ds.codec)
        if codecs:
            diff = shards.codec_differences(codecs[0], ds.codec)
            if diff:
                raise DataConfigError(
                    f"datasets {paths[0]} and {path} were tokenized by different codecs ({'; '.join(diff)}): "
                    "their codes mean different sounds and must not share token ids. Tokenize both with one codec "
                    "(python -m data_pipeline tokenize), or train on one of them")
        urls.extend(ds.shard_urls())
        summaries.extend(ds.shards)
        shard_source.extend([len(names)] * len(ds.shards))
        frame_rates.append(_frame_rate(ds.codec))
        codecs.append(ds.codec)
        name = ds.name or fs.basename(path.rstrip("/"))
        names.append(name if name not in names else f"{name}#{len(names)}")
    if not urls:
        raise DataConfigError(f"dataset(s) {', '.join(paths)} contain no shards")

    def load(url: str) -> shards.ShardIndex:
        try:
            return shards.load_shard_index(url)
        except Exception as e:
            raise DataConfigError(f"cannot load the sidecar index of shard {url}: {e}") from e

    if len(urls) > 1:
        with ThreadPoolExecutor(min(_INDEX_THREADS, len(urls)), thread_name_prefix="loader-index") as ex:
            indexes = list(ex.map(load, urls))
    else:
        indexes = [load(u) for u in urls]
    for url, ix, summary in zip(urls, indexes, summaries):
        if ix.shard != fs.basename(url):
            raise DataConfigError(f"sidecar index of {url} describes shard {ix.shard!r}: stale or misplaced index")
        if len(ix.samples) != summary.n_samples or ix.sha256 != summary.sha256:
            raise DataConfigError(
                f"sidecar index of {url} ({len(ix.samples)} samples, sha256 {ix.sha256[:12]}) disagrees with the "
                f"dataset index ({summary.n_samples} samples, sha256 {summary.sha256[:12]}): stale index; "
                "rebuild the dataset index"
            )
    return Sources(names, codecs, frame_rates, urls, shard_source, indexes)
