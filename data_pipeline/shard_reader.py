"""Reading token shards: a small tar parser instead of ``tarfile.TarFile``, because TarFile
silently treats a bad checksum or a truncated header after the first member as the end of the
archive, which would turn a damaged shard into a quietly shorter one. Whole shards
(read_shard, build_shard_index) and single samples by byte range (parse_sample, read_sample)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from storage import fs
from storage.fs import FsError

from .shard_format import (
    _BLOCK,
    _REGULAR_TYPES,
    _ZERO_BLOCK,
    EXT_CODES,
    EXT_META,
    EXT_TEXT,
    MEMBER_EXTS,
    Sample,
    SampleEntry,
    SampleError,
    ShardError,
    ShardIndex,
    _make_entry,
    index_path_for,
    split_member_name,
    validate_codec,
    zero_frames_problem,
)

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
    if len(data) != entry.length:
        raise SampleError(
            shard_url,
            f"truncated range [{entry.offset}, {entry.end}): got {len(data)} of {entry.length} bytes",
            key=entry.key,
        )
    return parse_range(data, shard_url, entry.offset, entry.n_q, entry.n_frames, key=entry.key)


def parse_range(data: bytes, shard_url: str, offset: int, n_q: int, n_frames: int, key: str | None = None) -> Sample:
    """Parse one sample's byte range cut from a shard at ``offset`` (any tar dialect the reader
    knows: pax, GNU long names, ...); its codes must be [n_q, n_frames] and, when ``key`` is given,
    its key that one. SampleError (naming the URL and key) otherwise."""
    reader = _Reader(io.BytesIO(data), shard_url)
    try:
        groups = list(_iter_groups(_iter_members(reader, shard_url, base=offset, archive=False), shard_url))
    except SampleError:
        raise
    except ShardError as e:
        raise SampleError(shard_url, e.reason, key=key) from e
    found = [g.key for g in groups]
    if len(found) != 1 or (key is not None and found != [key]):
        raise SampleError(
            shard_url,
            f"byte range [{offset}, {offset + len(data)}) holds keys {found}, not "
            f"{[key] if key is not None else 'one sample'} (stale index?)",
            key=key,
        )
    sample = _decode_sample(shard_url, found[0], groups[0].parts)
    if sample.codes.shape[1] != n_frames or sample.codes.shape[0] != n_q:
        raise SampleError(
            shard_url,
            f"codes shape {sample.codes.shape} != index [n_q={n_q}, T={n_frames}] (stale index?)",
            key=found[0],
        )
    return sample


def _ustar_member(buf: bytes | memoryview, at: int) -> tuple[bytes, int] | None:
    """(name, size) of the plain ustar header of a regular file at ``buf[at:]``, or None where the
    generic parser must look (pax/GNU headers, a name prefix, base-256 sizes, garbage)."""
    if buf[at + 156] not in (0x30, 0) or buf[at + 257 : at + 263] != b"ustar\x00" or buf[at + 345] != 0:
        return None
    name = bytes(buf[at : at + 100]).split(b"\0", 1)[0]
    try:
        size = int(bytes(buf[at + 124 : at + 136]).strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    return name, size


_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def decode_fast(buf: bytes | memoryview, start: int, length: int, n_q: int, n_frames: int,
                dtype: np.dtype) -> tuple[str, np.ndarray, str] | None:
    """(key, codes [n_q, n_frames], text) of the sample at ``buf[start:start + length]`` when it is
    laid out exactly as ShardWriter writes it (three plain ustar members codes.npy, txt, json in
    that order; a version 1.0 .npy of ``dtype`` and the index's shape), else None: the caller then
    takes the generic path (:func:`parse_range`), which handles every dialect and names the damage.

    What it checks: member names (one key, the three extensions in order), sizes that add up to
    exactly ``length``, the .npy magic and header. What it skips: tar header checksums (each field
    it uses is checked instead) and the metadata JSON, which the loader does not use.
    """
    if length < 3 * _BLOCK:
        return None
    h0 = _ustar_member(buf, start)
    if h0 is None or not h0[0].endswith(b".codes.npy"):
        return None
    stem, size0 = h0[0][: -len(b".codes.npy")], h0[1]
    npy = start + _BLOCK
    if bytes(buf[npy : npy + 8]) != _NPY_MAGIC:
        return None
    hlen = buf[npy + 8] | (buf[npy + 9] << 8)
    header = bytes(buf[npy + 10 : npy + 10 + hlen])
    want = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({n_q}, {n_frames}), }}".encode()
    if not header.startswith(want) or header[len(want):].strip(b" ") != b"\n":
        return None
    if size0 != 10 + hlen + n_q * n_frames * dtype.itemsize:
        return None
    p1 = _BLOCK + _padded(size0)
    h1 = _ustar_member(buf, start + p1) if p1 + _BLOCK <= length else None
    if h1 is None or h1[0] != stem + b".txt":
        return None
    p2 = p1 + _BLOCK + _padded(h1[1])
    h2 = _ustar_member(buf, start + p2) if p2 + _BLOCK <= length else None
    if h2 is None or h2[0] != stem + b".json" or p2 + _BLOCK + _padded(h2[1]) != length:
        return None
    try:
        key = stem.decode("utf-8")
        text = bytes(buf[start + p1 + _BLOCK : start + p1 + _BLOCK + h1[1]]).decode("utf-8")
    except UnicodeDecodeError:
        return None
    codes = np.frombuffer(buf, dtype, count=n_q * n_frames, offset=npy + 10 + hlen).reshape(n_q, n_frames)
    return key, codes, text


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
    problem = zero_frames_problem(int(s.codes.shape[1]))
    if problem:  # as the shard writer refuses it
        raise SampleError(url, f"{problem}; remove it from the tar, or re-tokenize its audio", key=s.key)
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

