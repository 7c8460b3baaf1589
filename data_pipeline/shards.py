"""WebDataset token shards: writer, readers, per-shard sidecar and dataset index.

Tar layout per sample (contiguous, in this order)::

    {key}.codes.npy   np.save of [n_q, T], uint16 if codebook_size <= 65536 else int32
    {key}.txt         UTF-8 transcript
    {key}.json        metadata (codec, duration_s, n_frames, speaker, language, dataset, ...)

Each ``shard-NNNNNN.tar`` has a sidecar ``shard-NNNNNN.idx.json`` (ShardIndex)
with the byte range of every sample, so loaders can fetch single samples with
one range read and packing plans never open tars. A dataset directory has an
``index.json`` (DatasetIndex) summarising its shards.

Reading uses a small tar parser instead of ``tarfile.TarFile`` because
TarFile silently treats a bad checksum or a truncated header after the first
member as the end of the archive, which would turn a damaged shard into a
quietly shorter one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import numpy as np

from . import fs
from .fs import FsError

CODEC_KEYS = ("name", "version", "sample_rate", "frame_rate", "n_q", "codebook_size")
EXT_CODES = "codes.npy"
EXT_TEXT = "txt"
EXT_META = "json"
MEMBER_EXTS = (EXT_CODES, EXT_TEXT, EXT_META)
INDEX_FILENAME = "index.json"
SIDECAR_SUFFIX = ".idx.json"
SHARD_NAME = "shard-{:06d}.tar"
INDEX_VERSION = 1

_BLOCK = 512
_ZERO_BLOCK = b"\0" * _BLOCK
_UINT16_LIMIT = 65536
_INT32_LIMIT = 2**31
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


# --------------------------------------------------------------------------- errors


class ShardError(Exception):
    """A shard (or index) is missing, empty, corrupt or truncated.

    ``ShardError(url, reason, key=...)``; ``ShardError(message)`` also works
    (the message is then used verbatim), which keeps the class re-creatable
    from its text after crossing a process boundary.
    """

    def __init__(self, url: str, reason: str = "", *, key: str | None = None) -> None:
        self.url = url
        self.reason = reason
        self.key = key
        if not reason:
            msg = url
        elif key is None:
            msg = f"{url}: {reason}"
        else:
            msg = f"{url}: sample {key!r}: {reason}"
        super().__init__(msg)


class SampleError(ShardError):
    """One sample inside a shard is damaged; the message names URL and key."""


# --------------------------------------------------------------------------- records


@dataclass
class Sample:
    key: str
    codes: np.ndarray  # [n_q, T] integer
    text: str
    meta: dict


@dataclass
class SampleEntry:
    key: str
    offset: int  # byte offset of the first tar header of this sample
    length: int  # bytes from offset through the end (incl. padding) of its last member
    n_frames: int
    n_q: int
    text: str
    text_bytes: int
    duration_s: float
    speaker: str
    language: str

    @property
    def end(self) -> int:
        return self.offset + self.length

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleEntry:
        return cls(
            key=str(d["key"]),
            offset=int(d["offset"]),
            length=int(d["length"]),
            n_frames=int(d["n_frames"]),
            n_q=int(d["n_q"]),
            text=str(d["text"]),
            text_bytes=int(d["text_bytes"]),
            duration_s=float(d["duration_s"]),
            speaker=str(d["speaker"]),
            language=str(d["language"]),
        )


@dataclass
class ShardIndex:
    shard: str  # basename of the tar
    size_bytes: int
    sha256: str
    codec: dict
    samples: list[SampleEntry]

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def n_frames(self) -> int:
        return sum(e.n_frames for e in self.samples)

    @property
    def seconds(self) -> float:
        return sum(e.duration_s for e in self.samples)

    @property
    def text_chars(self) -> int:
        return sum(len(e.text) for e in self.samples)

    def to_json(self) -> str:
        d = {
            "version": INDEX_VERSION,
            "shard": self.shard,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "codec": self.codec,
            "n_samples": self.n_samples,
            "samples": [asdict(e) for e in self.samples],
        }
        return json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, s: str | bytes) -> ShardIndex:
        """Parse a sidecar. ValueError if it is not a valid shard index."""
        try:
            d = json.loads(s)
            _check_version(d)
            samples = [SampleEntry.from_dict(e) for e in d["samples"]]
            idx = cls(
                shard=str(d["shard"]),
                size_bytes=int(d["size_bytes"]),
                sha256=str(d["sha256"]),
                codec=dict(d["codec"]),
                samples=samples,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a valid shard index ({type(e).__name__}: {e})") from e
        if "n_samples" in d and int(d["n_samples"]) != len(samples):
            raise ValueError(f"n_samples {d['n_samples']} != {len(samples)} sample entries")
        return idx


@dataclass
class ShardSummary:
    path: str  # tar path relative to the dataset dir
    index: str  # sidecar path relative to the dataset dir
    n_samples: int
    n_frames: int
    seconds: float
    text_chars: int
    size_bytes: int
    sha256: str

    @classmethod
    def from_index(cls, path: str, index: str, idx: ShardIndex) -> ShardSummary:
        return cls(
            path=path,
            index=index,
            n_samples=idx.n_samples,
            n_frames=idx.n_frames,
            seconds=idx.seconds,
            text_chars=idx.text_chars,
            size_bytes=idx.size_bytes,
            sha256=idx.sha256,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardSummary:
        return cls(
            path=str(d["path"]),
            index=str(d["index"]),
            n_samples=int(d["n_samples"]),
            n_frames=int(d["n_frames"]),
            seconds=float(d["seconds"]),
            text_chars=int(d["text_chars"]),
            size_bytes=int(d["size_bytes"]),
            sha256=str(d["sha256"]),
        )


@dataclass
class DatasetIndex:
    name: str
    codec: dict
    shards: list[ShardSummary]
    # Where the index was loaded from / written to; not serialised.
    base_url: str | None = field(default=None, compare=False, repr=False)

    @property
    def n_samples(self) -> int:
        return sum(s.n_samples for s in self.shards)

    @property
    def n_frames(self) -> int:
        return sum(s.n_frames for s in self.shards)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shards)

    @property
    def text_chars(self) -> int:
        return sum(s.text_chars for s in self.shards)

    @property
    def size_bytes(self) -> int:
        return sum(s.size_bytes for s in self.shards)

    def totals(self) -> dict[str, Any]:
        return {
            "n_shards": len(self.shards),
            "n_samples": self.n_samples,
            "n_frames": self.n_frames,
            "seconds": self.seconds,
            "hours": self.seconds / 3600.0,
            "text_chars": self.text_chars,
            "size_bytes": self.size_bytes,
        }

    def to_json(self) -> str:
        d = {
            "version": INDEX_VERSION,
            "name": self.name,
            "codec": self.codec,
            "totals": self.totals(),
            "shards": [asdict(s) for s in self.shards],
        }
        return json.dumps(d, ensure_ascii=False, sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, s: str | bytes) -> DatasetIndex:
        """Parse index.json. ValueError if it is not a valid dataset index."""
        try:
            d = json.loads(s)
            _check_version(d)
            return cls(
                name=str(d["name"]),
                codec=dict(d["codec"]),
                shards=[ShardSummary.from_dict(x) for x in d["shards"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a valid dataset index ({type(e).__name__}: {e})") from e

    @classmethod
    def load(cls, url: str) -> DatasetIndex:
        """Load from a dataset dir or an index.json URL (local or remote)."""
        index_url, base = _dataset_urls(url)
        try:
            raw = fs.read_bytes(index_url)
        except FsError as e:
            raise ShardError(index_url, "missing dataset index") from e
        try:
            idx = cls.from_json(raw)
        except ValueError as e:
            raise ShardError(index_url, f"corrupt dataset index: {e}") from e
        idx.base_url = base
        return idx

    def save(self, out_dir: str) -> str:
        """Write ``index.json`` into ``out_dir`` atomically; returns its URL."""
        url = fs.join(out_dir, INDEX_FILENAME)
        fs.write_bytes_atomic(url, self.to_json().encode("utf-8"))
        self.base_url = out_dir
        return url

    def _base(self, base_url: str | None) -> str:
        if base_url is not None:
            return _dataset_urls(base_url)[1]
        if self.base_url is None:
            raise ValueError(f"dataset {self.name!r}: no base_url (pass the dataset dir)")
        return self.base_url

    def shard_urls(self, base_url: str | None = None) -> list[str]:
        """Tar URLs; ``base_url`` defaults to where the index was loaded from."""
        base = self._base(base_url)
        return [fs.join(base, s.path) for s in self.shards]

    def index_urls(self, base_url: str | None = None) -> list[str]:
        """Sidecar URLs, parallel to shard_urls()."""
        base = self._base(base_url)
        return [fs.join(base, s.index) for s in self.shards]


def _check_version(d: Any) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    v = d.get("version", INDEX_VERSION)
    if not isinstance(v, int) or v > INDEX_VERSION:
        raise ValueError(f"unsupported index version {v!r} (this reader knows {INDEX_VERSION})")


def _dataset_urls(url: str) -> tuple[str, str]:
    """(index.json URL, dataset dir URL) for a dir or index.json URL."""
    if fs.basename(url).endswith(".json"):
        return url, fs.dirname(url)
    base = url.rstrip("/") if fs.is_remote(url) else url
    return fs.join(url, INDEX_FILENAME), base


# --------------------------------------------------------------------------- codec / validation


def validate_codec(codec: dict) -> dict:
    """Check the codec dict has the contract's keys; returns a plain copy."""
    if not isinstance(codec, dict):
        raise ValueError(f"codec must be a dict, got {type(codec).__name__}")
    missing = [k for k in CODEC_KEYS if k not in codec]
    if missing:
        raise ValueError(f"codec {codec!r} is missing keys {missing}")
    for k in ("n_q", "codebook_size"):
        v = codec[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"codec {k} must be a positive int, got {v!r}")
    if codec["codebook_size"] > _INT32_LIMIT:
        raise ValueError(f"codec codebook_size {codec['codebook_size']} does not fit int32")
    try:
        frame_rate = float(codec["frame_rate"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"codec frame_rate must be a number, got {codec['frame_rate']!r}") from e
    if not frame_rate > 0:
        raise ValueError(f"codec frame_rate must be > 0, got {codec['frame_rate']!r}")
    out = dict(codec)
    out["n_q"] = int(codec["n_q"])
    out["codebook_size"] = int(codec["codebook_size"])
    return out


def codes_dtype(codebook_size: int) -> np.dtype:
    """Storage dtype for codes: uint16 if the codebook fits, else int32."""
    return np.dtype(np.uint16) if codebook_size <= _UINT16_LIMIT else np.dtype(np.int32)


def validate_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty str, got {key!r}")
    parts = key.split("/")
    if "." in parts[-1]:
        raise ValueError(f"sample key {key!r}: '.' is not allowed in the last path component")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"sample key {key!r}: empty, '.' or '..' path component")
    if any(ord(c) < 32 or c == "\x7f" for c in key):
        raise ValueError(f"sample key {key!r}: control characters are not allowed")
    return key


