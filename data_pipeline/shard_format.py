"""WebDataset token shards: the format (member names, codes dtype, keys, codec metadata), the
per-shard sidecar index (ShardIndex) and the dataset index (DatasetIndex).

Tar layout per sample (contiguous, in this order)::

    {key}.codes.npy   np.save of [n_q, T], uint16 if codebook_size <= 65536 else int32
    {key}.txt         UTF-8 transcript
    {key}.json        metadata (codec, duration_s, n_frames, speaker, language, dataset, ...)

Each ``shard-NNNNNN.tar`` has a sidecar ``shard-NNNNNN.idx.json`` (ShardIndex) with the byte range
of every sample, so loaders can fetch single samples with one range read and packing plans never
open tars. A dataset directory has an ``index.json`` (DatasetIndex) summarising its shards.
Writing: data_pipeline.shard_writer; reading: data_pipeline.shard_reader; data_pipeline.shards
gathers all three.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from storage import fs
from storage.fs import FsError

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
            raise ShardError(index_url, "missing dataset index; build it from the shards with "
                                        f"`python -m data_pipeline index {base}/*.tar --dataset {base}`") from e
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


# What identifies a codec: two datasets agreeing on all of it hold the same kind of codes.
CODEC_IDENTITY_KEYS = CODEC_KEYS + ("checkpoint_sha256",)


def codec_identity(codec: dict) -> dict:
    """The identifying fields of a dataset's codec (name, version, sample and frame rate, books,
    codebook size, weights sha256), numbers normalised so that 50 and 50.0 agree."""
    out = {}
    for k in CODEC_IDENTITY_KEYS:
        if k in codec and codec[k] is not None:
            v = codec[k]
            out[k] = float(v) if k in ("sample_rate", "frame_rate") else (str(v) if k == "version" else v)
    return out


def codec_differences(a: dict, b: dict) -> list[str]:
    """Identity fields on which two codec dicts disagree (one recording a field the other lacks counts)."""
    ia, ib = codec_identity(a), codec_identity(b)
    return [f"{k}: {ia.get(k, 'not recorded')!r} vs {ib.get(k, 'not recorded')!r}"
            for k in CODEC_IDENTITY_KEYS if ia.get(k) != ib.get(k)]


def zero_frames_problem(n_frames: int) -> str | None:
    """The one rule the writer and the index builder share: a sample without codec frames holds
    no speech to train on."""
    return "codes have 0 frames (no speech to train on)" if n_frames == 0 else None


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
