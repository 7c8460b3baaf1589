"""Every hook into megatron-core dist_checkpointing and torch DCP internals that checkpoints need
(rows of megatron_tts.compat.WORKAROUNDS):

- ``safe_unpickling()``: loads never execute pickled code (upstream unpickles ``.metadata`` and
  shard objects unrestricted); ``dcp_metadata_problem()`` checks ``.metadata`` against the shards
  before a commit;
- ``save_strategy()`` / ``save_request()``: megatron's torch_dist save whose finalize reaches
  every rank on failure (upstream: rank 0 raises while the others wait forever), whose writer
  hashes what it wrote, and without the metadata.json finalize barrier;
- the async results queue: warmed up in the background, drained of an aborted writer's results;
  ``async_calls_queue()``: the non-persistent writer (the persistent one needs CUDA).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_tts.checkpoint.errors import SAVE_ERRORS, UnsafeCheckpointError, WriteFailed, error_text
from megatron_tts.checkpoint.format import HASH_DIR
from megatron_tts.compat.mcore import ShardedObject
from storage.durable import sha256_file, write_durable

def metadata_allowed() -> dict[tuple[str, str], Any]:
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


class AllowListUnpickler(pickle.Unpickler):
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

    allowed = metadata_allowed()
    refusals: list[str] = []
    saved = (dcp_fs.FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes, mser.load_common)

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = AllowListUnpickler(f, allowed, str(path)).load()
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



def dcp_metadata_problem(ckpt_dir: str) -> Optional[str]:
    """A structural check of torch DCP's ``.metadata`` against the shard files: every tensor
    chunk and object it declares has a storage entry, and every entry lies inside its file.
    Catches an unloadable checkpoint before it is committed (its manifest would verify)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    try:
        with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
            md = AllowListUnpickler(f, metadata_allowed(), ".metadata").load()
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



def write_and_hash(write_fn: Callable, ckpt_dir: str, fail: Optional[Callable[[int], bool]], rank: int,
                   write_buckets: list, results_queue: Any) -> None:
    """The writer (in the forked process, or inline for a sync save): megatron's write, then the
    sha256 of the files this rank wrote, into HASH_DIR/rank_XXXXX.json. Hashing here keeps it out
    of the training loop and spreads it over all ranks. Failures go to results_queue, where
    megatron's finalize reports them on every rank (it must not raise here: a sync save's other
    ranks would wait in a barrier); a missing hash file means rank 0 hashes those files itself."""
    try:
        if fail is not None and fail(rank):  # fault injection (megatron_tts.faults), off by default
            raise OSError(5, f"injected checkpoint write error on rank {rank} (MEGATRON_TTS_FAULT)")
        write_fn(rank, write_buckets, results_queue)
    except SAVE_ERRORS as e:
        with contextlib.suppress(SAVE_ERRORS):  # a dead results queue shows in the finalize instead
            results_queue.put(e)
        return
    try:
        hashes = {}
        for bucket in write_buckets:
            path = bucket[0]
            hashes[os.path.relpath(path, ckpt_dir)] = [os.path.getsize(path), sha256_file(path)]
        out = os.path.join(ckpt_dir, HASH_DIR)
        os.makedirs(out, exist_ok=True)
        write_durable(os.path.join(out, f"rank_{rank:05d}.json"), json.dumps(hashes).encode())
    except OSError:
        pass


def finalize_on_all_ranks(storage_writer, global_metadata, dist_wrapper) -> None:
    """megatron-core's save_state_dict_async_finalize (state_dict_saver.py), except that an
    exception while rank 0 writes ``.metadata`` (ENOSPC, EIO) is broadcast like a write failure
    instead of raising on rank 0 alone while the others wait in the broadcast forever."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.utils import _get_failure_dict

    from torch.distributed.checkpoint.utils import _wrap_exception

    try:  # e.g. the results queue's Manager process died: still take part in the gather below
        write_results = storage_writer.retrieve_write_results()
    except SAVE_ERRORS as e:
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
            except SAVE_ERRORS as e:  # noqa: BLE001 - any failure here must reach every rank
                error = e
    box = [None if error is None else error_text(error)]
    torch.distributed.broadcast_object_list(box, src=dist_wrapper.coordinator_rank, group=dist_wrapper.group)
    if box[0] is not None:
        raise WriteFailed(box[0])


def save_strategy():
    """megatron's torch_dist save strategy with our finalize and writer, and cached save plans
    (the state's structure is the same at every save: from the third save on, planning skips
    gathering every rank's plan once megatron has validated the cache)."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class AgreeingSaveStrategy(TorchDistSaveShardedStrategy):
        fail: Optional[Callable[[int], bool]] = None  # rank -> inject a write error (tests, drills)

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret, async_strategy):
            req = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret, async_strategy)
            finalize = partial(finalize_on_all_ranks, *save_state_dict_ret)
            if req.async_fn is not None:
                req = req._replace(async_fn=partial(write_and_hash, req.async_fn, str(writer.checkpoint_dir),
                                                    self.fail))
            return req._replace(finalize_fns=[finalize])

    return AgreeingSaveStrategy(backend="torch_dist", cached_metadata=True)


def save_request(sharded_state_dict: dict, ckpt_dir: str, strategy):
    """megatron-core's dist_checkpointing.save up to the AsyncRequest (serialization.py), minus
    its metadata.json finalize (rank 0 writes it in our commit, so a failure there cannot leave
    the other ranks in a barrier)."""
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    sharded, common = save_preprocess(sharded_state_dict, True, None)
    sharded["common_state"] = ShardedObject(key="common_state", data=common, global_shape=(1,),
                                            global_offset=(0,), replica_id=dist.get_rank())
    return strategy.async_save(sharded, ckpt_dir, async_strategy="mcore")


def results_queue_warmup() -> None:
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


def drain_write_results() -> None:
    """Drop results an aborted writer may have left in megatron's (process-wide) results queue,
    so that the next save cannot read them as its own."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    q = filesystem_async._results_queue
    if q is None:
        return
    with contextlib.suppress(Exception):
        while True:
            q.get_nowait()


def async_calls_queue():
    """megatron's AsyncCallsQueue, non-persistent: a forked writer per save. The persistent worker
    is spawned and calls torch.cuda.set_device(rank % device_count()) (async_utils.py:565),
    which divides by zero without CUDA."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=False)


def kill_async_writers(calls) -> None:
    """Kill this rank's forked writers, if any (local: no collective), and drop their results."""
    if calls is not None:
        while calls.async_calls:
            call = calls.async_calls.popleft()
            proc = getattr(call.async_caller, "process", None)
            if proc is not None:  # megatron's close(abort=True) kills without waiting
                with contextlib.suppress(Exception):
                    proc.kill()
                    proc.join(timeout=60)
                call.async_caller.process = None
    # The results queue is process-wide: whatever a killed writer managed to report must not be
    # read by the next save as its own.
    drain_write_results()


def write_format_marker(ckpt_dir: str) -> None:
    """megatron's metadata.json (the format marker its loader checks)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    save_config(CheckpointingConfig("torch_dist", 1), ckpt_dir)
