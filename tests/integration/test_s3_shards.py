"""Shards on S3 (moto server on 127.0.0.1): the same bytes and samples as on local disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from storage import fs
from data_pipeline.shards import (
    DatasetIndex,
    Sample,
    ShardError,
    build_shard_index,
    load_shard_index,
    parse_sample,
    read_sample,
    read_shard,
    write_dataset,
)

REPO = Path(__file__).resolve().parents[2]
CODEC = {"name": "testcodec", "version": "1", "sample_rate": 16000, "frame_rate": 50, "n_q": 2, "codebook_size": 1024}


def make_samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(7)
    return [
        Sample(
            key=f"spk{i % 2}/utt{i:03d}",
            codes=rng.integers(0, CODEC["codebook_size"], size=(CODEC["n_q"], int(rng.integers(4, 90)))),
            text=f"s3 sentence {i}",
            meta={"speaker": f"spk{i % 2}", "language": "en", "dataset": "s3test"},
        )
        for i in range(n)
    ]


def assert_same(a: Sample, b: Sample) -> None:
    assert (a.key, a.text, a.meta) == (b.key, b.text, b.meta)
    assert a.codes.dtype == b.codes.dtype
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.fixture
def bucket(s3_server) -> str:  # noqa: ANN001 - fixture type lives in conftest
    s3fs = pytest.importorskip("s3fs")
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url}, skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture
def local_and_s3(tmp_path: Path, s3_server, bucket: str) -> tuple[DatasetIndex, str, str]:  # noqa: ANN001
    import s3fs

    local = tmp_path / "ds"
    ds = write_dataset(str(local), make_samples(9), CODEC, samples_per_shard=4, name="s3ds")
    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url}, skip_instance_cache=True)
    for p in sorted(local.iterdir()):
        s3.put_file(str(p), f"{bucket}/ds/{p.name}")
    return ds, str(local), f"s3://{bucket}/ds"


def test_dataset_on_s3_equals_local(local_and_s3: tuple[DatasetIndex, str, str]) -> None:
    ds, local, remote = local_and_s3
    for url in (remote, remote + "/", remote + "/index.json"):
        remote_ds = DatasetIndex.load(url)
        assert remote_ds == ds
        assert remote_ds.shard_urls() == [f"{remote}/{s.path}" for s in ds.shards]
    remote_ds = DatasetIndex.load(remote)
    for local_url, s3_url in zip(ds.shard_urls(local), remote_ds.shard_urls()):
        assert fs.exists(s3_url) and fs.size(s3_url) == fs.size(local_url)
        assert fs.sha256(s3_url) == fs.sha256(local_url)

        local_samples = list(read_shard(local_url))
        s3_samples = list(read_shard(s3_url))
        assert len(s3_samples) == len(local_samples) > 0
        for a, b in zip(s3_samples, local_samples):
            assert_same(a, b)

        idx = load_shard_index(s3_url)
        assert idx == load_shard_index(local_url)
        assert build_shard_index(s3_url) == idx
        for entry, seq in zip(idx.samples, local_samples):
            data = fs.read_range(s3_url, entry.offset, entry.offset + entry.length)
            assert data == fs.read_range(local_url, entry.offset, entry.offset + entry.length)
            assert_same(parse_sample(data, entry, s3_url), seq)
            assert_same(read_sample(s3_url, entry), seq)


def test_write_dataset_directly_to_s3(tmp_path: Path, bucket: str) -> None:
    samples = make_samples(5)
    local = write_dataset(str(tmp_path / "ds"), samples, CODEC, 2, "direct")
    remote = write_dataset(f"s3://{bucket}/direct", samples, CODEC, 2, "direct")
    assert remote == local
    loaded = DatasetIndex.load(f"s3://{bucket}/direct")
    assert loaded == local
    got = [s for url in loaded.shard_urls() for s in read_shard(url)]
    for a, b in zip(got, (s for url in local.shard_urls(str(tmp_path / "ds")) for s in read_shard(url))):
        assert_same(a, b)


def test_s3_missing_objects(bucket: str) -> None:
    url = f"s3://{bucket}/nope/shard-000000.tar"
    with pytest.raises(ShardError, match=f"{url}: missing file"):
        list(read_shard(url))
    with pytest.raises(ShardError, match="missing shard index"):
        load_shard_index(url)
    with pytest.raises(ShardError, match=f"s3://{bucket}/nope/index.json: missing dataset index"):
        DatasetIndex.load(f"s3://{bucket}/nope")
    assert not fs.exists(url)


def run_cli_many(*calls: Sequence[str], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data_pipeline", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=full_env,
        )
        for args in calls
    ]
    out = []
    for args, p in zip(calls, procs):
        stdout, stderr = p.communicate(timeout=60)
        out.append(subprocess.CompletedProcess(list(args), p.returncode, stdout, stderr))
    return out


def test_inspect_cli_on_s3(local_and_s3: tuple[DatasetIndex, str, str], s3_server) -> None:  # noqa: ANN001
    ds, _, remote = local_and_s3
    shard_url = f"{remote}/{ds.shards[0].path}"
    r_shard, r_ds, r_missing = run_cli_many(
        ("inspect", shard_url),
        ("inspect", f"{remote}/index.json", "--verify", "--json"),
        ("inspect", f"{remote}/missing.tar"),
        env=s3_server.env,
    )
    assert r_shard.returncode == 0, r_shard.stderr
    assert f"path:       {shard_url}" in r_shard.stdout
    assert "ok (matches sidecar)" in r_shard.stdout
    assert f"samples:    {ds.shards[0].n_samples}" in r_shard.stdout

    assert r_ds.returncode == 0, r_ds.stderr
    rep = json.loads(r_ds.stdout)
    assert rep["totals"]["n_samples"] == ds.n_samples and rep["totals"]["n_frames"] == ds.n_frames
    assert [v["status"] for v in rep["verify"]] == ["ok"] * len(ds.shards)

    assert r_missing.returncode == 2
    assert "Traceback" not in r_missing.stderr
    assert r_missing.stderr.strip() == f"error: {remote}/missing.tar: missing file (no such file)"
