"""Checkpoints: model and optimizer through megatron-core dist_checkpointing (torch_dist),
everything else (scheduler, loader, train state, RNG) beside them, committed in two phases.

Layout of one checkpoint::

    CKPT_ROOT/step_00000100/
        __R_N.distcp, .metadata        model + optimizer, sharded, reshardable across TP/PP/DP
        metadata.json                  megatron's format marker
        trainer_state.json             step, consumed counts, scheduler, loader (JSON: no pickle)
        rng/rank_00000.pt ...          per-rank RNG states (tensors only, loaded weights_only)
        MANIFEST.json                  every file above: relative path, size, sha256
        COMMITTED                      written last; holds the sha256 of MANIFEST.json
    CKPT_ROOT/COMMITS.jsonl            one line per commit (the run has committed before)

**Save** (all ranks, collectively): everything is written into ``.tmp.step_XXXXXXXX``; each rank
hashes the shards it wrote; rank 0 writes MANIFEST.json, fsyncs files and directories, renames
the directory into place, fsyncs the root, then writes COMMITTED. Every phase ends with an
all-reduce of a failure flag, so all ranks agree whether a save succeeded and none commits a
partial checkpoint. Any failure (ENOSPC, EIO, EACCES, an exception inside dist_checkpointing)
deletes the partial directory, prunes per the retention policy and retries once; then an ALERT
is logged (``ALERT checkpoint save failed``), a ``checkpoint_failed`` metrics event is written
and training continues. A failed save never touches committed checkpoints.

With ``checkpoint.async_save`` the shards are written by a forked process (megatron-core's
``AsyncCallsQueue``, non-persistent 'mcore' strategy); ``poll()`` (every step) finalizes and
commits once every rank's writer is done, ``wait()`` blocks for it (before exit, before the
next save). Before a save, free space is checked against 1.2x the last checkpoint's size (or an
estimate from the model size) and the policy is applied early if it is short.

**Load** takes the newest checkpoint whose COMMITTED marker matches its manifest and whose every
file has the recorded size and sha256 (hashed in parallel: each rank hashes a share), falling
back to older ones with a warning naming what failed (failed ones are renamed ``*.corrupt``).
A directory without its marker is never loaded. If checkpoints were committed (COMMITS.jsonl or
a marker exists) but none verifies, it is fatal (``CheckpointError``, exit 3): never a silent
restart from scratch. Loading never runs pickled code: dist_checkpointing's ``.metadata`` goes
through an allow-list unpickler and every other pickled object through ``torch.load
(weights_only=True)``.

Retention keeps the newest ``checkpoint.keep_last`` committed checkpoints plus every multiple of
``checkpoint.keep_every``. ``checkpoint.mirror=s3://bucket/prefix`` copies each committed
checkpoint there in a background thread (COMMITTED last, verified by sizes and the manifest).

Every stateful component follows one convention: ``state_dict() -> dict`` and
``load_state_dict(dict)``; the JSON-able ones are listed in ``Checkpointer.components``.

``python -m megatron_tts.checkpoint verify PATH`` checks a checkpoint or a checkpoint root
without loading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import queue
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_tts.parallel import Layout

log = logging.getLogger(__name__)

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
_BLOCK = 8 << 20
# What a failed save may raise: torch DCP's CheckpointException derives from BaseException.
_ERRORS = (Exception, __import__("torch.distributed.checkpoint.api", fromlist=["x"]).CheckpointException)


class CheckpointError(RuntimeError):
    """Checkpoints were committed but none can be used, or one must not be loaded: fatal (exit 3)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asked the unpickler for something other than plain data."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------------
# Files, manifests, verification (plain file operations: no torch.distributed)
# ------------------------------------------------------------------------------------------


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


def ledger_steps(root: str) -> list[int]:
    path = os.path.join(root, LEDGER)
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


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _data_files(ckpt_dir: str) -> list[str]:
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
    for rel in _data_files(ckpt_dir):
        path = os.path.join(ckpt_dir, rel)
        size = os.path.getsize(path)
        k = known.get(rel)
        sha = k[1] if k is not None and k[0] == size else sha256_file(path)
        files.append({"path": rel, "size": size, "sha256": sha})
    return {"version": 1, "files": files, "total_bytes": sum(f["size"] for f in files)}


