"""Reading samples by byte range: adjacent ranges coalesced into one request, remote ranges fetched
concurrently, transient errors retried (never silently dropped)."""

from __future__ import annotations

import errno
import logging
import time

import numpy as np

from storage import fs

logger = logging.getLogger("data_pipeline.loader")

_MAX_COALESCED_READ = 64 << 20
_READ_RETRIES = 3


def coalesce(order: list[int], offsets: np.ndarray, nbytes: np.ndarray) -> list[list[int]]:
    """Group samples (``order``: their rows, sorted by offset) whose byte ranges touch into runs
    read with one request (at most 64 MiB each)."""
    runs: list[list[int]] = []
    run_start = run_end = 0
    for k in order:
        off, end = int(offsets[k]), int(offsets[k]) + int(nbytes[k])
        if runs and run_end == off and end - run_start <= _MAX_COALESCED_READ:
            runs[-1].append(k)
            run_end = end
            continue
        runs.append([k])
        run_start, run_end = off, end
    return runs

def fetch_spans(url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """Bytes of each [start, end) span of ``url``. FsError if the file is gone.

    Local files are opened once per call; remote spans are fetched concurrently
    (fsspec cat_ranges), because one request per utterance at object-store
    latency would otherwise bound the loader at a few dozen samples/s.
    """
    if not fs.is_remote(url):
        with fs.open_file(url) as f:
            out = []
            for start, end in spans:
                f.seek(start)
                out.append(f.read(end - start))
            return out
    fsys, path = fs.get_fs(url)
    if len(spans) > 1 and hasattr(fsys, "cat_ranges"):
        results = fsys.cat_ranges([path] * len(spans), [a for a, _ in spans], [b for _, b in spans],
                                  on_error="return")
    else:
        results = [None] * len(spans)
    out = []
    for (start, end), res in zip(spans, results):
        if isinstance(res, FileNotFoundError):
            raise fs.FsError(url, "no such file") from res
        if not isinstance(res, bytes):
            res = read_range(url, start, end)  # retried, or the single-span case
        out.append(res)
    return out

def read_range(url: str, start: int, end: int) -> bytes:
    for attempt in range(_READ_RETRIES):
        try:
            return fs.read_range(url, start, end)
        except fs.FsError:
            raise
        except OSError as e:
            if e.errno == errno.EINVAL:
                # object stores answer a range past the end with InvalidRange (EINVAL): a shard that
                # is shorter than its index is damaged data, reported by parse_sample as truncated
                size = fs.size(url)
                if size < end:
                    return fs.read_range(url, start, size) if start < size else b""
            # transient I/O (network, object store throttling): retry, then fail loudly rather than
            # silently dropping data, which would make the stream depend on luck
            if attempt + 1 == _READ_RETRIES:
                raise
            logger.warning("read of %s [%d, %d) failed (%s); retrying", url, start, end, e)
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")
