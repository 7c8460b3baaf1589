"""The datasets of a run and how they are blended.

Each dataset is opened through its compact index (``index.cidx``, :mod:`data_pipeline.compact_index`):
a header and the shard table, nothing per sample. A dataset without one (written before compact
indexes existed) or with a stale one is read the old way, index.json and every sidecar, into an
index built in memory, with a warning: fine for small data, a GET storm at scale.

Two forms (``data.paths`` / ``data.sources``):
  * paths: one stream over the shards of every dataset (their natural proportions), one metric
    source per dataset (its name);
  * sources: one stream per source, blended by weight (data_pipeline.mixing), one metric source
    per source (its name).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from storage import fs

from . import shards
from .compact_index import FILENAME, CompactIndex, CompactIndexError, build_in_memory
from .mixing import Stream
from .packing import TAG_SOURCE, GlobalOrder

logger = logging.getLogger("data_pipeline.loader")

_INDEX_THREADS = 16
_LEGACY_WARN_SHARDS = 1000  # above this, reading every sidecar at start-up is called out


class DataConfigError(ValueError):
    """The loader's inputs are unusable (missing dataset, missing/stale index, mismatched
    layout/tokenizer, incompatible resume state). The message names the URL or setting."""


@dataclass
class SourceSpec:
    """One ``data.sources`` entry."""

    paths: list[str]
    weight: float = 1.0
    name: Optional[str] = None


def _frame_rate(codec: dict) -> float | None:
    """Codec frames per second of audio (xcodec2: 50), or None if the index does not say."""
    try:
        rate = float(codec.get("frame_rate"))
    except (TypeError, ValueError):
        return None
    return rate if rate > 0 else None


@dataclass
class Dataset:
    path: str
    name: str
    index: CompactIndex
    codec: dict
    frame_rate: Optional[float]
    first_shard: int  # loader-level ordinal of its shard 0


class Sources:
    """Every dataset's compact index, the loader-level shard list (datasets concatenated, in
    order) and the streams over it."""

    def __init__(self, datasets: list[Dataset], streams: list[Stream], names: list[str], mixing: str,
                 shard_source: np.ndarray, stream_fingerprints: list[str]) -> None:
        self.datasets = datasets
        self.streams = streams
        self.names = names  # metric sources (Batch.source indexes into it)
        self.mixing = mixing  # "paths" | "sources"
        self.shard_source = shard_source
        self.stream_fingerprints = stream_fingerprints
        self.shard_dataset = np.concatenate([np.full(d.index.n_shards, i, np.int32) for i, d in enumerate(datasets)])
        self.shard_local = np.concatenate([np.arange(d.index.n_shards, dtype=np.int64) for d in datasets])
        self.codec = datasets[0].codec
        self.n_shards = len(self.shard_dataset)
        self._names: dict[int, str] = {}  # shard basenames, as samples are read (a key per document)

    def dataset_of(self, shard: int) -> Dataset:
        return self.datasets[int(self.shard_dataset[shard])]

    def column(self, name: str, shard: int) -> np.ndarray:
        return self.dataset_of(shard).index.column(name, int(self.shard_local[shard]))

    def shard_url(self, shard: int) -> str:
        return self.dataset_of(shard).index.shard_url(int(self.shard_local[shard]))

    def shard_name(self, shard: int) -> str:
        name = self._names.get(shard)
        if name is None:
            name = self._names[shard] = fs.basename(self.dataset_of(shard).index.shard_path(int(self.shard_local[shard])))
        return name

    @property
    def n_samples(self) -> int:
        return sum(d.index.n_samples for d in self.datasets)

    @property
    def bytes_read(self) -> int:
        """Bytes read from compact indexes so far (start-up plus the per-shard column reads)."""
        return sum(d.index.bytes_read for d in self.datasets)

    def fingerprint(self) -> str:
        """The data's identity: for data.paths, the one stream's (the same as loader state version
        1's); for data.sources, over every source's name and fingerprint."""
        if self.mixing == "paths":
            return self.stream_fingerprints[0]
        h = hashlib.sha256()
        for s, fp in zip(self.streams, self.stream_fingerprints):
            h.update(f"{s.name}\0{fp}\n".encode())
        return h.hexdigest()[:16]

    def close(self) -> None:
        for d in self.datasets:
            d.index.close()


def _legacy_index(path: str, tokenizer) -> CompactIndex:
    """index.json and every sidecar (loaded concurrently: latency-bound on object stores), cross
    checked, as a compact index built in memory."""
    try:
        ds = shards.DatasetIndex.load(path)
    except Exception as e:
        raise DataConfigError(f"cannot load dataset index of {path}: {e}") from e
    urls = ds.shard_urls()
    if not urls:
        raise DataConfigError(f"dataset(s) {path} contain no shards")

    def load(url: str) -> shards.ShardIndex:
        try:
            return shards.load_shard_index(url)
        except Exception as e:
            raise DataConfigError(f"cannot load the sidecar index of shard {url}: {e}") from e

    if len(urls) > _LEGACY_WARN_SHARDS:
        logger.warning("dataset %s has no usable compact index (%s): reading its %d sidecars at start-up, on every "
                       "rank; write one with `python -m data_pipeline index --dataset %s --compact-only`",
                       path, FILENAME, len(urls), path)
    if len(urls) > 1:
        with ThreadPoolExecutor(min(_INDEX_THREADS, len(urls)), thread_name_prefix="loader-index") as ex:
            indexes = list(ex.map(load, urls))
    else:
        indexes = [load(u) for u in urls]
    for url, ix, summary in zip(urls, indexes, ds.shards):
        if ix.shard != fs.basename(url):
            raise DataConfigError(f"sidecar index of {url} describes shard {ix.shard!r}: stale or misplaced index")
        if len(ix.samples) != summary.n_samples or ix.sha256 != summary.sha256:
            raise DataConfigError(
                f"sidecar index of {url} ({len(ix.samples)} samples, sha256 {ix.sha256[:12]}) disagrees with the "
                f"dataset index ({summary.n_samples} samples, sha256 {summary.sha256[:12]}): stale index; "
                "rebuild the dataset index"
            )
    try:
        return build_in_memory(ds, indexes, [tokenizer] if tokenizer is not None else [])
    except (CompactIndexError, ValueError) as e:
        raise DataConfigError(f"cannot index dataset {path}: {e}") from e


def open_dataset(path: str, tokenizer=None) -> CompactIndex:
    """The compact index of the dataset at ``path`` (a dir or its index.json URL): ``index.cidx``
    when present and current, else one built in memory from index.json and the sidecars."""
    if not fs.exists(path):
        raise DataConfigError(f"dataset path {path} does not exist")
    index_url, base = shards._dataset_urls(path)
    try:
        json_size = fs.size(index_url)
    except fs.FsError:
        return _legacy_index(path, tokenizer)  # reports the missing index.json as it always did
    if not fs.exists(fs.join(base, FILENAME)):
        return _legacy_index(path, tokenizer)
    try:
        ix = CompactIndex.open(base)
    except (CompactIndexError, fs.FsError) as e:
        raise DataConfigError(f"cannot load the compact index of dataset {path}: {e}; rebuild it with "
                              f"`python -m data_pipeline index --dataset {base} --compact-only`") from e
    recorded = ix.index_json
    if recorded is not None and recorded.get("size") != json_size:
        logger.warning("%s is stale: written for an index.json of %s bytes, which now has %d; reading index.json "
                       "and the sidecars instead. Rebuild it: python -m data_pipeline index --dataset %s --compact-only",
                       ix.url, recorded.get("size"), json_size, base)
        ix.close()
        return _legacy_index(path, tokenizer)
    return ix


def _stream_fingerprint(datasets: list[Dataset]) -> str:
    """sha256 over (shard basename, n_samples, sha256) of every shard, in order (loader state
    version 1's dataset fingerprint)."""
    h = hashlib.sha256()
    for d in datasets:
        for line in d.index.shard_digest_lines():
            h.update(line)
    return h.hexdigest()[:16]


def load_sources(paths: Optional[Sequence[str]], specs: Optional[Sequence[SourceSpec]], seed: int,
                 check_codec: Callable[[str, dict], None], tokenizer=None) -> Sources:
    """Open every dataset, cross-check their codecs and build the streams. ``check_codec(path,
    codec)`` raises DataConfigError for a dataset the layout cannot take."""
    if (paths is None) == (specs is None):
        raise DataConfigError("give exactly one of data.paths (unweighted) or data.sources (weighted)")
    if specs is not None:
        specs = list(specs)
        if not specs:
            raise DataConfigError("data.sources is empty; give at least one {paths, weight, name}")
        groups = [list(s.paths) for s in specs]
    else:
        groups = [list(paths or [])]
    all_paths = [p for g in groups for p in g]
    if not all_paths:
        raise DataConfigError("PackedLoader needs at least one dataset path")
    datasets: list[Dataset] = []
    try:
        return _build(datasets, all_paths, groups, specs, seed, check_codec, tokenizer)
    except BaseException:
        for d in datasets:  # (their file descriptors)
            d.index.close()
        raise


def _build(datasets: list[Dataset], all_paths: list[str], groups: list[list[str]],
           specs: Optional[list[SourceSpec]], seed: int, check_codec: Callable[[str, dict], None],
           tokenizer) -> Sources:
    names: list[str] = []
    first = 0
    for path in all_paths:
        ix = open_dataset(path, tokenizer)
        datasets.append(Dataset(path, "", ix, ix.codec, _frame_rate(ix.codec), first))
        check_codec(path, ix.codec)
        if len(datasets) > 1:
            diff = shards.codec_differences(datasets[0].codec, ix.codec)
            if diff:
                raise DataConfigError(
                    f"datasets {all_paths[0]} and {path} were tokenized by different codecs ({'; '.join(diff)}): "
                    "their codes mean different sounds and must not share token ids. Tokenize both with one codec "
                    "(python -m data_pipeline tokenize), or train on one of them")
        name = ix.name or fs.basename(path.rstrip("/"))
        name = name if name not in names else f"{name}#{len(names)}"
        names.append(name)
        datasets[-1].name = name
        first += ix.n_shards
    if first == 0:
        raise DataConfigError(f"dataset(s) {', '.join(all_paths)} contain no shards")
    streams: list[Stream] = []
    fingerprints: list[str] = []
    shard_source: list[np.ndarray] = []
    k = 0
    for g, group in enumerate(groups):
        ds = datasets[k:k + len(group)]
        k += len(group)
        sizes = np.concatenate([d.index.shard_sizes for d in ds])
        ordinals = np.concatenate([np.arange(d.first_shard, d.first_shard + d.index.n_shards) for d in ds])
        if specs is None:
            streams.append(Stream(name="+".join(d.name for d in ds), weight=1.0, shards=ordinals,
                                  order=GlobalOrder(sizes, seed), legacy=True))
            shard_source += [np.full(d.index.n_shards, i, np.int16) for i, d in enumerate(ds)]
        else:
            spec = specs[g]
            name = spec.name or "+".join(d.name for d in ds)
            if name in [s.name for s in streams]:
                raise DataConfigError(f"data.sources: two sources named {name!r}; give each a unique name")
            if not spec.weight >= 0:
                raise DataConfigError(f"data.sources: source {name!r} has weight {spec.weight}; weights must be >= 0")
            if spec.weight > 0 and int(sizes.sum()) == 0:
                raise DataConfigError(f"data.sources: source {name!r} ({', '.join(group)}) contains no samples")
            salt = (TAG_SOURCE, zlib.crc32(name.encode("utf-8")))
            streams.append(Stream(name=name, weight=float(spec.weight), shards=ordinals,
                                  order=GlobalOrder(sizes, seed, salt=salt)))
            shard_source.append(np.full(len(ordinals), g, np.int16))
        fingerprints.append(_stream_fingerprint(ds))
    if specs is not None:
        names = [s.name for s in streams]
        if not any(s.weight > 0 for s in streams):
            raise DataConfigError("data.sources: every weight is 0; give at least one source a positive weight")
    return Sources(datasets, streams, names, "paths" if specs is None else "sources",
                   np.concatenate(shard_source), fingerprints)
