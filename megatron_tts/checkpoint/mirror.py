"""Copies committed checkpoints to an object store (``checkpoint.mirror=s3://bucket/prefix``) in
a background thread: data files, then MANIFEST.json, a check of every remote size and of the
manifest's bytes, then COMMITTED last, so a remote copy without its marker is never mistaken for
a checkpoint. Failures are retried with backoff and reported, never fatal."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from typing import Optional

from megatron_tts.checkpoint.errors import SAVE_ERRORS
from megatron_tts.checkpoint.format import COMMITTED, MANIFEST
from storage.fs import get_fs

log = logging.getLogger(__name__)


class Mirror:
    """Copies committed checkpoints to ``url`` (s3://bucket/prefix) one at a time: data files,
    then MANIFEST.json, a check of every remote size and of the manifest's bytes, then COMMITTED.
    Retries with exponential backoff; results are queued for the training thread to report."""

    def __init__(self, url: str, retries: int) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.results: "queue.Queue[dict]" = queue.Queue()
        self._todo: "queue.Queue[Optional[tuple[int, str]]]" = queue.Queue()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ckpt-mirror", daemon=True)
        self._thread.start()

    def submit(self, step: int, path: str) -> None:
        with self._lock:
            self._busy.add(path)
        self._todo.put((step, path))

    def busy(self) -> set[str]:
        with self._lock:
            return set(self._busy)

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.busy():
                return True
            time.sleep(0.05)
        return not self.busy()

    def close(self) -> None:
        self._todo.put(None)

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            step, path = item
            t0 = time.perf_counter()
            remote = f"{self.url}/{os.path.basename(path)}"
            error = None
            for attempt in range(self.retries + 1):
                try:
                    nbytes = self._copy(path, remote)
                    error = None
                    break
                except SAVE_ERRORS as e:  # noqa: BLE001 - a mirror failure alerts, never kills
                    error = f"{type(e).__name__}: {e}"
                    log.warning("checkpoint mirror of step %d to %s: attempt %d/%d failed: %s", step, remote,
                                attempt + 1, self.retries + 1, error)
                    if attempt < self.retries:
                        time.sleep(min(30.0, 2.0 ** attempt))
            if error is None:
                self.results.put({"event": "checkpoint_mirrored", "step": step, "remote": remote, "bytes": nbytes,
                                  "seconds": round(time.perf_counter() - t0, 3)})
            else:
                log.error("ALERT checkpoint mirror failed: step %d to %s after %d attempt(s): %s; training "
                          "continues (the local checkpoint is intact)", step, remote, self.retries + 1, error)
                self.results.put({"event": "checkpoint_mirror_failed", "step": step, "remote": remote,
                                  "error": error, "attempts": self.retries + 1})
            with self._lock:
                self._busy.discard(path)

    @staticmethod
    def _copy(path: str, remote: str) -> int:
        fs, base = get_fs(remote)
        manifest_bytes = open(os.path.join(path, MANIFEST), "rb").read()
        manifest = json.loads(manifest_bytes)
        if fs.exists(f"{base}/{COMMITTED}"):  # a re-upload: un-commit the remote copy first
            fs.rm(f"{base}/{COMMITTED}")
        for e in manifest["files"]:
            fs.put_file(os.path.join(path, e["path"]), f"{base}/{e['path']}")
        fs.put_file(os.path.join(path, MANIFEST), f"{base}/{MANIFEST}")
        sizes = {os.path.relpath(p, base): info["size"] for p, info in fs.find(base, detail=True).items()}
        for e in manifest["files"]:
            if sizes.get(e["path"]) != e["size"]:
                raise RuntimeError(f"remote {e['path']}: size {sizes.get(e['path'])} != {e['size']}")
        if hashlib.sha256(fs.cat_file(f"{base}/{MANIFEST}")).digest() != hashlib.sha256(manifest_bytes).digest():
            raise RuntimeError(f"remote {MANIFEST} differs from the local one")
        fs.put_file(os.path.join(path, COMMITTED), f"{base}/{COMMITTED}")
        if fs.size(f"{base}/{COMMITTED}") != os.path.getsize(os.path.join(path, COMMITTED)):
            raise RuntimeError(f"remote {COMMITTED} has the wrong size")
        return manifest["total_bytes"]
