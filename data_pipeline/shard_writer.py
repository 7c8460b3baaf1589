"""Writing token shards: ShardWriter (one tar, its sidecar written last, atomically) and
write_dataset / finalize_dataset (a dataset directory of shards plus its index.json and its
compact index, index.cidx)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable
from typing import IO, Any

import numpy as np

from storage import fs

from .compact_index import CompactIndexWriter
from .shard_format import (
    EXT_CODES,
    EXT_META,
    EXT_TEXT,
    SHARD_NAME,
    DatasetIndex,
    Sample,
    SampleEntry,
    ShardIndex,
    ShardSummary,
    _encode_npy,
    _make_entry,
    _tarinfo,
    codes_dtype,
    index_path_for,
    validate_codec,
    validate_key,
    zero_frames_problem,
)

# --------------------------------------------------------------------------- writer


class _HashingWriter:
    """File-object shim for tarfile: hashes and counts everything written."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._pos = 0
        self.hasher = hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.hasher.update(b)
        self._f.write(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()


class ShardWriter:
    """Writes one shard tar + sidecar. Context manager; on an exception inside
    the ``with`` block nothing is published (the temp file is removed)."""

    def __init__(self, path: str, codec: dict) -> None:
        if not fs.basename(path).endswith(".tar"):
            raise ValueError(f"{path}: shard path must end with .tar")
        self.path = path
        self.codec = validate_codec(codec)
        self._dtype = codes_dtype(self.codec["codebook_size"])
        if fs.is_remote(path):
            fd, self._tmp = tempfile.mkstemp(suffix=".tar")
            os.close(fd)
        else:
            self._tmp = fs.local_tmp_path(fs.local_path(path))
        self._file: IO[bytes] | None = open(self._tmp, "wb")
        self._out = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8")
        self._entries: list[SampleEntry] = []
        self._keys: set[str] = set()
        self._index: ShardIndex | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    @property
    def n_samples(self) -> int:
        return len(self._entries)

    @property
    def bytes_written(self) -> int:
        return self._out.tell()

    def write(self, sample: Sample) -> None:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        key = validate_key(sample.key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r}: duplicate key in shard {self.path}")
        codes = self._check_codes(key, sample.codes)
        if not isinstance(sample.text, str):
            raise ValueError(f"sample key {key!r}: text must be str, got {type(sample.text).__name__}")
        try:
            text_b = sample.text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"sample key {key!r}: text is not encodable as UTF-8 ({e})") from e
        meta = self._normalize_meta(key, sample.meta, codes.shape[1])
        try:
            meta_b = json.dumps(meta, ensure_ascii=False, sort_keys=True, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ValueError(f"sample key {key!r}: metadata is not JSON-serialisable ({e})") from e
        # Everything is validated and encoded before the first member is
        # written, so a rejected sample never leaves partial members behind.
        payloads = ((EXT_CODES, _encode_npy(codes)), (EXT_TEXT, text_b), (EXT_META, meta_b))
        start = self._tar.offset
        for ext, data in payloads:
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._keys.add(key)
        self._entries.append(
            _make_entry(key, start, self._tar.offset, codes, sample.text, len(text_b), meta)
        )

    def _check_codes(self, key: str, codes: Any) -> np.ndarray:
        arr = np.asarray(codes)
        n_q, cbs = self.codec["n_q"], self.codec["codebook_size"]
        if arr.dtype.kind not in "iu":
            raise ValueError(f"sample key {key!r}: codes dtype {arr.dtype} is not an integer type")
        if arr.ndim != 2 or arr.shape[0] != n_q:
            raise ValueError(f"sample key {key!r}: codes shape {arr.shape} != [n_q={n_q}, T]")
        problem = zero_frames_problem(arr.shape[1])
        if problem:
            raise ValueError(f"sample key {key!r}: {problem}")
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= cbs:
            q, t = np.argwhere((arr < 0) | (arr >= cbs))[0]
            raise ValueError(
                f"sample key {key!r}: code {arr[q, t]} at [q={q}, t={t}] outside codebook [0, {cbs})"
            )
        return np.ascontiguousarray(arr, dtype=self._dtype)

    def _normalize_meta(self, key: str, meta: Any, n_frames: int) -> dict:
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise ValueError(f"sample key {key!r}: meta must be a dict, got {type(meta).__name__}")
        m = dict(meta)
        if "codec" in m and m["codec"] != self.codec:
            raise ValueError(f"sample key {key!r}: meta codec {m['codec']!r} != shard codec {self.codec!r}")
        if "n_frames" in m and m["n_frames"] != n_frames:
            raise ValueError(f"sample key {key!r}: meta n_frames {m['n_frames']!r} != codes T={n_frames}")
        m["codec"] = self.codec
        m["n_frames"] = n_frames
        duration = m.get("duration_s")
        if duration is None:
            duration = n_frames / float(self.codec["frame_rate"])
        try:
            m["duration_s"] = float(duration)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sample key {key!r}: duration_s {duration!r} is not a number") from e
        for k in ("speaker", "language", "dataset"):
            m[k] = "" if m.get(k) is None else str(m[k])
        return m

    def close(self) -> ShardIndex:
        """Finish the tar, publish it atomically, write the sidecar."""
        if self._index is not None:
            return self._index
        if self._file is None:
            raise ValueError(f"{self.path}: writer was aborted")
        if not self._entries:
            self.abort()
            raise ValueError(f"{self.path}: no samples written; refusing to publish an empty shard")
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            index = ShardIndex(
                shard=fs.basename(self.path),
                size_bytes=self._out.tell(),
                sha256=self._out.hasher.hexdigest(),
                codec=self.codec,
                samples=self._entries,
            )
            if fs.is_remote(self.path):
                fs.put_file(self._tmp, self.path)
                os.unlink(self._tmp)
            else:
                fs.commit_local(self._tmp, fs.local_path(self.path))
            fs.write_bytes_atomic(index_path_for(self.path), index.to_json().encode("utf-8"))
        except BaseException:
            self.abort()
            raise
        self._index = index
        return index

    def abort(self) -> None:
        """Drop everything written so far; nothing is published."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def write_dataset(
    out_dir: str, samples: Iterable[Sample], codec: dict, samples_per_shard: int, name: str
) -> DatasetIndex:
    """Write ``shard-NNNNNN.tar`` + sidecars + ``index.json`` into ``out_dir``."""
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    codec = validate_codec(codec)
    fs.makedirs(out_dir)
    summaries: list[ShardSummary] = []
    writer: ShardWriter | None = None
    compact = CompactIndexWriter()

    def finish(w: ShardWriter) -> None:
        idx = w.close()
        tar_name = fs.basename(w.path)
        summaries.append(ShardSummary.from_index(tar_name, fs.basename(index_path_for(tar_name)), idx))
        compact.add_shard(tar_name, idx, n_q=codec["n_q"])

    try:
        for sample in samples:
            if writer is None:
                writer = ShardWriter(fs.join(out_dir, SHARD_NAME.format(len(summaries))), codec)
            writer.write(sample)
            if writer.n_samples >= samples_per_shard:
                finish(writer)
                writer = None
        if writer is not None:
            finish(writer)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        compact.close()
        raise
    if not summaries:
        compact.close()
        raise ValueError(f"{out_dir}: no samples to write")
    return _publish(out_dir, DatasetIndex(name=name, codec=codec, shards=summaries), compact)


def _publish(out_dir: str, ds: DatasetIndex, compact: CompactIndexWriter) -> DatasetIndex:
    """index.json, then the compact index that records it (a crash between the two leaves a
    compact index the loader recognises as stale, never a silently mismatched pair)."""
    try:
        ds.save(out_dir)
        compact.save(out_dir, ds.name, ds.codec, ds.to_json().encode("utf-8"))
    finally:
        compact.close()
    return ds



def finalize_dataset(out_dir: str, name: str | None = None, codec: dict | None = None,
                     tokenizers: Iterable[Any] = ()) -> DatasetIndex:
    """Write ``out_dir/index.json`` and ``index.cidx`` over every shard whose sidecar is there
    (shards written independently, e.g. by many tokenizer processes): the one step that turns
    finished shards into a dataset. Every shard must carry the same codec (``codec``, when given,
    too). A tar without its sidecar is unfinished and left out; the count of those is logged by
    the caller. Sidecars are read one at a time (memory does not grow with the dataset).
    ``tokenizers``: text tokenizers whose token counts the compact index also holds."""
    from .shard_reader import load_shard_index  # (reader and writer are siblings)

    tars = sorted(u for u in fs.listdir(out_dir) if u.endswith(".tar"))
    summaries: list[ShardSummary] = []
    compact = CompactIndexWriter(tokenizers)
    try:
        for url in tars:
            side = index_path_for(url)
            if not fs.exists(side):
                continue
            idx = load_shard_index(url)
            if codec is None:
                codec = idx.codec
            elif idx.codec != codec:
                raise ValueError(f"{url}: codec {idx.codec!r} differs from the dataset's {codec!r}")
            summaries.append(ShardSummary.from_index(fs.basename(url), fs.basename(side), idx))
            compact.add_shard(fs.basename(url), idx, n_q=codec.get("n_q"))
    except BaseException:
        compact.close()
        raise
    if not summaries:
        compact.close()
        raise ValueError(f"{out_dir}: no finished shards (tar + sidecar) to index")
    name = name or fs.basename(out_dir.rstrip("/")) or "dataset"
    return _publish(out_dir, DatasetIndex(name=name, codec=codec, shards=summaries), compact)
