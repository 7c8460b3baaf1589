"""The checkpoint on disk: names, manifest, COMMITTED marker, listing, verification and
retention. Plain file operations: no torch.distributed, no megatron.

Layout of one checkpoint::

    CKPT_ROOT/step_00000100/
        __R_N.distcp, .metadata        model + optimizer, sharded, reshardable across TP/PP/DP
        metadata.json                  megatron's format marker
        trainer_state.json             step, consumed counts, scheduler, loader, fingerprint (JSON)
        rng/rank_00000.pt ...          per-rank RNG states (tensors only, loaded weights_only)
        MANIFEST.json                  every file above: relative path, size, sha256
        COMMITTED                      written last; holds the sha256 of MANIFEST.json
    CKPT_ROOT/COMMITS.jsonl            one line per commit (the run has committed before)

A directory without a COMMITTED marker that matches its manifest is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from storage.durable import fsync_dir, sha256_file, write_durable

COMMITTED = "COMMITTED"
MANIFEST = "MANIFEST.json"
STATE_FILE = "trainer_state.json"
LEDGER = "COMMITS.jsonl"
TMP_PREFIX = ".tmp."
HASH_DIR = ".hashes"  # per-rank hashes of the shards each writer wrote; merged into MANIFEST.json
QUARANTINE = ".corrupt"
REPLACED = ".replaced"  # a checkpoint of the same step, moved aside while a re-save commits
TRASH_PREFIX = ".trash."  # pruned, being deleted in the background
SPACE_FACTOR = 1.2  # free space wanted before a save, as a multiple of its expected size
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    committed: bool  # has a COMMITTED marker (which may still fail verification)


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every ``step_XXXXXXXX`` directory under root, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path):
            out.append(CheckpointInfo(int(m.group(1)), path, os.path.isfile(os.path.join(path, COMMITTED))))
    return sorted(out, key=lambda i: i.step)


def committed_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of checkpoints with a COMMITTED marker, oldest first (not verified)."""
    return [(i.step, i.path) for i in list_checkpoints(root) if i.committed]


def ledger_steps(root: str, name: str = LEDGER) -> list[int]:
    """The committed steps a JSONL commit ledger records (a torn last line is skipped)."""
    path = os.path.join(root, name)
    steps = []
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line (killed mid-append)
    return steps


def ever_committed(root: str) -> bool:
    """True once any checkpoint under root was committed (even if all are gone or damaged now)."""
    if ledger_steps(root):
        return True
    if not os.path.isdir(root):
        return False
    for name in os.listdir(root):
        if (_STEP_DIR.match(name) or _STEP_DIR.match(name.split(QUARANTINE)[0])) and \
                os.path.isfile(os.path.join(root, name, COMMITTED)):
            return True
    return False


def data_files(ckpt_dir: str) -> list[str]:
    """Relative paths of the files a manifest covers (all but MANIFEST.json, COMMITTED, .hashes)."""
    out = []
    for dirpath, dirs, files in os.walk(ckpt_dir):
        dirs[:] = sorted(d for d in dirs if not (dirpath == ckpt_dir and d == HASH_DIR))
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt_dir)
            if rel not in (MANIFEST, COMMITTED):
                out.append(rel)
    return sorted(out)


def build_manifest(ckpt_dir: str, known: Optional[dict[str, tuple[int, str]]] = None) -> dict:
    """The manifest of every data file: hashes from ``known`` (rel -> (size, sha256)) where the
    size still matches, the others hashed here."""
    known = known or {}
    files = []
    for rel in data_files(ckpt_dir):
        path = os.path.join(ckpt_dir, rel)
        size = os.path.getsize(path)
        k = known.get(rel)
        sha = k[1] if k is not None and k[0] == size else sha256_file(path)
        files.append({"path": rel, "size": size, "sha256": sha})
    return {"version": 1, "files": files, "total_bytes": sum(f["size"] for f in files)}


