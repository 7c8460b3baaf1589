"""The compact index: one file per dataset (``index.cidx``) of fixed-width columns that a loader
rank range-reads instead of parsing every shard's JSON sidecar.

At 10^8 utterances the sidecars are ~40 GB of JSON; 1,024 ranks each loading them is a GET storm
and gigabytes of Python objects per rank. Here a rank reads a small header and the shard table at
open (O(shards)), then, per shard it plans or reads, only that shard's slice of the columns it
needs (O(samples it touches)): nothing per sample of the whole corpus.

File layout (little-endian)::

    [0, 8)          MAGIC
    [8, 16)         u64 header length H
    [16, 16 + H)    header: UTF-8 JSON (name, codec, counts, the column table), space padded
    ...             columns, each 64-byte aligned, at the offsets the header names

Shard table (one row per shard, in index.json's order): ``row_start`` (u64, n_shards + 1: the
rows of shard s are [row_start[s], row_start[s + 1])), ``path_offsets`` + ``paths`` (the tar paths
relative to the dataset dir, a UTF-8 heap), ``size_bytes``, ``sha256`` (32 raw bytes each).

Sample columns (one row per sample, grouped by shard in the shard's tar order): ``offset`` and
``nbytes`` (the sample's byte range in its tar), ``n_frames``, ``text_bytes`` (UTF-8 length of the
transcript), ``duration_s`` (f4), and ``tokens:<fp>`` columns: text token counts of the tokenizer
with fingerprint ``fp`` (``data_pipeline index --text-tokenizer`` adds one; the byte tokenizer's
count is ``text_bytes``). Integer widths are the narrowest that fit (u2/u4/u8), named in the
header. The shard id and the source of a row are not stored per row: rows are grouped by shard
(the shard table gives the ranges) and a file is one dataset, i.e. one source (8 bytes a sample,
800 MB at 10^8, saved).

Versioned (``version``): a reader refuses files newer than it knows. Written atomically after
``index.json``, whose size and sha256 it records so that a loader notices a stale file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, Any, Iterable, Optional

import numpy as np

from storage import fs

from .shard_format import ShardIndex

MAGIC = b"TTSCIDX\n"
VERSION = 1
FILENAME = "index.cidx"
BYTE_TOKENIZER = "byte-v1"  # ByteTokenizer.fingerprint: one token per UTF-8 byte
_ALIGN = 64
_PROBE = 4 << 10  # first read at open: magic, header length and (usually) the whole header
_CHUNK_ROWS = 1 << 22
_CACHE_BLOCKS = 4096

SHARD_COLUMNS = ("row_start", "path_offsets", "paths", "size_bytes", "sha256")
SAMPLE_COLUMNS = ("offset", "nbytes", "n_frames", "text_bytes", "duration_s")


class CompactIndexError(ValueError):
    """A compact index is missing, corrupt, truncated, stale or of a newer version; names the URL."""


def tokens_column(fingerprint: str) -> str:
    return f"tokens:{fingerprint}"


def _uint_dtype(max_value: int) -> str:
    for dt in ("<u2", "<u4", "<u8"):
        if max_value < np.iinfo(np.dtype(dt)).max:
            return dt
    raise ValueError(f"value {max_value} does not fit u8")


def _pad(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------------------- writing


class CompactIndexWriter:
    """Collects shards one at a time (rows spill to temporary files, so a dataset of 10^8 samples
    is written in constant memory) and writes the file with :meth:`write` / :meth:`save`.

    ``tokenizers``: text tokenizers whose token counts become ``tokens:<fp>`` columns (from the
    sidecar texts; ``add_arrays`` callers pass the counts themselves).
    """

    def __init__(self, tokenizers: Iterable[Any] = ()) -> None:
        self.tokenizers = [t for t in tokenizers if t.fingerprint != BYTE_TOKENIZER]
        self._paths: list[bytes] = []
        self._rows: list[int] = []
        self._sizes: list[int] = []
        self._sha: list[bytes] = []
        names = list(SAMPLE_COLUMNS) + [tokens_column(t.fingerprint) for t in self.tokenizers]
        self._wide = {n: (np.float32 if n == "duration_s" else np.uint64) for n in names}
        self._spill = {n: tempfile.TemporaryFile() for n in names}  # noqa: SIM115 - closed in write()
        self._max = {n: 0 for n in names}
        self._written = False

    @property
    def n_samples(self) -> int:
        return sum(self._rows)

    def add_shard(self, path: str, idx: ShardIndex, n_q: Optional[int] = None) -> None:
        """One shard from its sidecar index; ``path`` relative to the dataset dir."""
        if n_q is not None:
            bad = next((e for e in idx.samples if e.n_q != n_q), None)
            if bad is not None:
                raise CompactIndexError(f"{path}: sample {bad.key!r} has n_q={bad.n_q}, the codec says {n_q}")
        s = idx.samples
        tokens = {}
        for t in self.tokenizers:
            texts = [e.text for e in s]
            batch = getattr(t, "encode_batch", None)
            ids = batch(texts) if batch is not None else [t.encode(x) for x in texts]
            tokens[t.fingerprint] = np.fromiter((len(i) for i in ids), np.uint64, len(s))
        self.add_arrays(
            path, idx.size_bytes, idx.sha256,
            offset=np.fromiter((e.offset for e in s), np.uint64, len(s)),
            nbytes=np.fromiter((e.length for e in s), np.uint64, len(s)),
            n_frames=np.fromiter((e.n_frames for e in s), np.uint64, len(s)),
            text_bytes=np.fromiter((e.text_bytes for e in s), np.uint64, len(s)),
            duration_s=np.fromiter((e.duration_s for e in s), np.float32, len(s)),
            tokens=tokens,
        )

    def add_arrays(self, path: str, size_bytes: int, sha256_hex: str, *, offset: np.ndarray, nbytes: np.ndarray,
                   n_frames: np.ndarray, text_bytes: np.ndarray, duration_s: np.ndarray,
                   tokens: Optional[dict[str, np.ndarray]] = None) -> None:
        """One shard as column arrays (one entry per sample, in tar order)."""
        if self._written:
            raise ValueError("CompactIndexWriter: already written")
        n = len(offset)
        cols = {"offset": offset, "nbytes": nbytes, "n_frames": n_frames, "text_bytes": text_bytes,
                "duration_s": duration_s}
        tokens = dict(tokens or {})
        for t in self.tokenizers:
            if t.fingerprint not in tokens:
                raise ValueError(f"{path}: no token counts for tokenizer {t.fingerprint}")
            cols[tokens_column(t.fingerprint)] = tokens.pop(t.fingerprint)
        if tokens:
            raise ValueError(f"{path}: token counts for tokenizers the writer was not given: {sorted(tokens)}")
        for name, arr in cols.items():
            a = np.asarray(arr)
            if a.shape != (n,):
                raise ValueError(f"{path}: column {name} has shape {a.shape}, expected ({n},)")
            if name != "duration_s" and n and (a.min() < 0):
                raise ValueError(f"{path}: column {name} has negative values")
            a = a.astype(self._wide[name], copy=False)
            if n and name != "duration_s":
                self._max[name] = max(self._max[name], int(a.max()))
            a.tofile(self._spill[name])
        if n and int(np.max(np.asarray(offset, np.uint64) + np.asarray(nbytes, np.uint64))) > size_bytes:
            raise ValueError(f"{path}: a sample's byte range ends past the shard's {size_bytes} bytes")
        sha = bytes.fromhex(sha256_hex)
        if len(sha) != 32:
            raise ValueError(f"{path}: sha256 {sha256_hex!r} is not 32 bytes of hex")
        self._paths.append(path.encode("utf-8"))
        self._rows.append(n)
        self._sizes.append(int(size_bytes))
        self._sha.append(sha)

    def _layout(self, name: str, codec: dict, index_json: Optional[bytes]) -> tuple[dict, list[tuple[str, Any]]]:
        n_shards, n = len(self._rows), self.n_samples
        row_start = np.zeros(n_shards + 1, np.uint64)
        np.cumsum(self._rows, out=row_start[1:])
        path_offsets = np.zeros(n_shards + 1, np.uint64)
        np.cumsum([len(p) for p in self._paths], out=path_offsets[1:])
        shard_data = [("row_start", row_start), ("path_offsets", path_offsets),
                      ("paths", np.frombuffer(b"".join(self._paths), np.uint8)),
                      ("size_bytes", np.asarray(self._sizes, np.uint64)),
                      ("sha256", np.frombuffer(b"".join(self._sha), np.uint8))]
        dtypes = {c: ("<f4" if c == "duration_s" else _uint_dtype(self._max[c])) for c in self._spill}
        if dtypes["offset"] == "<u2":
            dtypes["offset"] = "<u4"
        plan: list[tuple[str, Any]] = [(c, a) for c, a in shard_data] + [(c, None) for c in self._spill]
        columns: dict[str, dict] = {}
        header = {
            "format": "megatron-tts compact index", "version": VERSION, "name": name, "codec": codec,
            "n_samples": n, "n_shards": n_shards, "columns": columns,
            "tokens": {BYTE_TOKENIZER: "text_bytes", **{t.fingerprint: tokens_column(t.fingerprint)
                                                        for t in self.tokenizers}},
            "index_json": None if index_json is None else {"size": len(index_json),
                                                           "sha256": hashlib.sha256(index_json).hexdigest()},
        }
        # the header's size depends on the offsets it lists: lay out again until it fits
        head = 0
        while True:
            pos = _pad(16 + head)
            for c, a in plan:
                dt = a.dtype.str if a is not None else dtypes[c]
                count = len(a) if a is not None else n
                columns[c] = {"dtype": dt, "offset": pos, "count": count}
                pos = _pad(pos + count * np.dtype(dt).itemsize)
            header["file_size"] = pos
            size = len(json.dumps(header, sort_keys=True).encode())
            if size <= head:
                break
            head = size + 64  # slack for offsets that gain a digit
        header["_head"] = head
        return header, plan

    def write(self, out: IO[bytes], name: str, codec: dict, index_json: Optional[bytes] = None) -> int:
        """Write the file to ``out``; returns its size. ``index_json``: the bytes of the dataset's
        index.json written with it (recorded so that a stale pair is noticed)."""
        header, plan = self._layout(name, codec, index_json)
        head = header.pop("_head")
        raw = json.dumps(header, sort_keys=True).encode()
        raw += b" " * (head - len(raw))
        pos = 0

        def put(b: bytes) -> None:
            nonlocal pos
            out.write(b)
            pos += len(b)

        put(MAGIC + np.uint64(head).tobytes() + raw)
        try:
            for c, a in plan:
                meta = header["columns"][c]
                put(b"\0" * (meta["offset"] - pos))
                if a is not None:
                    put(np.ascontiguousarray(a, np.dtype(meta["dtype"])).tobytes())
                    continue
                f = self._spill[c]
                f.flush()
                f.seek(0)
                wide = np.dtype(self._wide[c])
                while True:
                    chunk = np.fromfile(f, wide, _CHUNK_ROWS)
                    if not len(chunk):
                        break
                    put(chunk.astype(meta["dtype"]).tobytes())
            put(b"\0" * (header["file_size"] - pos))
        finally:
            self.close()
        return pos

    def save(self, dataset_dir: str, name: str, codec: dict, index_json: Optional[bytes] = None) -> str:
        """Write ``dataset_dir/index.cidx`` atomically (local: tmp + fsync + rename; remote: one
        upload of a finished local file). Returns its URL."""
        url = fs.join(dataset_dir, FILENAME)
        if fs.is_remote(url):
            fd, tmp = tempfile.mkstemp(suffix=".cidx")
            os.close(fd)
        else:
            tmp = fs.local_tmp_path(fs.local_path(url))
        try:
            with open(tmp, "wb") as f:
                self.write(f, name, codec, index_json)
            if fs.is_remote(url):
                fs.put_file(tmp, url)
                os.unlink(tmp)
            else:
                fs.commit_local(tmp, fs.local_path(url))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return url

    def close(self) -> None:
        self._written = True
        for f in self._spill.values():
            f.close()


def write_for_dataset(dataset_dir: str, name: str, codec: dict, shards: Iterable[tuple[str, ShardIndex]],
                      index_json: bytes, tokenizers: Iterable[Any] = ()) -> str:
    """The compact index of a dataset whose sidecars are ``shards`` ((tar path relative to the
    dataset dir, ShardIndex) in index.json's order); returns its URL."""
    w = CompactIndexWriter(tokenizers)
    try:
        for path, idx in shards:
            w.add_shard(path, idx, n_q=int(codec["n_q"]) if "n_q" in codec else None)
    except BaseException:
        w.close()
        raise
    return w.save(dataset_dir, name, codec, index_json)


# ----------------------------------------------------------------------------------------- reading


class _Source:
    """Positional reads from the file, counted (``bytes_read``): what a rank costs its storage."""

    def __init__(self, url: str, data: Optional[bytes] = None) -> None:
        self.url = url
        self.bytes_read = 0
        self.reads = 0
        self._data = data
        self._fd: Optional[int] = None
        self._lock = threading.Lock()
        if data is None and not fs.is_remote(url):
            try:
                self._fd = os.open(fs.local_path(url), os.O_RDONLY)
            except FileNotFoundError as e:
                raise fs.FsError(url, fs.NO_SUCH_FILE) from e

    def size(self) -> int:
        if self._data is not None:
            return len(self._data)
        if self._fd is not None:
            return os.fstat(self._fd).st_size
        return fs.size(self.url)

    def read(self, offset: int, n: int) -> bytes:
        if n <= 0:
            return b""
        if self._data is not None:
            out = bytes(self._data[offset:offset + n])
        elif self._fd is not None:
            parts, got = [], 0
            while got < n:
                b = os.pread(self._fd, n - got, offset + got)  # thread-safe: no shared file position
                if not b:
                    break
                parts.append(b)
                got += len(b)
            out = b"".join(parts)
        else:
            from .byte_ranges import read_range  # (retries transient object-store errors)

            out = read_range(self.url, offset, offset + n)
        with self._lock:
            self.bytes_read += len(out)
            self.reads += 1
        if len(out) < n:
            raise CompactIndexError(f"{self.url}: truncated (wanted bytes [{offset}, {offset + n}), got {len(out)})")
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class _Column:
    dtype: np.dtype
    offset: int
    count: int


class CompactIndex:
    """A read-only view of one ``index.cidx``. Thread-safe; per-shard column slices are cached."""

    def __init__(self, source: _Source, base_url: str) -> None:
        self._src = source
        self.url = source.url
        self.base_url = base_url
        probe = source.read(0, min(_PROBE, source.size()))
        if probe[:8] != MAGIC:
            raise CompactIndexError(f"{self.url}: not a compact index (bad magic)")
        head = int(np.frombuffer(probe[8:16], np.uint64)[0])
        raw = probe[16:16 + head] if 16 + head <= len(probe) else source.read(16, head)
        try:
            h = json.loads(raw)
            version = h["version"]
        except (ValueError, KeyError, TypeError) as e:
            raise CompactIndexError(f"{self.url}: corrupt header ({e})") from e
        if not isinstance(version, int) or version > VERSION:
            raise CompactIndexError(f"{self.url}: compact index version {version!r} is newer than this reader "
                                    f"({VERSION}); upgrade, or rebuild it with `python -m data_pipeline index`")
        try:
            self.name: str = str(h["name"])
            self.codec: dict = dict(h["codec"])
            self.n_samples: int = int(h["n_samples"])
            self.n_shards: int = int(h["n_shards"])
            self.tokens: dict[str, str] = dict(h["tokens"])
            self.index_json: Optional[dict] = h.get("index_json")
            self._cols = {c: _Column(np.dtype(m["dtype"]), int(m["offset"]), int(m["count"]))
                          for c, m in h["columns"].items()}
            file_size = int(h["file_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CompactIndexError(f"{self.url}: corrupt header ({type(e).__name__}: {e})") from e
        missing = [c for c in SHARD_COLUMNS + SAMPLE_COLUMNS if c not in self._cols]
        if missing:
            raise CompactIndexError(f"{self.url}: corrupt header (no columns {missing})")
        if source.size() < file_size:
            raise CompactIndexError(f"{self.url}: truncated ({source.size()} of {file_size} bytes)")
        # the shard table: O(shards), read once
        self.row_start = self._read_all("row_start").astype(np.int64)
        self._path_offsets = self._read_all("path_offsets").astype(np.int64)
        self._paths = self._read_all("paths").tobytes()
        if (len(self.row_start) != self.n_shards + 1 or self.row_start[0] != 0 or self.row_start[-1] != self.n_samples
                or (np.diff(self.row_start) < 0).any() or len(self._path_offsets) != self.n_shards + 1):
            raise CompactIndexError(f"{self.url}: corrupt shard table")
        self.shard_sizes = np.diff(self.row_start)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    # --- opening
    @classmethod
    def open(cls, dataset_dir: str) -> "CompactIndex":
        """Open ``dataset_dir/index.cidx`` (local or remote). FsError if there is none."""
        return cls(_Source(fs.join(dataset_dir, FILENAME)), dataset_dir)

    @classmethod
    def from_bytes(cls, data: bytes, base_url: str) -> "CompactIndex":
        """An index held in memory (built on the fly for a dataset that has none on disk)."""
        return cls(_Source(f"{fs.join(base_url, FILENAME)} (built in memory)", data), base_url)

    def close(self) -> None:
        self._src.close()

    # --- reads
    @property
    def bytes_read(self) -> int:
        return self._src.bytes_read

    @property
    def reads(self) -> int:
        return self._src.reads

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        c = self._cols[name]
        if not 0 <= start <= stop <= c.count:
            raise IndexError(f"{self.url}: rows [{start}, {stop}) of column {name} (count {c.count})")
        size = c.dtype.itemsize
        return np.frombuffer(self._src.read(c.offset + start * size, (stop - start) * size), c.dtype)

    def _read_all(self, name: str) -> np.ndarray:
        return self._read(name, 0, self._cols[name].count)

    def has_column(self, name: str) -> bool:
        return name in self._cols

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a sample column (uncached)."""
        return self._read(name, start, stop)

    def column(self, name: str, shard: int) -> np.ndarray:
        """The rows of ``shard`` in sample column ``name`` (cached; read-only)."""
        key = (name, shard)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        arr = self._read(name, int(self.row_start[shard]), int(self.row_start[shard + 1]))
        with self._lock:
            self._cache[key] = arr
            while len(self._cache) > _CACHE_BLOCKS:
                self._cache.popitem(last=False)
        return arr

    def tokens_column(self, fingerprint: str) -> Optional[str]:
        """The column holding text token counts of tokenizer ``fingerprint``, or None."""
        name = self.tokens.get(fingerprint)
        return name if name is not None and name in self._cols else None

    # --- the shard table
    def shard_path(self, shard: int) -> str:
        a, b = int(self._path_offsets[shard]), int(self._path_offsets[shard + 1])
        return self._paths[a:b].decode("utf-8")

    def shard_url(self, shard: int) -> str:
        return fs.join(self.base_url, self.shard_path(shard))

    def shard_digest_lines(self) -> Iterable[bytes]:
        """``basename\\0n_samples\\0sha256\\n`` per shard: what the loader's dataset fingerprint hashes."""
        sha = self._read_all("sha256").reshape(-1, 32)
        for s in range(self.n_shards):
            yield f"{fs.basename(self.shard_path(s))}\0{int(self.shard_sizes[s])}\0{sha[s].tobytes().hex()}\n".encode()

    def size_bytes(self) -> np.ndarray:
        return self._read_all("size_bytes").astype(np.int64)

    def shard_sha256(self) -> list[str]:
        """Every shard's sha256 (hex), in shard order."""
        return [row.tobytes().hex() for row in self._read_all("sha256").reshape(-1, 32)]


def build_in_memory(ds: Any, indexes: list[ShardIndex], tokenizers: Iterable[Any] = ()) -> CompactIndex:
    """The compact index of a loaded DatasetIndex ``ds`` and its sidecars, held in memory (a
    dataset written before compact indexes existed)."""
    w = CompactIndexWriter(tokenizers)
    try:
        for summary, idx in zip(ds.shards, indexes):
            w.add_shard(summary.path, idx)
    except BaseException:
        w.close()
        raise
    buf = io.BytesIO()
    w.write(buf, ds.name, ds.codec)
    return CompactIndex.from_bytes(buf.getvalue(), ds.base_url)


__all__ = ["BYTE_TOKENIZER", "CompactIndex", "CompactIndexError", "CompactIndexWriter", "FILENAME", "MAGIC",
           "VERSION", "build_in_memory", "tokens_column", "write_for_dataset"]