def split_member_name(name: str) -> tuple[str, str]:
    """``'a/b/k.codes.npy' -> ('a/b/k', 'codes.npy')`` (webdataset's rule)."""
    head, _, last = name.rpartition("/")
    stem, dot, ext = last.partition(".")
    if not dot:
        return name, ""
    return (f"{head}/{stem}" if head else stem), ext


def index_path_for(shard_url: str) -> str:
    """``.../shard-000000.tar -> .../shard-000000.idx.json``."""
    if shard_url.endswith(".tar"):
        return shard_url[: -len(".tar")] + SIDECAR_SUFFIX
    return shard_url + SIDECAR_SUFFIX


def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Pinned format version so bytes do not depend on numpy's choice.
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


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
        if arr.shape[1] == 0:
            raise ValueError(f"sample key {key!r}: codes have 0 frames")
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


def _make_entry(
    key: str, start: int, end: int, codes: np.ndarray, text: str, text_bytes: int, meta: dict
) -> SampleEntry:
    n_frames = int(codes.shape[1])
    return SampleEntry(
        key=key,
        offset=start,
        length=end - start,
        n_frames=n_frames,
        n_q=int(codes.shape[0]),
        text=text,
        text_bytes=text_bytes,
        duration_s=float(meta["duration_s"]),
        speaker="" if meta.get("speaker") is None else str(meta["speaker"]),
        language="" if meta.get("language") is None else str(meta["language"]),
    )


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

    def finish(w: ShardWriter) -> None:
        idx = w.close()
        tar_name = fs.basename(w.path)
        summaries.append(ShardSummary.from_index(tar_name, fs.basename(index_path_for(tar_name)), idx))

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
        raise
    if not summaries:
        raise ValueError(f"{out_dir}: no samples to write")
    ds = DatasetIndex(name=name, codec=codec, shards=summaries)
    ds.save(out_dir)
    return ds