def _write_durable(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def write_manifest(ckpt_dir: str, manifest: dict) -> str:
    """Write MANIFEST.json durably; returns its sha256 (what COMMITTED records)."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _write_durable(os.path.join(ckpt_dir, MANIFEST), data)
    return hashlib.sha256(data).hexdigest()


def write_committed(ckpt_dir: str, step: int, manifest_sha256: str) -> None:
    marker = {"step": step, "manifest_sha256": manifest_sha256, "time": time.time()}
    _write_durable(os.path.join(ckpt_dir, COMMITTED), json.dumps(marker).encode())
    _fsync_dir(ckpt_dir)


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
    on_disk = set(_data_files(ckpt_dir))
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


def dcp_metadata_problem(ckpt_dir: str) -> Optional[str]:
    """A structural check of torch DCP's ``.metadata`` against the shard files: every tensor
    chunk and object it declares has a storage entry, and every entry lies inside its file.
    Catches an unloadable checkpoint before it is committed (its manifest would verify)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    try:
        with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
            md = _AllowListUnpickler(f, _metadata_allowed(), ".metadata").load()
    except (OSError, pickle.UnpicklingError, UnsafeCheckpointError, EOFError, ValueError) as e:
        return f".metadata unreadable ({type(e).__name__}: {e})"
    for fqn, item in md.state_dict_metadata.items():
        keys = ([MetadataIndex(fqn, c.offsets) for c in item.chunks] if isinstance(item, TensorStorageMetadata)
                else [MetadataIndex(fqn)])
        for key in keys:
            if key not in md.storage_data:
                return f".metadata declares {fqn} but stores no data for it"
    sizes: dict[str, int] = {}
    for key, info in md.storage_data.items():
        if info.relative_path not in sizes:
            path = os.path.join(ckpt_dir, info.relative_path)
            sizes[info.relative_path] = os.path.getsize(path) if os.path.isfile(path) else -1
        if info.offset + info.length > sizes[info.relative_path]:
            return f".metadata places {key.fqn} outside {info.relative_path}"
    return None


def retained_steps(steps: list[int], keep_last: int, keep_every: int, reserve: int = 0) -> set[int]:
    """The committed steps the retention policy keeps. ``reserve`` slots are left for checkpoints
    about to be written; the newest committed checkpoint is always kept."""
    steps = sorted(steps)
    n = max(1, keep_last - reserve)
    keep = set(steps[-n:])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def _remove_checkpoint(path: str, background: Optional[list] = None) -> None:
    """Un-commit first (so a half-deleted directory never looks committed), then delete: inline,
    or (``background``, a list collecting the threads) renamed out of sight and deleted by a
    thread, since unlinking large shards can take a while on some filesystems."""
    marker = os.path.join(path, COMMITTED)
    if os.path.exists(marker):
        os.unlink(marker)
        _fsync_dir(path)
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


# ------------------------------------------------------------------------------------------
# Loading without executing pickled code
# ------------------------------------------------------------------------------------------


def _metadata_allowed() -> dict[tuple[str, str], Any]:
    """The globals torch.distributed.checkpoint's ``.metadata`` pickle may name: the data classes
    and enums of its metadata, planner and filesystem modules (rebuilt without running any
    __init__ or __reduce__ of theirs), torch.Size, dtypes, layouts, memory formats."""
    import collections
    import dataclasses
    import enum

    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md
    import torch.distributed.checkpoint.planner as dcp_planner

    allowed: dict[tuple[str, str], Any] = {}
    for mod in (dcp_md, dcp_planner, dcp_fs):
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and obj.__module__ == mod.__name__ and (
                    dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                allowed[(mod.__name__, name)] = obj
    allowed[("torch", "Size")] = torch.Size
    for name, obj in vars(torch).items():
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = obj
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for name in ("set", "frozenset", "complex", "slice"):
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
    return allowed


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, f, allowed: dict, what: str) -> None:
        super().__init__(f)
        self._allowed = allowed
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(f"{self._what}: refusing to unpickle {module}.{name} (not plain "
                                        "checkpoint data; the file may have been tampered with)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._what}: unexpected persistent id in a metadata pickle")


@contextlib.contextmanager
def safe_unpickling():
    """Within this context, dist_checkpointing loads never execute pickled code: torch DCP's
    ``.metadata`` goes through an allow-list unpickler; the pickled objects inside shards
    (megatron's common state, ``_extra_state``) and a legacy ``common.pt`` through
    ``torch.load(weights_only=True)``. megatron-core 0.19.2 loads the former with plain
    ``pickle.load`` (torch filesystem.py read_metadata) and the objects with
    ``torch.load(weights_only=False)`` (torch default_planner.py load_bytes). A refusal raises
    UnsafeCheckpointError out of the load."""
    import torch.distributed.checkpoint.filesystem as dcp_fs
    from megatron.core.dist_checkpointing import serialization as mser
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    allowed = _metadata_allowed()
    refusals: list[str] = []
    saved = (dcp_fs.FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes, mser.load_common)

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _AllowListUnpickler(f, allowed, str(path)).load()
            except UnsafeCheckpointError as e:
                refusals.append(str(e))
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def weights_only(f, what: str) -> Any:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = f"{what}: refused by torch.load(weights_only=True): {str(e).splitlines()[0]}"
            refusals.append(msg)
            raise UnsafeCheckpointError(msg) from None

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = weights_only(value, f"pickled object {fqn}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    def load_common(checkpoint_dir: str):
        return weights_only(os.path.join(str(checkpoint_dir), "common.pt"), "common.pt")

    dcp_fs.FileSystemReader.read_metadata = read_metadata
    DefaultLoadPlanner.load_bytes = load_bytes
    mser.load_common = load_common
    try:
        yield refusals
    finally:
        dcp_fs.FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes, mser.load_common = saved


# ------------------------------------------------------------------------------------------
# RNG state (tensors only)
# ------------------------------------------------------------------------------------------


def rng_state() -> dict[str, torch.Tensor]:
    import random

    import numpy as np

    state = {"torch_cpu": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state(np.random.get_state())).encode(), dtype=np.uint8).copy()),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    for name, s in get_cuda_rng_tracker().get_states().items():
        if isinstance(s, torch.Tensor):
            state[f"tracker/{name}"] = s.clone()
    return state


