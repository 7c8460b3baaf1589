"""Durable local writes: fsync'd files and directories, and streamed sha256 of a file."""

from __future__ import annotations

import hashlib
import os

_BLOCK = 8 << 20


def write_durable(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the directory entry is the caller's: fsync_dir)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """fsync a directory, so that renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under root."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()