# --------------------------------------------------------------------------- tar parsing


@dataclass
class _Member:
    name: str
    data: bytes
    offset: int  # first header block, including pax / GNU long-name headers
    end: int  # end of the padded data


@dataclass
class _Group:
    key: str
    parts: dict[str, bytes]
    offset: int
    end: int


class _Reader:
    """Sequential reader that tracks the position and optionally hashes."""

    def __init__(self, f: IO[bytes], url: str, hasher: Any = None) -> None:
        self._f = f
        self._url = url
        self.pos = 0
        self.hasher = hasher

    def read(self, n: int) -> bytes:
        chunks = []
        remaining = n
        while remaining > 0:
            try:
                b = self._f.read(remaining)
            except OSError as e:
                raise ShardError(self._url, f"read error at byte {self.pos}: {e}") from e
            if not b:
                break
            chunks.append(b)
            remaining -= len(b)
        out = b"".join(chunks)
        self.pos += len(out)
        if self.hasher is not None:
            self.hasher.update(out)
        return out

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def _parse_pax(buf: bytes, url: str, at: int) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    try:
        while i < len(buf) and buf[i] != 0:
            sp = buf.index(b" ", i)
            length = int(buf[i:sp])
            if length <= 0:
                raise ValueError("non-positive record length")
            record = buf[sp + 1 : i + length]
            if not record.endswith(b"\n"):
                raise ValueError("record not newline-terminated")
            k, _, v = record[:-1].partition(b"=")
            out[k.decode("utf-8")] = v.decode("utf-8", "surrogateescape")
            i += length
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(url, f"corrupt: bad pax header at byte {at} ({e})") from e
    return out


