"""Reading samples by byte range: adjacent ranges coalesced into one request, remote ranges fetched
concurrently, transient errors retried (never silently dropped)."""

from __future__ import annotations

import errno
import logging
import time

from storage import fs

from . import shards

logger = logging.getLogger("data_pipeline.loader")

_MAX_COALESCED_READ = 64 << 20
_READ_RETRIES = 3


def coalesce(order: list[int], entries: list[shards.SampleEntry]) -> list[list[int]]:
    """Group samples (sorted by offset) whose byte ranges touch into runs read with one request."""
    runs: list[list[int]] = []
    for k in order:
        e = entries[k]
        if runs:
            last, first = entries[runs[-1][-1]], entries[runs[-1][0]]
            if last.offset + last.length == e.offset and e.offset + e.length - first.offset <= _MAX_COALESCED_READ:
                runs[-1].append(k)
                continue
        runs.append([k])
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