def _np_state(s: tuple) -> list:
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch_cpu"])
    ns = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), ns[2], ns[3], ns[4]))
    ps = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((ps[0], tuple(ps[1]), ps[2]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracked = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracked:
        tracker.set_states(tracked)


# ------------------------------------------------------------------------------------------
# megatron-core's save, with failures every rank agrees on
# ------------------------------------------------------------------------------------------


def _injected_fault(context: dict, rank: int) -> bool:
    """MEGATRON_TTS_FAULT=checkpoint_write_error[:rank=R][:step=S][:attempt=A] (megatron_tts.faults)."""
    try:
        from megatron_tts import faults
    except ImportError:
        return False
    return faults.active("checkpoint_write_error", rank=rank, **context)


def _write_and_hash(write_fn: Callable, ckpt_dir: str, fault_context: dict, rank: int, write_buckets: list,
                    results_queue: Any) -> None:
    """The writer (in the forked process, or inline for a sync save): megatron's write, then the
    sha256 of the files this rank wrote, into HASH_DIR/rank_XXXXX.json. Hashing here keeps it out
    of the training loop and spreads it over all ranks. Failures go to results_queue, where
    megatron's finalize reports them on every rank (it must not raise here: a sync save's other
    ranks would wait in a barrier); a missing hash file means rank 0 hashes those files itself."""
    try:
        if _injected_fault(fault_context, rank):
            raise OSError(5, f"injected checkpoint write error on rank {rank} (MEGATRON_TTS_FAULT)")
        write_fn(rank, write_buckets, results_queue)
    except _ERRORS as e:
        with contextlib.suppress(_ERRORS):  # a dead results queue shows in the finalize instead
            results_queue.put(e)
        return
    try:
        hashes = {}
        for bucket in write_buckets:
            path = bucket[0]
            hashes[os.path.relpath(path, ckpt_dir)] = [os.path.getsize(path), sha256_file(path)]
        out = os.path.join(ckpt_dir, HASH_DIR)
        os.makedirs(out, exist_ok=True)
        _write_durable(os.path.join(out, f"rank_{rank:05d}.json"), json.dumps(hashes).encode())
    except OSError:
        pass


class _WriteFailed(RuntimeError):
    """A dist_checkpointing write failure, with the same text on every rank."""


def _finalize_on_all_ranks(storage_writer, global_metadata, dist_wrapper) -> None:
    """megatron-core's save_state_dict_async_finalize (state_dict_saver.py), except that an
    exception while rank 0 writes ``.metadata`` (ENOSPC, EIO) is broadcast like a write failure
    instead of raising on rank 0 alone while the others wait in the broadcast forever."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.utils import _get_failure_dict

    from torch.distributed.checkpoint.utils import _wrap_exception

    try:  # e.g. the results queue's Manager process died: still take part in the gather below
        write_results = storage_writer.retrieve_write_results()
    except _ERRORS as e:
        write_results = _wrap_exception(e)
    all_results = dist_wrapper.gather_object(write_results)
    error: Optional[BaseException] = None
    if dist_wrapper.is_coordinator:
        failures = _get_failure_dict(all_results)
        if failures:
            error = CheckpointException("write", failures)
        else:
            try:
                storage_writer.finish(global_metadata, all_results)
            except _ERRORS as e:  # noqa: BLE001 - any failure here must reach every rank
                error = e
    box = [None if error is None else _error_text(error)]
    torch.distributed.broadcast_object_list(box, src=dist_wrapper.coordinator_rank, group=dist_wrapper.group)
    if box[0] is not None:
        raise _WriteFailed(box[0])


def _save_strategy():
    """megatron's torch_dist save strategy with our finalize and writer, and cached save plans
    (the state's structure is the same at every save: from the third save on, planning skips
    gathering every rank's plan once megatron has validated the cache)."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class AgreeingSaveStrategy(TorchDistSaveShardedStrategy):
        fault_context: dict = {}

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret, async_strategy):
            req = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret, async_strategy)
            finalize = partial(_finalize_on_all_ranks, *save_state_dict_ret)
            if req.async_fn is not None:
                req = req._replace(async_fn=partial(_write_and_hash, req.async_fn, str(writer.checkpoint_dir),
                                                    dict(self.fault_context)))
            return req._replace(finalize_fns=[finalize])

    return AgreeingSaveStrategy(backend="torch_dist", cached_metadata=True)


def _save_request(sharded_state_dict: dict, ckpt_dir: str, strategy):
    """megatron-core's dist_checkpointing.save up to the AsyncRequest (serialization.py), minus
    its metadata.json finalize (rank 0 writes it in our commit, so a failure there cannot leave
    the other ranks in a barrier)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    sharded, common = save_preprocess(sharded_state_dict, True, None)
    sharded["common_state"] = ShardedObject(key="common_state", data=common, global_shape=(1,),
                                            global_offset=(0,), replica_id=dist.get_rank())
    return strategy.async_save(sharded, ckpt_dir, async_strategy="mcore")


def _results_queue_warmup() -> None:
    """Start megatron's results queue (a spawned Manager process) and make that process import
    what unpickling write results needs (torch, ~2.5 s on first use): in the background, not in
    the first save. Joined before any save touches the queue."""
    with contextlib.suppress(Exception):  # a failure here shows again, and is handled, in the save
        from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.storage import WriteResult

        q = get_write_results_queue()
        q.put({0: [WriteResult(index=MetadataIndex("warmup"), size_in_bytes=0,
                               storage_data=_StorageInfo(relative_path="warmup", offset=0, length=0))]})
        q.get(timeout=60)


def _drain_write_results() -> None:
    """Drop results an aborted writer may have left in megatron's (process-wide) results queue,
    so that the next save cannot read them as its own."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    q = filesystem_async._results_queue
    if q is None:
        return
    with contextlib.suppress(Exception):
        while True:
            q.get_nowait()


# ------------------------------------------------------------------------------------------
# The mirror (background thread)
# ------------------------------------------------------------------------------------------


class _Mirror:
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
                except _ERRORS as e:  # noqa: BLE001 - a mirror failure alerts, never kills
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
        from data_pipeline.fs import get_fs

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


# ------------------------------------------------------------------------------------------
# The checkpointer
# ------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    step: int
    path: str
    trainer_state: dict


@dataclass
class _Save:
    """One save request, from save() to its commit (or failure)."""

    step: int
    attempt: int
    extra: Optional[dict]
    t_start: float  # perf_counter at save()
    blocking_s: float = 0.0  # time the training loop spent inside save/poll/wait for it


def _error_text(e: BaseException) -> str:
    """One line naming the root cause; torch DCP's CheckpointException carries per-rank failures."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in list(failures.items())[:3]:
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            while isinstance(inner, BaseException) and inner.__cause__ is not None:
                inner = inner.__cause__
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        text = "dist_checkpointing write failed: " + "; ".join(parts)
    elif isinstance(e, _WriteFailed):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:600] + "..."


class Checkpointer:
    """Saves and restores the model chunks, the optimizer and the named JSON-able components.

    Every public method is collective (call it on all ranks) except ``close``."""

    def __init__(self, root: str, layout: Layout, model: list, optimizer, components: dict[str, Stateful],
                 distributed_optimizer: bool = False, keep_last: int = 3, config: Any = None,
                 on_event: Optional[Callable[[dict], None]] = None) -> None:
        self.root = root
        self.layout = layout
        self.model = model
        self.optimizer = optimizer
        self.components = components
        self.distributed_optimizer = distributed_optimizer
        self.keep_last = config.keep_last if config is not None else keep_last
        self.keep_every = config.keep_every if config is not None else 0
        self.async_save = bool(config.async_save) if config is not None else False
        self.mirror_url = config.mirror if config is not None else None
        self.mirror_retries = config.mirror_retries if config is not None else 3
        self.on_event = on_event  # metrics sink (set on the logging rank)
        self.last_save_blocking_s = 0.0
        self.failures = 0  # saves that failed after their retry (checkpoint_failures)
        self.mirror_failures = 0
        self._pending: Optional[_Save] = None  # an async save written but not yet committed
        self._calls = None  # megatron AsyncCallsQueue, created on the first async save
        self._strategy = None  # one save strategy for the run
        self._deleting: list[threading.Thread] = []  # background deletions of pruned checkpoints
        self._verified: set[str] = set()
        self._mirror: Optional[_Mirror] = None
        self._last_size: Optional[int] = None
        # megatron's writers report through a spawn-context Manager queue whose start takes ~2 s
        # (filesystem_async.py:65); start it now, in the background, instead of in the first save.
        # Not a daemon: an exit while the Manager is half started would otherwise hang in
        # multiprocessing's atexit join of a Manager process nobody shuts down.
        self._warmup = threading.Thread(target=_results_queue_warmup, name="ckpt-warmup", daemon=False)
        self._warmup.start()

    @property
    def _rank0(self) -> bool:
        return self.layout.rank == 0

    # ---- collectives ----
    def _agree(self, error: Optional[str]) -> Optional[str]:
        """All ranks learn whether any failed: None everywhere, or the same text naming the
        failed ranks everywhere."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return error
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        by_text: dict[str, list[int]] = {}
        for r, e in enumerate(errors):
            if e is not None:
                by_text.setdefault(e, []).append(r)
        if len(by_text) == 1 and len(next(iter(by_text.values()))) == dist.get_world_size():
            return next(iter(by_text))  # the same (already agreed) failure everywhere
        parts = [f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs[:8]))}: {e}"
                 for e, rs in list(by_text.items())[:3]]
        return "; ".join(parts) + (f"; and {len(by_text) - 3} more" if len(by_text) > 3 else "")

    def _bcast(self, obj: Any) -> Any:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _event(self, record: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(record)
            except _ERRORS:  # noqa: BLE001 - metrics must not break checkpointing
                log.exception("could not record checkpoint event %s", record.get("event"))

    # ---- sharded state ----
    def _model_sharded(self) -> dict:
        from megatron.core.distributed import DistributedDataParallel

        def inner(m):
            return m.module if isinstance(m, DistributedDataParallel) else m

        if len(self.model) == 1:
            return {"model": inner(self.model[0]).sharded_state_dict()}
        return {f"model{i}": inner(m).sharded_state_dict() for i, m in enumerate(self.model)}

    def _sharded(self, is_loading: bool) -> dict:
        model_sd = self._model_sharded()
        kwargs = {}
        if self.distributed_optimizer:
            # fully_reshardable stores optimizer state in model space: loadable under any
            # TP/PP/DP layout (dp_reshardable only across DP).
            kwargs["metadata"] = {"distrib_optim_sharding_type": "fully_reshardable"}
        sd = dict(model_sd)
        sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, **kwargs)
        return sd

    # ---- save ----
    def _paths(self, step: int) -> tuple[str, str]:
        return (os.path.join(self.root, TMP_PREFIX + step_dir_name(step)),
                os.path.join(self.root, step_dir_name(step)))

    def save(self, step: int, extra: Optional[dict] = None) -> Optional[str]:
        """Save the current state as checkpoint ``step``. Returns its final path: committed (sync),
        or to be committed by poll()/wait() (async); None when the save failed (after its retry,
        with an ALERT). Never raises for an I/O or dist_checkpointing failure."""
        t0 = time.perf_counter()
        if self._pending is not None:  # one save in flight at a time (counted as the older one's)
            self._finalize(block=True, retry_step=None)
        save = _Save(step=step, attempt=1, extra=extra, t_start=time.perf_counter())
        ok = self._run_attempts(save)
        if ok and not self.async_save:
            self._committed(save)
        elif ok:
            save.blocking_s = time.perf_counter() - save.t_start
        self.last_save_blocking_s = time.perf_counter() - t0
        self._report_mirror()
        return self._paths(step)[1] if ok else None

    def _run_attempts(self, save: _Save) -> bool:
        """Try to save (async: to schedule) ``save``; on failure clean up, prune and retry once."""
        while True:
            error = self._attempt(save)
            if error is None:
                return True
            error = self._failed_attempt(save, error)
            if save.attempt >= 2:
                self._alert(save, error)
                return False
            save.attempt += 1

    def _attempt(self, save: _Save) -> Optional[str]:
        tmp, final = self._paths(save.step)
        # 1. rank 0: a fresh temporary directory (after a space check)
        error = None
        if self._rank0:
            try:
                self._prepare(tmp, save.step)
            except _ERRORS as e:  # noqa: BLE001
                error = _error_text(e)
        error = self._agree(error)
        if error:
            return error
        # 2. the small per-rank files, captured now (an async save commits later)
        try:
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            rng_path = os.path.join(tmp, "rng", f"rank_{self.layout.rank:05d}.pt")
            torch.save(rng_state(), rng_path)
            if self._rank0:
                state = {"step": save.step, "world_size": self.layout.world_size,
                         "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp},
                         "components": {name: c.state_dict() for name, c in self.components.items()},
                         **(save.extra or {})}
                _write_durable(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1).encode())
        except _ERRORS as e:  # noqa: BLE001
            error = _error_text(e)
        error = self._agree(error)
        if error:
            return error
        # 3. model and optimizer through dist_checkpointing (written by a forked process if async)
        try:
            self._warmup.join()
            # megatron's results queue is process-wide: a result that is not this save's would be
            # written into its .metadata (an unloadable checkpoint that verifies). Seen when a
            # killed writer's result was left behind (bench/ckpt_kill_trials.py).
            _drain_write_results()
            if self._strategy is None:
                self._strategy = _save_strategy()
            self._strategy.fault_context = {"step": save.step, "attempt": save.attempt}
            request = _save_request(self._sharded(is_loading=False), tmp, self._strategy)
            if self.async_save:
                self._async_queue().schedule_async_request(request)
            else:
                request.execute_sync()
        except _ERRORS as e:  # noqa: BLE001
            error = _error_text(e)
        error = self._agree(error)
        if error:
            self._abort_inflight()
            return error
        if self.async_save:
            self._pending = save
            return None
        # 4. commit (rank 0)
        return self._agree(self._commit(save) if self._rank0 else None)

    def _async_queue(self):
        if self._calls is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # Non-persistent: a forked writer per save. The persistent worker is spawned and
            # calls torch.cuda.set_device(rank % device_count()) (async_utils.py:565), which
            # divides by zero without CUDA.
            self._calls = AsyncCallsQueue(persistent=False)
        return self._calls

    def _abort_inflight(self) -> None:
        """Kill this rank's writer, if any (local: no collective), and drop its results."""
        if self._calls is None:
            return
        while self._calls.async_calls:
            call = self._calls.async_calls.popleft()
            proc = getattr(call.async_caller, "process", None)
            if proc is not None:  # megatron's close(abort=True) kills without waiting
                with contextlib.suppress(Exception):
                    proc.kill()
                    proc.join(timeout=60)
                call.async_caller.process = None
        # The results queue is process-wide: whatever the killed writer managed to report must
        # not be read by the next save as its own.
        _drain_write_results()

    def _prepare(self, tmp: str, step: int) -> None:
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):  # left by a crash: partial saves, a re-save's old copy
            path = os.path.join(self.root, name)
            if name.startswith(TMP_PREFIX) or (name.startswith(TRASH_PREFIX) and not self._deleting):
                shutil.rmtree(path, ignore_errors=True)
            elif name.endswith(REPLACED):
                original = path[:-len(REPLACED)]
                if os.path.exists(original):
                    _remove_checkpoint(path)
                else:
                    os.rename(path, original)
        need = int(self._expected_bytes() * SPACE_FACTOR)
        free = shutil.disk_usage(self.root).free
        if free < need and self._deleting:
            self._deletions_done()  # space still being freed
            free = shutil.disk_usage(self.root).free
        if free < need:
            log.warning("checkpoint step %d: %.1f MB free under %s, about %.1f MB wanted; pruning per the "
                        "retention policy first", step, free / 1e6, self.root, need / 1e6)
            self._prune(reserve=1)
            self._deletions_done()
            free = shutil.disk_usage(self.root).free
            if free < need:
                log.warning("checkpoint step %d: still only %.1f MB free (policy keep_last=%d keep_every=%d); "
                            "trying anyway", step, free / 1e6, self.keep_last, self.keep_every)
        os.makedirs(tmp)

    def _expected_bytes(self) -> int:
        if self._last_size is None:
            for info in reversed(list_checkpoints(self.root)):
                try:
                    with open(os.path.join(info.path, MANIFEST)) as f:
                        self._last_size = int(json.load(f)["total_bytes"])
                    break
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        if self._last_size is not None:
            return self._last_size
        # No checkpoint yet: fp32 weights + main copy + two Adam moments of every model-parallel shard.
        local = sum(p.numel() * 4 for m in self.model for p in m.parameters())
        return local * 4 * self.layout.tp * self.layout.pp

    def _commit(self, save: _Save) -> Optional[str]:
        """Rank 0: manifest, fsync, rename, COMMITTED, ledger. Returns an error text or None."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

        tmp, final = self._paths(save.step)
        replaced = final + REPLACED
        try:
            save_config(CheckpointingConfig("torch_dist", 1), tmp)
            known = {}
            hash_dir = os.path.join(tmp, HASH_DIR)
            if os.path.isdir(hash_dir):
                for name in os.listdir(hash_dir):
                    with contextlib.suppress(OSError, ValueError):
                        with open(os.path.join(hash_dir, name)) as f:
                            known.update({k: tuple(v) for k, v in json.load(f).items()})
                shutil.rmtree(hash_dir)
            problem = dcp_metadata_problem(tmp)
            if problem:
                raise RuntimeError(f"refusing to commit: {problem}")
            manifest = build_manifest(tmp, known)
            manifest_sha = write_manifest(tmp, manifest)
            _fsync_tree(tmp)
        except _ERRORS as e:  # noqa: BLE001
            return _error_text(e)
        # The commit point. A checkpoint of the same step already there (a re-save after a
        # rollback or a fallback) is moved aside, and put back if the commit fails.
        try:
            if os.path.exists(replaced):
                _remove_checkpoint(replaced)
            if os.path.exists(final):
                os.rename(final, replaced)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            write_committed(final, save.step, manifest_sha)
        except _ERRORS as e:  # noqa: BLE001
            with contextlib.suppress(OSError):
                if os.path.exists(replaced):
                    if os.path.exists(final):
                        _remove_checkpoint(final)
                    os.rename(replaced, final)
            return _error_text(e)
        # Committed. What follows is best effort: it must not turn a commit into a failure.
        with contextlib.suppress(OSError):
            if os.path.exists(replaced):
                _remove_checkpoint(replaced)
        self._last_size = manifest["total_bytes"]
        try:
            with open(os.path.join(self.root, LEDGER), "a") as f:
                f.write(json.dumps({"step": save.step, "path": step_dir_name(save.step),
                                    "manifest_sha256": manifest_sha, "bytes": manifest["total_bytes"],
                                    "time": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.warning("checkpoint step %d committed, but %s could not be appended: %s", save.step, LEDGER, e)
        return None

    def _committed(self, save: _Save) -> None:
        """After a commit every rank agreed on: retention, mirror, event."""
        t0 = time.perf_counter()
        final = self._paths(save.step)[1]
        self._verified.add(os.path.abspath(final))
        if self._rank0:
            try:
                self._prune()
            except _ERRORS as e:  # noqa: BLE001 - pruning is housekeeping
                log.warning("pruning %s failed: %s", self.root, _error_text(e))
        if self.mirror_url and self.layout.is_logging_rank:
            if self._mirror is None:
                self._mirror = _Mirror(self.mirror_url, self.mirror_retries)
            self._mirror.submit(save.step, final)
        if self.async_save:
            save.blocking_s += time.perf_counter() - t0
        else:  # a sync save blocks from its start until now
            save.blocking_s = time.perf_counter() - save.t_start
        total = time.perf_counter() - save.t_start
        if self._rank0:
            log.info("checkpoint step %d committed: %s (loop blocked %.3f s, %s save took %.3f s)", save.step, final,
                     save.blocking_s, "async" if self.async_save else "sync", total)
        self._event({"event": "checkpoint", "step": save.step, "path": final, "async": self.async_save,
                     "blocking_s": round(save.blocking_s, 4), "total_s": round(total, 4),
                     "attempts": save.attempt})

    def _failed_attempt(self, save: _Save, error: str) -> str:
        """Every rank, after an agreed failure: kill writers, delete the partial directory, prune.
        Returns the error text with the free space under the root appended."""
        self._abort_inflight()
        tmp, final = self._paths(save.step)
        with contextlib.suppress(OSError):
            error += f" [{shutil.disk_usage(self.root).free / 1e6:.1f} MB free under {self.root}]"
        if self._rank0:
            log.warning("checkpoint step %d: attempt %d failed: %s", save.step, save.attempt, error)
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.isdir(final) and read_commit(final)[1] is not None:
                _remove_checkpoint(final)  # renamed but never (fully) committed
            try:
                self._prune(reserve=1)
            except _ERRORS as e:  # noqa: BLE001
                log.warning("pruning %s failed: %s", self.root, _error_text(e))
        if dist.is_initialized():
            dist.barrier()
        return error

    def _alert(self, save: _Save, error: str) -> None:
        self.failures += 1
        if self._rank0:
            newest = committed_checkpoints(self.root)
            log.error("ALERT checkpoint save failed: step %d after %d attempt(s): %s; training continues; last "
                      "committed checkpoint: %s", save.step, save.attempt, error,
                      newest[-1][1] if newest else "none")
        self._event({"event": "checkpoint_failed", "step": save.step, "error": error, "attempts": save.attempt,
                     "checkpoint_failures": self.failures})

    def _prune(self, reserve: int = 0) -> None:
        """Rank 0: delete committed checkpoints the policy does not keep, and never-committed step
        directories older than the newest committed one."""
        infos = list_checkpoints(self.root)
        committed = [i.step for i in infos if i.committed]
        keep = retained_steps(committed, self.keep_last, self.keep_every, reserve)
        busy = self._mirror.busy() if self._mirror is not None else set()
        newest = max(committed) if committed else None
        for info in infos:
            if info.path in busy:
                continue
            if (info.committed and info.step not in keep) or \
                    (not info.committed and newest is not None and info.step < newest):
                log.info("pruning %s", info.path)
                _remove_checkpoint(info.path, self._deleting)
        self._deleting = [t for t in self._deleting if t.is_alive()]

    def _deletions_done(self) -> None:
        for t in self._deleting:
            t.join()
        self._deleting = []

    # ---- async completion ----
    def poll(self, step: Optional[int] = None) -> None:
        """Call every step on all ranks: commits an async save once every rank's writer is done
        (one small all-reduce while one is in flight; nothing otherwise). If it failed, retries
        once by saving the current state as ``step``."""
        if self._pending is not None:
            self._finalize(block=False, retry_step=step)
        self._report_mirror()

    def wait(self, step: Optional[int] = None, mirror_timeout_s: float = 300.0) -> None:
        """Block until the in-flight save is committed or has failed (retrying as ``step``), then
        until the mirror has copied what is committed (rank 0 / logging rank only)."""
        while self._pending is not None:
            self._finalize(block=True, retry_step=step)
        if self._mirror is not None and not self._mirror.drain(mirror_timeout_s):
            log.warning("checkpoint mirror still busy after %.0f s; leaving it", mirror_timeout_s)
        self._report_mirror()

    def _finalize(self, block: bool, retry_step: Optional[int]) -> None:
        save = self._pending
        t0 = time.perf_counter()
        error = None
        try:
            done = bool(self._calls.maybe_finalize_async_calls(blocking=block))  # collective
        except _ERRORS as e:  # noqa: BLE001 - raised on every rank by the finalize
            done, error = True, _error_text(e)
        if not done:
            save.blocking_s += time.perf_counter() - t0
            return
        self._pending = None
        error = self._agree(error)
        if error is None:
            error = self._agree(self._commit(save) if self._rank0 else None)
        save.blocking_s += time.perf_counter() - t0
        if error is None:
            self._committed(save)
            return
        error = self._failed_attempt(save, error)
        if save.attempt >= 2 or retry_step is None:
            self._alert(save, error)
            return
        # Retry once with the current state (the failed one's snapshot is gone).
        t1 = time.perf_counter()
        retry = _Save(step=retry_step, attempt=2, extra=save.extra, t_start=t1)
        err = self._attempt(retry)
        retry.blocking_s += time.perf_counter() - t1
        if err is not None:
            self._alert(retry, self._failed_attempt(retry, err))

    def _report_mirror(self) -> None:
        if self._mirror is None:
            return
        while True:
            try:
                record = self._mirror.results.get_nowait()
            except queue.Empty:
                return
            if record["event"] == "checkpoint_mirror_failed":
                self.mirror_failures += 1  # apart from save failures: the local checkpoint is intact
                record["checkpoint_mirror_failures"] = self.mirror_failures
            self._event(record)

    def close(self) -> None:
        """Local, on any exit path: kill an uncommitted writer (nothing is committed) and stop the
        mirror thread (a copy in progress is abandoned; its remote COMMITTED is never written)."""
        if self._pending is not None:
            self._abort_inflight()
            self._pending = None
        if self._mirror is not None:
            self._mirror.close()

    # ---- load ----
    def latest(self, root: Optional[str] = None, quarantine: bool = True) -> Optional[tuple[int, str]]:
        """(step, path) of the newest checkpoint that verifies, falling back to older ones with a
        warning (failed ones are renamed ``*.corrupt`` when ``quarantine``); None when nothing
        was ever committed under root. Raises CheckpointError when checkpoints were committed
        but none verifies."""
        if self._pending is not None:
            self._finalize(block=True, retry_step=None)
        root = root or self.root
        listing = (list_checkpoints(root), ever_committed(root), ledger_steps(root)) if self._rank0 else None
        infos, ever, ledger = self._bcast(listing)
        failed: list[tuple[str, str]] = []
        for info in reversed(infos):
            if not info.committed:
                if self._rank0:
                    log.warning("skipping %s: no %s marker (the save never finished); it is never loaded",
                                info.path, COMMITTED)
                continue
            reason = self._verify_collective(info.path)
            if reason is None:
                if self._rank0 and ledger and max(ledger) > info.step and not failed and not any(
                        n.startswith(step_dir_name(max(ledger))) for n in os.listdir(root)):
                    log.warning("%s lists step %d as committed but its checkpoint is gone; using step %d",
                                LEDGER, max(ledger), info.step)
                self._verified.add(os.path.abspath(info.path))
                return info.step, info.path
            failed.append((info.path, reason))
            if self._rank0:
                log.warning("checkpoint %s failed verification: %s; falling back to an older one", info.path, reason)
                if quarantine:
                    self._quarantine(info.path)
        if failed or ever:
            what = "; ".join(f"{p}: {r}" for p, r in failed) or (
                f"COMMITS.jsonl records committed steps up to {max(ledger)} but no checkpoint is left"
                if ledger else "committed markers exist but no step directory")
            raise CheckpointError(f"no checkpoint under {root} verifies ({what}). Refusing to start from scratch "
                                  "silently: restore a checkpoint, or set train.resume=never to start over")
        return None

    def _quarantine(self, path: str) -> None:
        target = path + QUARANTINE
        n = 1
        while os.path.exists(target):
            target = f"{path}{QUARANTINE}.{n}"
            n += 1
        try:
            os.rename(path, target)
            log.warning("moved %s to %s (kept for inspection; never loaded)", path, target)
        except OSError as e:
            log.warning("could not move %s aside: %s", path, e)

    def _verify_collective(self, path: str) -> Optional[str]:
        """Verify one checkpoint on all ranks: rank 0 checks the marker and file list, each rank
        hashes its share of the files; every rank gets the same answer. A checkpoint this process
        committed or verified already gets the marker, file list and sizes checked, not hashed
        again (a rollback or a stop signal must not re-read the whole checkpoint)."""
        entries, reason = None, None
        known = os.path.abspath(path) in self._verified
        if self._rank0:
            manifest, reason = read_commit(path)
            entries = manifest["files"] if manifest else None
            if known and reason is None:
                for e in entries:
                    p = os.path.join(path, e["path"])
                    if not os.path.isfile(p) or os.path.getsize(p) != e["size"]:
                        reason = f"{e['path']}: size changed since it was committed"
                        break
        entries, reason = self._bcast((entries, reason))
        if reason or known:
            if reason:
                self._verified.discard(os.path.abspath(path))
            return reason
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        by_size = sorted(entries, key=lambda e: -e["size"])
        return self._agree(verify_files(path, by_size[rank::world]))

    def _resolve(self, path: str) -> str:
        """A checkpoint root given as train.resume: its newest verified checkpoint."""
        looks_like_root = (not os.path.exists(os.path.join(path, COMMITTED)) and
                           not os.path.exists(os.path.join(path, MANIFEST)) and
                           (bool(list_checkpoints(path)) or os.path.exists(os.path.join(path, LEDGER))))
        if not self._bcast(looks_like_root if self._rank0 else None):
            return path
        latest = self.latest(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint under {path}")
        return latest[1]

    def load(self, path: str) -> LoadedCheckpoint:
        from megatron.core import dist_checkpointing

        if self._pending is not None:
            self._finalize(block=True, retry_step=None)
        path = self._resolve(path)
        if os.path.abspath(path) not in self._verified:
            reason = self._verify_collective(path)
            if reason:
                raise CheckpointError(f"checkpoint {path} does not verify: {reason}; it is not loaded. Use "
                                      "train.resume=auto to take the newest one that verifies")
            self._verified.add(os.path.abspath(path))
        error, unsafe = None, False
        trainer_state: dict = {}
        try:
            with open(os.path.join(path, STATE_FILE)) as f:
                trainer_state = json.load(f)
            if self.distributed_optimizer:
                _init_optimizer_states(self.optimizer)
            sharded = self._sharded(is_loading=True)
            with safe_unpickling() as refusals:
                try:
                    loaded = dist_checkpointing.load(sharded, path)
                except _ERRORS as e:  # noqa: BLE001 - DCP wraps our refusal; report it plainly
                    if refusals:
                        unsafe = True
                        raise UnsafeCheckpointError(refusals[0]) from e
                    raise
        except _ERRORS as e:  # noqa: BLE001
            error = _error_text(e)
        unsafe_any = self._agree("unsafe" if unsafe else None)
        error = self._agree(error)
        if error:
            if unsafe_any:
                raise UnsafeCheckpointError(f"refusing to load {path}: {error}")
            raise CheckpointError(f"loading {path} failed: {error}")
        from megatron.core.distributed import DistributedDataParallel

        for i, m in enumerate(self.model):
            inner = m.module if isinstance(m, DistributedDataParallel) else m
            inner.load_state_dict(loaded["model"] if len(self.model) == 1 else loaded[f"model{i}"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        if self.distributed_optimizer:
            from megatron_tts.mcore_fixes import unshare_adam_steps

            unshare_adam_steps(self.optimizer)
        for name, comp in self.components.items():
            if name in trainer_state["components"]:
                comp.load_state_dict(trainer_state["components"][name])
        self._load_rng(path, trainer_state)
        return LoadedCheckpoint(step=trainer_state["step"], path=path, trainer_state=trainer_state)

    def _load_rng(self, path: str, trainer_state: dict) -> None:
        rng_path = os.path.join(path, "rng", f"rank_{self.layout.rank:05d}.pt")
        if trainer_state.get("world_size") == self.layout.world_size and os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
        else:
            # Another layout: per-rank RNG streams do not map onto new ranks; reseed
            # deterministically from (seed, step) instead. No dropout in our recipes, so the
            # loss curve does not depend on it.
            log.warning("checkpoint %s was written by %s ranks; reseeding RNG for %s ranks",
                        path, trainer_state.get("world_size"), self.layout.world_size)


def _init_optimizer_states(optimizer) -> None:
    """A fresh distributed optimizer has no Adam states until its first step; loading needs them
    (megatron-core 0.19.2 distrib_optimizer.py:839 asserts, :1223 KeyError 'step')."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(o, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()


# ------------------------------------------------------------------------------------------
# python -m megatron_tts.checkpoint verify PATH
# ------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_tts.checkpoint",
                                     description="Verify checkpoints without loading them.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check a checkpoint directory, or every checkpoint under a root")
    v.add_argument("path")
    args = parser.parse_args(argv)
    path = args.path
    targets = [path] if os.path.exists(os.path.join(path, COMMITTED)) or os.path.exists(
        os.path.join(path, MANIFEST)) else [i.path for i in list_checkpoints(path)]
    if not targets:
        print(f"{path}: no checkpoints", file=sys.stderr)
        return 1
    bad = 0
    for t in targets:
        reason = verify(t)
        print(f"{t}: {'OK' if reason is None else 'FAILED: ' + reason}")
        bad += reason is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