def _iter_members(r: _Reader, url: str, *, base: int = 0, archive: bool = True) -> Iterator[_Member]:
    """Yield regular-file members of a tar stream.

    ``archive=True``: a whole tar; requires an end-of-archive marker (a missing
    one means the file was truncated). ``archive=False``: a byte range cut from
    a shard by its index; ends at EOF on a header boundary. ``base`` is added
    to positions in messages and offsets.
    """
    pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    long_name: str | None = None
    member_start: int | None = None
    n_members = 0
    while True:
        hdr_at = r.pos
        buf = r.read(_BLOCK)
        where = base + hdr_at
        if not buf:
            if archive and hdr_at == 0:
                raise ShardError(url, "empty file (0 bytes)")
            if member_start is not None:
                raise ShardError(url, f"truncated: file ends at byte {where} inside a member's headers")
            if archive:
                raise ShardError(url, f"truncated: file ends at byte {where} without an end-of-archive marker")
            return
        if len(buf) < _BLOCK:
            raise ShardError(url, f"truncated: partial tar header at byte {where} ({len(buf)} of {_BLOCK} bytes)")
        if buf == _ZERO_BLOCK:
            if member_start is not None:
                raise ShardError(url, f"corrupt: end-of-archive marker at byte {where} inside a member's headers")
            if not archive:
                raise ShardError(url, f"corrupt: unexpected end-of-archive marker at byte {where}")
            if n_members == 0:
                raise ShardError(url, "empty tar archive (no members)")
            return
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            if archive and hdr_at == 0:
                raise ShardError(url, f"not a tar archive (bad header at byte 0: {e})") from e
            raise ShardError(url, f"corrupt: bad tar header at byte {where} ({e})") from e
        if member_start is None:
            member_start = hdr_at
        size = info.size
        if info.type in _REGULAR_TYPES and "size" in pax:
            size = int(pax["size"])
        data = r.read(size)
        if len(data) < size:
            raise ShardError(
                url,
                f"truncated: member {info.name!r} at byte {where} has {len(data)} of {size} data bytes",
            )
        pad = _padded(size) - size
        if pad and len(r.read(pad)) < pad:
            raise ShardError(url, f"truncated: member {info.name!r} at byte {where} is missing its padding")
        if info.type == tarfile.XHDTYPE:
            pax = {**global_pax, **_parse_pax(data, url, where)}
            continue
        if info.type == tarfile.XGLTYPE:
            global_pax.update(_parse_pax(data, url, where))
            member_start = None
            continue
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.GNUTYPE_LONGLINK:
            continue
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise ShardError(url, f"unsupported: GNU sparse member {info.name!r} at byte {where}")
        name = long_name or pax.get("path") or global_pax.get("path") or info.name
        start, end = member_start, r.pos
        pax, long_name, member_start = dict(global_pax), None, None
        if info.type not in _REGULAR_TYPES:
            continue  # directories, links, devices carry no sample data
        n_members += 1
        yield _Member(name=name, data=data, offset=base + start, end=base + end)


