"""PackedLoader over S3 (moto server on 127.0.0.1 via s3fs): the same packs as from local disk."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.layouts import VocabLayout, build_layout
from data_pipeline.loader import Batch, DataConfigError, PackedLoader
from data_pipeline.shards import Sample, write_dataset
from data_pipeline.tokenizer import ByteTokenizer

CODEC = {"name": "synth", "version": "1", "sample_rate": 16000, "frame_rate": 50, "n_q": 1, "codebook_size": 1024}
TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "segment", "attention_mask")
LAYOUT = build_layout("llasa", VocabLayout(text_vocab_size=256, codebook_size=1024))
N_SAMPLES = 120


def synth_samples(n: int, seed: int) -> list[Sample]:
    """~85-285 tokens per utterance (20-60 byte transcripts, 60-220 frames)."""
    rng = np.random.default_rng(seed)
    return [
        Sample(key=f"spk{i % 3}/utt{i:04d}", codes=rng.integers(0, CODEC["codebook_size"], (1, int(rng.integers(60, 220)))),
               text=("remote utterance %d " % i * 4)[: int(rng.integers(20, 61))],
               meta={"speaker": f"spk{i % 3}", "language": "en", "dataset": "s3loader"})
        for i in range(n)
    ]


def make_loader(path: str, **kw) -> PackedLoader:
    args = dict(layout=LAYOUT, tokenizer=ByteTokenizer(), seq_len=512, micro_batch_size=2, global_batch_size=4,
                pack_window=64, num_workers=3, prefetch=2, seed=77)
    args.update(kw)
    return PackedLoader(path, **args)


def assert_same_steps(a: list[list[Batch]], b: list[list[Batch]]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        for x, y in zip(sa, sb, strict=True):
            for name in TENSORS:
                assert torch.equal(getattr(x, name), getattr(y, name)), name
            assert (x.sample_keys, x.pack_ids, x.epochs) == (y.sample_keys, y.pack_ids, y.epochs)


@pytest.fixture
def s3fs_client(s3_server):  # noqa: ANN001, ANN201 - fixture types live in conftest / s3fs
    s3fs = pytest.importorskip("s3fs")
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url}, skip_instance_cache=True)


@pytest.fixture
def datasets(tmp_path: Path, s3fs_client) -> tuple[str, str]:  # noqa: ANN001
    """(local dataset dir, s3:// URL of a byte-identical upload)."""
    local = tmp_path / "ds"
    write_dataset(str(local), synth_samples(N_SAMPLES, seed=4), CODEC, samples_per_shard=20, name="s3loader")
    bucket = f"loader-{uuid.uuid4().hex[:12]}"
    s3fs_client.mkdir(bucket)
    for f in sorted(local.iterdir()):
        s3fs_client.put_file(str(f), f"{bucket}/ds/{f.name}")
    return str(local), f"s3://{bucket}/ds"


def test_s3_dataset_yields_the_same_batches_as_local(datasets: tuple[str, str]) -> None:
    local, remote = datasets
    steps = 16  # an epoch is ~11 steps of 4 packs: crosses the epoch boundary
    with make_loader(local) as a, make_loader(remote) as b, make_loader(remote + "/index.json", num_workers=1) as c:
        got_a = [a.next_step() for _ in range(steps)]
        got_b = [b.next_step() for _ in range(steps)]
        got_c = [c.next_step() for _ in range(steps)]
        assert b.stats["epoch"] >= 1
        assert b.stats["skipped_bad_sample"] == b.stats["skipped_bad_shard"] == 0
    assert_same_steps(got_a, got_b)
    assert_same_steps(got_a, got_c)


def test_state_saved_on_local_resumes_exactly_on_s3(datasets: tuple[str, str]) -> None:
    local, remote = datasets
    with make_loader(local) as ref:
        expected = [ref.next_step() for _ in range(10)]
    with make_loader(local, dp_size=2, dp_rank=0) as first:
        for _ in range(4):
            first.next_step()
        state = json.loads(json.dumps(first.state_dict()))
    with make_loader(remote) as second:
        second.load_state_dict(state)
        got = [second.next_step() for _ in range(6)]
    assert_same_steps(expected[4:], got)


def test_missing_remote_dataset_names_the_url(s3fs_client, datasets: tuple[str, str]) -> None:  # noqa: ANN001
    _, remote = datasets
    missing = remote.replace("/ds", "/nope")
    with pytest.raises(DataConfigError, match=missing):
        make_loader(missing)
    s3fs_client.rm_file(remote[len("s3://"):] + "/shard-000002.idx.json")
    with make_loader(remote) as ld:  # with index.cidx, start-up reads no sidecar
        ld.next_step()
    s3fs_client.rm_file(remote[len("s3://"):] + "/index.cidx")
    with pytest.raises(DataConfigError, match="shard-000002"):
        make_loader(remote)


def test_shard_deleted_or_truncated_in_the_bucket_is_skipped(s3fs_client, datasets: tuple[str, str]) -> None:  # noqa: ANN001
    local, remote = datasets
    bucket_dir = remote[len("s3://"):]
    with make_loader(remote, prefetch=0) as ld:
        s3fs_client.rm_file(f"{bucket_dir}/shard-000001.tar")
        tar = (Path(local) / "shard-000003.tar").read_bytes()
        s3fs_client.pipe_file(f"{bucket_dir}/shard-000003.tar", tar[: len(tar) // 2])
        keys = []
        while ld.stats["epoch"] == 0:
            keys += [k for b in ld.next_step() for row, ep in zip(b.sample_keys, b.epochs) if ep == 0 for k in row]
        stats = ld.stats
    assert stats["bad_shards"] == ["shard-000001.tar"]
    assert stats["skipped_bad_shard"] >= 20 and stats["skipped_bad_sample"] >= 5
    assert len(keys) == len(set(keys))
    assert not any(k.startswith("shard-000001.tar:") for k in keys)
    truncated_kept = sum(k.startswith("shard-000003.tar:") for k in keys)
    assert 5 <= truncated_kept < 20 and len(keys) == N_SAMPLES - 20 - (20 - truncated_kept)
