"""The checkpoint writer's file-level pieces, without processes: manifests and their verification,
the retention policy, the commit ledger and the allow-list unpickler for DCP metadata."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest

from megatron_tts.checkpoint.errors import UnsafeCheckpointError
from megatron_tts.checkpoint.format import (COMMITTED, LEDGER, MANIFEST, QUARANTINE, build_manifest, ever_committed,
                                            list_checkpoints, read_commit, retained_steps, seal, verify)
from megatron_tts.compat.dist_ckpt import AllowListUnpickler as _AllowListUnpickler
from megatron_tts.compat.dist_ckpt import metadata_allowed as _metadata_allowed


def make_ckpt(root, step: int, files: dict[str, bytes], commit: bool = True) -> str:
    d = os.path.join(root, f"step_{step:08d}")
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
        with open(os.path.join(d, rel), "wb") as f:
            f.write(data)
    if commit:
        seal(d, step)
    return d


FILES = {"__0_0.distcp": os.urandom(5000), ".metadata": b"meta", "rng/rank_00000.pt": b"rng",
         "trainer_state.json": b"{}"}


def test_manifest_lists_every_file_with_size_and_sha(tmp_path):
    d = make_ckpt(tmp_path, 1, FILES)
    manifest, reason = read_commit(d)
    assert reason is None
    assert sorted(e["path"] for e in manifest["files"]) == sorted(FILES)
    assert manifest["total_bytes"] == sum(len(v) for v in FILES.values())
    assert verify(d) is None
    assert build_manifest(d) == manifest  # hashing again gives the same


@pytest.mark.parametrize("damage,expect", [
    ("flip", "sha256 mismatch"),
    ("truncate", "size 2500 != 5000"),
    ("delete_file", "missing"),
    ("extra_file", "not in the manifest"),
    ("delete_marker", f"no {COMMITTED} marker"),
    ("torn_marker", "marker unreadable"),
    ("edit_manifest", "does not match the sha256"),
])
def test_verification_names_what_is_wrong(tmp_path, damage, expect):
    d = make_ckpt(tmp_path, 1, FILES)
    shard = os.path.join(d, "__0_0.distcp")
    if damage == "flip":
        data = bytearray(open(shard, "rb").read())
        data[100] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    elif damage == "truncate":
        os.truncate(shard, 2500)
    elif damage == "delete_file":
        os.unlink(os.path.join(d, "rng", "rank_00000.pt"))
    elif damage == "extra_file":
        open(os.path.join(d, "common.pt"), "wb").write(b"x")
    elif damage == "delete_marker":
        os.unlink(os.path.join(d, COMMITTED))
    elif damage == "torn_marker":
        open(os.path.join(d, COMMITTED), "wb").write(b'{"step": 1, "manif')
    elif damage == "edit_manifest":
        m = json.load(open(os.path.join(d, MANIFEST)))
        m["files"][0]["size"] += 1
        open(os.path.join(d, MANIFEST), "w").write(json.dumps(m))
    reason = verify(d)
    assert reason is not None and expect in reason, reason


def test_retention_keeps_the_last_n_and_every_kth():
    steps = list(range(100, 1100, 100))
    assert retained_steps(steps, keep_last=3, keep_every=0) == {800, 900, 1000}
    assert retained_steps(steps, keep_last=2, keep_every=500) == {500, 900, 1000}
    # making room for a save: one slot fewer, but never below the newest one
    assert retained_steps(steps, keep_last=3, keep_every=0, reserve=1) == {900, 1000}
    assert retained_steps(steps, keep_last=1, keep_every=0, reserve=1) == {1000}
    assert retained_steps([], keep_last=3, keep_every=10) == set()


def test_ever_committed_survives_damage_and_deletion(tmp_path):
    root = str(tmp_path)
    assert not ever_committed(root)
    make_ckpt(root, 1, FILES, commit=False)
    assert not ever_committed(root)  # renamed but never committed
    d = make_ckpt(root, 2, FILES)
    assert ever_committed(root)
    os.rename(d, d + QUARANTINE)
    assert ever_committed(root) and [i.step for i in list_checkpoints(root)] == [1]
    open(os.path.join(root, LEDGER), "w").write(json.dumps({"step": 2}) + "\n")
    os.rename(d + QUARANTINE, str(tmp_path / "elsewhere"))
    assert ever_committed(root)  # the ledger remembers


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_metadata_unpickler_allows_dcp_metadata_and_refuses_code():
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    md = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        properties=TensorProperties(dtype=torch.float32), size=torch.Size([2, 3]),
        chunks=[ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3]))])},
        storage_data={MetadataIndex("w", (0, 0)): _StorageInfo(relative_path="__0_0.distcp", offset=0, length=24)})
    allowed = _metadata_allowed()
    back = _AllowListUnpickler(io.BytesIO(pickle.dumps(md)), allowed, ".metadata").load()
    assert back.state_dict_metadata["w"].size == torch.Size([2, 3])
    for evil in (_Payload(), {"x": [1, _Payload()]}, eval):
        with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
            _AllowListUnpickler(io.BytesIO(pickle.dumps(evil)), allowed, ".metadata").load()


def test_a_failed_load_is_not_called_a_write_failure():
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_tts.checkpoint.errors import error_text

    inner = FileNotFoundError(2, "No such file", "__0_0.distcp")
    assert error_text(CheckpointException("read", {0: inner})).startswith("dist_checkpointing read failed: rank 0:")
    assert error_text(CheckpointException("write", {1: inner})).startswith("dist_checkpointing write failed")