def _iter_groups(members: Iterable[_Member], url: str) -> Iterator[_Group]:
    """Group contiguous members by key (webdataset's grouping rule)."""
    cur: _Group | None = None
    seen: set[str] = set()
    for m in members:
        key, ext = split_member_name(m.name)
        if not ext:
            continue  # not a sample member (no extension)
        if cur is not None and key == cur.key:
            if ext in cur.parts:
                raise SampleError(url, f"duplicate member {m.name!r}", key=key)
            cur.parts[ext] = m.data
            cur.end = m.end
            continue
        if cur is not None:
            yield cur
        if key in seen:
            raise SampleError(url, f"key appears again at byte {m.offset} (members not contiguous)", key=key)
        seen.add(key)
        cur = _Group(key=key, parts={ext: m.data}, offset=m.offset, end=m.end)
    if cur is not None:
        yield cur


# numpy parses .npy headers with ast.literal_eval, which is not thread-safe on some CPython
# releases (gh-106905; seen here on 3.11.7 as "SystemError: AST constructor recursion depth
# mismatch" when loader threads parse at once): a good sample would be counted as damaged.
_NPY_LOCK = threading.Lock()


def _decode_sample(url: str, key: str, parts: dict[str, bytes]) -> Sample:
    missing = [ext for ext in MEMBER_EXTS if ext not in parts]
    if missing:
        have = ", ".join(sorted(parts)) or "nothing"
        raise SampleError(url, f"missing member(s) {[f'{key}.{x}' for x in missing]} (has: {have})", key=key)
    try:
        with _NPY_LOCK:
            codes = np.load(io.BytesIO(parts[EXT_CODES]), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError/... for bad npy
        raise SampleError(url, f"bad npy in {key}.{EXT_CODES}: {type(e).__name__}: {e}", key=key) from e
    if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu" or codes.ndim != 2:
        raise SampleError(
            url,
            f"bad codes in {key}.{EXT_CODES}: expected 2-D integer array, got "
            f"{getattr(codes, 'dtype', type(codes).__name__)} {getattr(codes, 'shape', '')}",
            key=key,
        )
    try:
        text = parts[EXT_TEXT].decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(url, f"{key}.{EXT_TEXT} is not valid UTF-8 ({e})", key=key) from e
    try:
        meta = json.loads(parts[EXT_META])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(url, f"bad JSON in {key}.{EXT_META} ({e})", key=key) from e
    if not isinstance(meta, dict):
        raise SampleError(url, f"{key}.{EXT_META} is not a JSON object", key=key)
    if "n_frames" in meta and meta["n_frames"] != codes.shape[1]:
        raise SampleError(url, f"meta n_frames {meta['n_frames']!r} != codes T={codes.shape[1]}", key=key)
    codec = meta.get("codec")
    if isinstance(codec, dict) and "n_q" in codec and codec["n_q"] != codes.shape[0]:
        raise SampleError(url, f"meta codec n_q {codec['n_q']!r} != codes n_q={codes.shape[0]}", key=key)
    return Sample(key=key, codes=codes, text=text, meta=meta)


def _fs_reason(e: FsError) -> str:
    if e.reason == fs.NO_SUCH_FILE:
        return f"missing file ({e.reason})"
    return f"cannot open ({e.reason or e})"


def _open_shard(url: str) -> IO[bytes]:
    try:
        return fs.open_file(url, "rb")
    except FsError as e:
        raise ShardError(url, _fs_reason(e)) from e


# --------------------------------------------------------------------------- readers


def read_shard(url: str) -> Iterator[Sample]:
    """Stream all samples of a shard in order.

    ShardError for a missing/empty/corrupt/truncated shard, SampleError (a
    ShardError) for a damaged sample; both name the URL.
    """
    with _open_shard(url) as f:
        reader = _Reader(f, url)
        for g in _iter_groups(_iter_members(reader, url), url):
            yield _decode_sample(url, g.key, g.parts)


def parse_sample(data: bytes, entry: SampleEntry, shard_url: str) -> Sample:
    """Parse ``data = read_range(shard_url, entry.offset, entry.offset + entry.length)``."""
    key = entry.key
    if len(data) != entry.length:
        raise SampleError(
            shard_url,
            f"truncated range [{entry.offset}, {entry.end}): got {len(data)} of {entry.length} bytes",
            key=key,
        )
    reader = _Reader(io.BytesIO(data), shard_url)
    try:
        groups = list(_iter_groups(_iter_members(reader, shard_url, base=entry.offset, archive=False), shard_url))
    except SampleError:
        raise
    except ShardError as e:
        raise SampleError(shard_url, e.reason, key=key) from e
    found = [g.key for g in groups]
    if found != [key]:
        raise SampleError(
            shard_url,
            f"byte range [{entry.offset}, {entry.end}) holds keys {found}, not [{key!r}] (stale index?)",
            key=key,
        )
    sample = _decode_sample(shard_url, key, groups[0].parts)
    if sample.codes.shape[1] != entry.n_frames or sample.codes.shape[0] != entry.n_q:
        raise SampleError(
            shard_url,
            f"codes shape {sample.codes.shape} != index [n_q={entry.n_q}, T={entry.n_frames}] (stale index?)",
            key=key,
        )
    return sample


def read_sample(shard_url: str, entry: SampleEntry) -> Sample:
    """One sample via a single range read."""
    try:
        data = fs.read_range(shard_url, entry.offset, entry.end)
    except FsError as e:
        raise ShardError(shard_url, _fs_reason(e)) from e
    return parse_sample(data, entry, shard_url)


def load_shard_index(shard_url: str) -> ShardIndex:
    """Read the sidecar of ``shard_url``. ShardError if missing or corrupt."""
    idx_url = index_path_for(shard_url)
    try:
        raw = fs.read_bytes(idx_url)
    except FsError as e:
        raise ShardError(idx_url, f"missing shard index for {shard_url}") from e
    try:
        return ShardIndex.from_json(raw)
    except ValueError as e:
        raise ShardError(idx_url, f"corrupt shard index: {e}") from e


def build_shard_index(shard_url: str, codec: dict | None = None) -> ShardIndex:
    """Scan a tar (e.g. written by another tool) and build its ShardIndex.

    Without ``codec`` the codec comes from the first sample's metadata; every
    sample's codec (if present) must match, and codes must lie in the codebook.
    """
    if codec is not None:
        try:
            codec = validate_codec(codec)
        except ValueError as e:
            raise ShardError(shard_url, f"bad codec: {e}") from e
    entries: list[SampleEntry] = []
    with _open_shard(shard_url) as f:
        reader = _Reader(f, shard_url, hashlib.sha256())
        for g in _iter_groups(_iter_members(reader, shard_url), shard_url):
            s = _decode_sample(shard_url, g.key, g.parts)
            codec = _check_sample_codec(shard_url, s, codec)
            entries.append(_entry_from_sample(shard_url, s, g, codec))
        reader.drain()
    assert codec is not None  # _iter_members guarantees at least one sample
    return ShardIndex(
        shard=fs.basename(shard_url),
        size_bytes=reader.pos,
        sha256=reader.hasher.hexdigest(),
        codec=codec,
        samples=entries,
    )


def _check_sample_codec(url: str, s: Sample, codec: dict | None) -> dict:
    mc = s.meta.get("codec")
    if codec is None:
        if mc is None:
            raise SampleError(url, "no codec in metadata; pass codec= explicitly", key=s.key)
        try:
            codec = validate_codec(mc)
        except ValueError as e:
            raise SampleError(url, f"bad codec in metadata: {e}", key=s.key) from e
    elif mc is not None and mc != codec:
        raise SampleError(url, f"codec {mc!r} differs from shard codec {codec!r}", key=s.key)
    n_q, cbs = codec["n_q"], codec["codebook_size"]
    if s.codes.shape[0] != n_q:
        raise SampleError(url, f"codes n_q={s.codes.shape[0]} != codec n_q={n_q}", key=s.key)
    if s.codes.size and (s.codes.min() < 0 or s.codes.max() >= cbs):
        raise SampleError(url, f"codes outside codebook [0, {cbs})", key=s.key)
    return codec


def _entry_from_sample(url: str, s: Sample, g: _Group, codec: dict) -> SampleEntry:
    n_frames = int(s.codes.shape[1])
    duration = s.meta.get("duration_s")
    if duration is None:
        duration = n_frames / float(codec["frame_rate"])
    try:
        duration = float(duration)
    except (TypeError, ValueError) as e:
        raise SampleError(url, f"duration_s {duration!r} is not a number", key=s.key) from e
    meta = {**s.meta, "duration_s": duration}
    return _make_entry(s.key, g.offset, g.end, s.codes, s.text, len(s.text.encode("utf-8")), meta)