def write_manifest(ckpt_dir: str, manifest: dict) -> str:
    """Write MANIFEST.json durably; returns its sha256 (what COMMITTED records)."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    write_durable(os.path.join(ckpt_dir, MANIFEST), data)
    return hashlib.sha256(data).hexdigest()


def write_committed(ckpt_dir: str, step: int, manifest_sha256: str) -> None:
    marker = {"step": step, "manifest_sha256": manifest_sha256, "time": time.time()}
    write_durable(os.path.join(ckpt_dir, COMMITTED), json.dumps(marker).encode())
    fsync_dir(ckpt_dir)


def seal(ckpt_dir: str, step: int) -> None:
    """Write a fresh MANIFEST.json and COMMITTED for a directory as it is now (tools and tests)."""
    write_committed(ckpt_dir, step, write_manifest(ckpt_dir, build_manifest(ckpt_dir)))


def read_commit(ckpt_dir: str) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None) when COMMITTED matches MANIFEST.json and no file is missing from or extra
    to the manifest (sizes and hashes not checked here); (None, reason) otherwise."""
    marker_path = os.path.join(ckpt_dir, COMMITTED)
    if not os.path.isfile(marker_path):
        return None, f"no {COMMITTED} marker (the save never finished)"
    try:
        with open(marker_path, "rb") as f:
            marker = json.loads(f.read())
        want = marker["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{COMMITTED} marker unreadable ({type(e).__name__}: {e})"
    try:
        with open(os.path.join(ckpt_dir, MANIFEST), "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"{MANIFEST} unreadable ({e.strerror or e})"
    if hashlib.sha256(data).hexdigest() != want:
        return None, f"{MANIFEST} does not match the sha256 recorded in {COMMITTED}"
    try:
        manifest = json.loads(data)
        entries = {e["path"]: e for e in manifest["files"]}
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST} malformed ({type(e).__name__}: {e})"
    on_disk = set(data_files(ckpt_dir))
    missing = sorted(set(entries) - on_disk)
    extra = sorted(on_disk - set(entries))
    if missing:
        return None, f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if extra:
        return None, f"{len(extra)} file(s) not in the manifest, e.g. {extra[0]}"
    return manifest, None


def verify_files(ckpt_dir: str, entries: list[dict], threads: int = 4) -> Optional[str]:
    """None when every entry has its size and sha256; else the first problem found."""

    def check(e: dict) -> Optional[str]:
        path = os.path.join(ckpt_dir, e["path"])
        try:
            size = os.path.getsize(path)
            if size != e["size"]:
                return f"{e['path']}: size {size} != {e['size']} in the manifest (truncated or overwritten)"
            if sha256_file(path) != e["sha256"]:
                return f"{e['path']}: sha256 mismatch (corrupted)"
        except OSError as err:
            return f"{e['path']}: unreadable ({err.strerror or err})"
        return None

    if not entries:
        return None
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(entries)))) as pool:
        for problem in pool.map(check, entries):
            if problem:
                return problem
    return None


def verify(ckpt_dir: str) -> Optional[str]:
    """Full single-process verification: None when the checkpoint verifies, else why not."""
    manifest, reason = read_commit(ckpt_dir)
    if reason:
        return reason
    return verify_files(ckpt_dir, manifest["files"])


def retained_steps(steps: list[int], keep_last: int, keep_every: int, reserve: int = 0) -> set[int]:
    """The committed steps the retention policy keeps. ``reserve`` slots are left for checkpoints
    about to be written; the newest committed checkpoint is always kept."""
    steps = sorted(steps)
    n = max(1, keep_last - reserve)
    keep = set(steps[-n:])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def remove_checkpoint(path: str, background: Optional[list] = None) -> None:
    """Un-commit first (so a half-deleted directory never looks committed), then delete: inline,
    or (``background``, a list collecting the threads) renamed out of sight and deleted by a
    thread, since unlinking large shards can take a while on some filesystems."""
    marker = os.path.join(path, COMMITTED)
    if os.path.exists(marker):
        os.unlink(marker)
        fsync_dir(path)
    if background is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    trash = os.path.join(os.path.dirname(path), f"{TRASH_PREFIX}{os.path.basename(path)}.{time.time_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return
    t = threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True},
                         name="ckpt-prune")  # not a daemon: an exit waits for it
    t.start()
    background.append(t)
