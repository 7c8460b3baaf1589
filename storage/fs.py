"""One place for local paths and fsspec URLs.

Local paths and ``file://`` URLs use the builtin ``open``; anything else with a
scheme (``s3://``, ``memory://``, ...) goes through fsspec. For ``s3://`` the
endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` so a local
moto server (or MinIO) works without code changes.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from typing import IO, Any

_SCHEME_SEP = "://"
_HASH_CHUNK = 4 << 20
NO_SUCH_FILE = "no such file"


class FsError(OSError):
    """A path could not be opened/read/written. The message names the URL."""

    def __init__(self, url: str, reason: str = "") -> None:
        self.url = url
        self.reason = reason
        # Single-argument args keep the exception picklable and re-creatable
        # from its message (torch DataLoader re-raises worker errors as cls(msg)).
        super().__init__(f"{url}: {reason}" if reason else url)


def is_remote(url: str) -> bool:
    """True for URLs handled by fsspec (any scheme except file://)."""
    return _SCHEME_SEP in url and not url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local path or ``file://`` URL."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if is_remote(url):
        raise ValueError(f"{url}: not a local path")
    return url


def storage_options(url: str) -> dict[str, Any]:
    """fsspec storage options for ``url`` (endpoint overrides for s3)."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    # Shards are written by other processes; a stale listing cache would make
    # exists()/size() lie about objects uploaded after the first listing.
    opts["use_listings_cache"] = False
    return opts


def get_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a remote URL."""
    import fsspec  # imported lazily: local-only use must not need fsspec

    return fsspec.core.url_to_fs(url, **storage_options(url))


def open_file(url: str, mode: str = "rb") -> IO[bytes]:
    """Open ``url`` as a binary file object. FsError if it does not exist."""
    if "b" not in mode:
        raise ValueError(f"open_file is binary only, got mode {mode!r}")
    try:
        if not is_remote(url):
            return open(local_path(url), mode)  # noqa: SIM115 - caller closes
        fs, path = get_fs(url)
        return fs.open(path, mode)
    except FileNotFoundError as e:
        raise FsError(url, NO_SUCH_FILE) from e
    except IsADirectoryError as e:
        raise FsError(url, "is a directory") from e
    except PermissionError as e:
        raise FsError(url, "permission denied") from e


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``url``.

    May return fewer bytes than requested when the file is shorter; callers
    that know the expected length (parse_sample) report that as truncation.
    """
    if start < 0 or end < start:
        raise ValueError(f"{url}: invalid byte range [{start}, {end})")
    if end == start:
        return b""
    if not is_remote(url):
        with open_file(url) as f:
            f.seek(start)
            return f.read(end - start)
    fs, path = get_fs(url)
    try:
        return fs.cat_file(path, start=start, end=end)
    except FileNotFoundError as e:
        raise FsError(url, NO_SUCH_FILE) from e


def read_bytes(url: str) -> bytes:
    """The whole content of ``url``."""
    with open_file(url) as f:
        return f.read()


def exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = get_fs(url)
    return bool(fs.exists(path))


def isdir(url: str) -> bool:
    if not is_remote(url):
        return os.path.isdir(local_path(url))
    fs, path = get_fs(url)
    return bool(fs.isdir(path))


def size(url: str) -> int:
    """Size in bytes. FsError if missing."""
    try:
        if not is_remote(url):
            return os.path.getsize(local_path(url))
        fs, path = get_fs(url)
        return int(fs.size(path))
    except FileNotFoundError as e:
        raise FsError(url, NO_SUCH_FILE) from e


def join(url: str, *names: str) -> str:
    if not is_remote(url):
        return os.path.join(url, *names)
    out = url
    for name in names:
        out = out.rstrip("/") + "/" + name.lstrip("/")
    return out


def dirname(url: str) -> str:
    if not is_remote(url):
        return os.path.dirname(url)
    scheme, rest = url.split(_SCHEME_SEP, 1)
    return f"{scheme}{_SCHEME_SEP}{posixpath.dirname(rest.rstrip('/'))}"


def basename(url: str) -> str:
    if not is_remote(url):
        return os.path.basename(url)
    return posixpath.basename(url.split(_SCHEME_SEP, 1)[1].rstrip("/"))


def makedirs(url: str) -> None:
    """Create a directory and its parents (no-op for object stores)."""
    if not is_remote(url):
        os.makedirs(local_path(url), exist_ok=True)
        return
    fs, path = get_fs(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Full URLs/paths of the entries directly under ``url``, sorted."""
    if not is_remote(url):
        base = local_path(url)
        try:
            return sorted(os.path.join(url, n) for n in os.listdir(base))
        except FileNotFoundError as e:
            raise FsError(url, "no such directory") from e
    fs, path = get_fs(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError as e:
        raise FsError(url, "no such directory") from e
    return sorted(join(url, posixpath.basename(str(e).rstrip("/"))) for e in entries)


def sha256(url: str) -> str:
    """Hex sha256 of the whole file, streamed."""
    h = hashlib.sha256()
    with open_file(url) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. some network filesystems); rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def local_tmp_path(path: str) -> str:
    """A unique temp path in the same directory as ``path`` (same filesystem,
    so the final rename is atomic)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    os.close(fd)
    return tmp


def commit_local(tmp: str, path: str) -> None:
    """fsync ``tmp`` then atomically rename it to ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def put_file(local: str, url: str) -> None:
    """Upload (remote) or atomically move into place (local) a finished file."""
    if not is_remote(url):
        dst = local_path(url)
        tmp = local_tmp_path(dst)
        try:
            with open(local, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(_HASH_CHUNK):
                    out.write(chunk)
            commit_local(tmp, dst)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        return
    fs, path = get_fs(url)
    fs.put_file(local, path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Local: tmp + fsync + rename (readers never see a partial file).
    Remote: a plain put (object stores publish whole objects)."""
    if is_remote(url):
        fs, path = get_fs(url)
        fs.pipe_file(path, data)
        return
    dst = local_path(url)
    tmp = local_tmp_path(dst)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        commit_local(tmp, dst)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
