"""Token shards: round trip, indexed reads, determinism, failure modes, interop, CLI."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from storage import fs
from data_pipeline.shards import (
    DatasetIndex,
    Sample,
    SampleError,
    ShardError,
    ShardIndex,
    ShardWriter,
    build_shard_index,
    index_path_for,
    load_shard_index,
    parse_sample,
    read_sample,
    read_shard,
    write_dataset,
)

REPO = Path(__file__).resolve().parents[2]


def make_codec(codebook_size: int = 1024, n_q: int = 2) -> dict:
    return {
        "name": "testcodec",
        "version": "1",
        "sample_rate": 16000,
        "frame_rate": 50,
        "n_q": n_q,
        "codebook_size": codebook_size,
    }


def make_samples(codec: dict, n: int, seed: int = 0, prefix: str = "utt") -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(3, 120))
        codes = rng.integers(0, codec["codebook_size"], size=(codec["n_q"], t), dtype=np.int64)
        codes[0, 0] = codec["codebook_size"] - 1  # exercise the top of the range
        meta = {
            "codec": codec,
            "duration_s": t / codec["frame_rate"],
            "n_frames": t,
            "speaker": f"spk{i % 3}",
            "language": "en" if i % 4 else "de",
            "dataset": "unit",
            "extra_field": [i, "x"],
        }
        out.append(Sample(key=f"{prefix}{i:04d}", codes=codes, text=f"sentence {i} — ünïcode", meta=meta))
    return out


def assert_same_sample(a: Sample, b: Sample) -> None:
    assert a.key == b.key
    assert a.text == b.text
    assert a.meta == b.meta
    assert a.codes.shape == b.codes.shape
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.fixture
def codec() -> dict:
    return make_codec()


@pytest.fixture
def shard(tmp_path: Path, codec: dict) -> tuple[str, ShardIndex, list[Sample]]:
    samples = make_samples(codec, 6)
    url = str(tmp_path / "s" / "shard-000000.tar")
    with ShardWriter(url, codec) as w:
        for s in samples:
            w.write(s)
    return url, w.close(), samples


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(("codebook_size", "dtype"), [(1024, np.uint16), (65536, np.uint16), (100_000, np.int32)])
def test_round_trip_dtype(tmp_path: Path, codebook_size: int, dtype: type) -> None:
    codec = make_codec(codebook_size, n_q=3)
    samples = make_samples(codec, 5)
    ds = write_dataset(str(tmp_path / "ds"), samples, codec, samples_per_shard=2, name="rt")
    assert len(ds.shards) == 3
    got = [s for url in ds.shard_urls() for s in read_shard(url)]
    assert len(got) == len(samples)
    for a, b in zip(got, samples):
        assert a.codes.dtype == dtype
        assert_same_sample(a, b)


def test_dataset_index_totals_and_load(tmp_path: Path, codec: dict) -> None:
    samples = make_samples(codec, 7)
    out = tmp_path / "ds"
    ds = write_dataset(str(out), samples, codec, samples_per_shard=3, name="tot")
    assert sorted(os.listdir(out)) == [
        "index.cidx",
        "index.json",
        "shard-000000.idx.json",
        "shard-000000.tar",
        "shard-000001.idx.json",
        "shard-000001.tar",
        "shard-000002.idx.json",
        "shard-000002.tar",
    ]
    assert [s.n_samples for s in ds.shards] == [3, 3, 1]
    assert ds.n_samples == 7
    assert ds.n_frames == sum(s.codes.shape[1] for s in samples)
    assert ds.seconds == pytest.approx(sum(s.meta["duration_s"] for s in samples))
    assert ds.text_chars == sum(len(s.text) for s in samples)
    assert ds.size_bytes == sum(os.path.getsize(out / s.path) for s in ds.shards)
    for s in ds.shards:
        assert s.sha256 == hashlib.sha256((out / s.path).read_bytes()).hexdigest()

    for url in (str(out), str(out) + "/", str(out / "index.json")):
        loaded = DatasetIndex.load(url)
        assert loaded == ds
        assert loaded.shard_urls() == [str(out / s.path) for s in ds.shards]
        assert loaded.index_urls() == [str(out / s.index) for s in ds.shards]
    raw = json.loads((out / "index.json").read_text())
    assert raw["totals"]["n_samples"] == 7


def test_writer_fills_metadata_defaults(tmp_path: Path, codec: dict) -> None:
    url = str(tmp_path / "shard.tar")
    with ShardWriter(url, codec) as w:
        w.write(Sample("k", np.zeros((2, 25), np.int16), "hi", {"speaker": 7}))
    (s,) = list(read_shard(url))
    assert s.meta == {
        "codec": codec,
        "n_frames": 25,
        "duration_s": 0.5,
        "speaker": "7",
        "language": "",
        "dataset": "",
    }
    (e,) = load_shard_index(url).samples
    assert (e.speaker, e.language, e.duration_s, e.text_bytes) == ("7", "", 0.5, 2)


# --------------------------------------------------------------------------- indexed reads


def test_parse_sample_at_indexed_offsets(shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, idx, samples = shard
    sequential = list(read_shard(url))
    assert [e.key for e in idx.samples] == [s.key for s in samples]
    assert idx.samples[0].offset == 0
    for prev, nxt in zip(idx.samples, idx.samples[1:]):
        assert prev.offset + prev.length == nxt.offset  # members are contiguous
    for entry, seq, orig in zip(idx.samples, sequential, samples):
        assert entry.length % 512 == 0
        assert entry.n_frames == orig.codes.shape[1]
        assert entry.n_q == orig.codes.shape[0]
        assert entry.text == orig.text
        assert entry.text_bytes == len(orig.text.encode())
        data = fs.read_range(url, entry.offset, entry.offset + entry.length)
        assert_same_sample(parse_sample(data, entry, url), seq)
        assert_same_sample(read_sample(url, entry), seq)


def test_sidecar_equals_built_index(shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, idx, _ = shard
    assert load_shard_index(url) == idx
    assert build_shard_index(url) == idx
    assert idx.size_bytes == os.path.getsize(url)
    assert idx.sha256 == hashlib.sha256(Path(url).read_bytes()).hexdigest()
    assert ShardIndex.from_json(idx.to_json()) == idx


def test_long_and_non_ascii_keys(tmp_path: Path, codec: dict) -> None:
    """Keys needing pax headers (non-ASCII, > 100 chars) keep exact offsets."""
    samples = make_samples(codec, 3)
    samples[0].key = "sprecher/äöü/" + "x" * 150
    samples[1].key = "a.b/c/utt"  # dots are fine outside the last component
    url = str(tmp_path / "shard.tar")
    with ShardWriter(url, codec) as w:
        for s in samples:
            w.write(s)
    idx = w.close()
    assert build_shard_index(url) == idx
    for entry, s in zip(idx.samples, samples):
        assert_same_sample(read_sample(url, entry), s)
    assert [s.key for s in read_shard(url)] == [s.key for s in samples]


def test_build_index_of_foreign_tar(tmp_path: Path, codec: dict) -> None:
    """A tar written by plain tarfile (GNU format, real mtimes, a directory entry)."""
    samples = make_samples(codec, 3)
    url = str(tmp_path / "foreign.tar")
    with tarfile.open(url, "w", format=tarfile.GNU_FORMAT) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for s in samples:
            buf = io.BytesIO()
            np.save(buf, s.codes.astype(np.uint16))
            for ext, data in (("codes.npy", buf.getvalue()), ("txt", s.text.encode()), ("json", json.dumps(s.meta).encode())):
                ti = tarfile.TarInfo(f"somedir/{s.key}.{ext}")
                ti.size, ti.mtime = len(data), 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
    idx = build_shard_index(url)
    assert idx.codec == codec
    assert [e.key for e in idx.samples] == [f"somedir/{s.key}" for s in samples]
    for entry in idx.samples:
        assert read_sample(url, entry).key == entry.key


# --------------------------------------------------------------------------- determinism


def test_deterministic_bytes(tmp_path: Path, codec: dict) -> None:
    a = write_dataset(str(tmp_path / "a"), make_samples(codec, 5), codec, 2, "d")
    b = write_dataset(str(tmp_path / "b"), make_samples(codec, 5), codec, 2, "d")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for s in a.shards:
        assert (tmp_path / "a" / s.path).read_bytes() == (tmp_path / "b" / s.path).read_bytes()
        assert (tmp_path / "a" / s.index).read_bytes() == (tmp_path / "b" / s.index).read_bytes()
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    with tarfile.open(tmp_path / "a" / a.shards[0].path) as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    # no temp files left behind
    assert not [p for p in os.listdir(tmp_path / "a") if p.endswith(".tmp")]


# --------------------------------------------------------------------------- write validation


@pytest.mark.parametrize(
    ("codes", "match"),
    [
        (np.full((2, 4), 1024), r"code 1024 at \[q=0, t=0\] outside codebook \[0, 1024\)"),
        (np.array([[0, 1], [2, -1]]), r"code -1 at \[q=1, t=1\] outside codebook"),
        (np.zeros((3, 4), np.int64), r"shape \(3, 4\) != \[n_q=2, T\]"),
        (np.zeros((8,), np.int64), r"shape \(8,\)"),
        (np.zeros((2, 4), np.float32), "not an integer type"),
        (np.zeros((2, 0), np.int64), "0 frames"),
    ],
)
def test_write_rejects_bad_codes(tmp_path: Path, codec: dict, codes: np.ndarray, match: str) -> None:
    url = str(tmp_path / "shard.tar")
    good = make_samples(codec, 2)
    with ShardWriter(url, codec) as w:
        w.write(good[0])
        with pytest.raises(ValueError, match="'bad/key'") as ei:
            w.write(Sample("bad/key", codes, "t", {}))
        assert ei.match(match)
        w.write(good[1])
    # a rejected sample leaves no partial members behind
    assert [s.key for s in read_shard(url)] == [good[0].key, good[1].key]


@pytest.mark.parametrize("key", ["a.b", "dir/a.b", "", "/abs", "a//b", "a/../b", "new\nline"])
def test_write_rejects_bad_keys(tmp_path: Path, codec: dict, key: str) -> None:
    w = ShardWriter(str(tmp_path / "shard.tar"), codec)
    with pytest.raises(ValueError, match="key"):
        w.write(Sample(key, np.zeros((2, 3), np.int64), "t", {}))
    w.abort()


def test_write_rejects_duplicates_and_meta_mismatch(tmp_path: Path, codec: dict) -> None:
    w = ShardWriter(str(tmp_path / "shard.tar"), codec)
    codes = np.zeros((2, 3), np.int64)
    w.write(Sample("k1", codes, "t", {}))
    with pytest.raises(ValueError, match="'k1'.*duplicate"):
        w.write(Sample("k1", codes, "t", {}))
    with pytest.raises(ValueError, match="'k2'.*codec"):
        w.write(Sample("k2", codes, "t", {"codec": make_codec(512)}))
    with pytest.raises(ValueError, match="'k3'.*n_frames"):
        w.write(Sample("k3", codes, "t", {"n_frames": 4}))
    with pytest.raises(ValueError, match="'k4'.*JSON"):
        w.write(Sample("k4", codes, "t", {"x": object()}))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_bad_codec_and_empty_shard(tmp_path: Path, codec: dict) -> None:
    with pytest.raises(ValueError, match="missing keys"):
        ShardWriter(str(tmp_path / "a.tar"), {"n_q": 1, "codebook_size": 4})
    with pytest.raises(ValueError, match=r"\.tar"):
        ShardWriter(str(tmp_path / "a.zip"), codec)
    with pytest.raises(ValueError, match="no samples"):
        ShardWriter(str(tmp_path / "a.tar"), codec).close()
    with pytest.raises(ValueError, match="no samples"):
        write_dataset(str(tmp_path / "ds"), [], codec, 4, "empty")
    assert not (tmp_path / "a.tar").exists()


def test_writer_publishes_nothing_on_exception(tmp_path: Path, codec: dict) -> None:
    url = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(str(url), codec) as w:
            w.write(make_samples(codec, 1)[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- failure modes


def _read_all(url: str) -> list[Sample]:
    return list(read_shard(url))


def _expect_shard_error(url: str, match: str, exc: type[ShardError] = ShardError) -> ShardError:
    with pytest.raises(exc, match=match) as ei:
        _read_all(url)
    assert url in str(ei.value)
    return ei.value


def test_missing_file(tmp_path: Path) -> None:
    url = str(tmp_path / "nope.tar")
    _expect_shard_error(url, "missing file")
    with pytest.raises(ShardError, match="missing file"):
        build_shard_index(url)
    with pytest.raises(ShardError, match="missing shard index"):
        load_shard_index(url)
    with pytest.raises(ShardError, match="missing dataset index"):
        DatasetIndex.load(str(tmp_path))


def test_empty_file_and_empty_archive(tmp_path: Path) -> None:
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    _expect_shard_error(str(zero), r"empty file \(0 bytes\)")
    empty_tar = tmp_path / "empty.tar"
    with tarfile.open(empty_tar, "w"):
        pass
    _expect_shard_error(str(empty_tar), r"no members")


def test_not_a_tar(tmp_path: Path) -> None:
    p = tmp_path / "text.tar"
    p.write_bytes(b"this is just some text, definitely not a tar archive\n" * 40)
    _expect_shard_error(str(p), "not a tar archive")
    short = tmp_path / "short.tar"
    short.write_bytes(b"hello")
    _expect_shard_error(str(short), "truncated: partial tar header at byte 0")


def _truncate_copy(src: str, dst: Path, n: int) -> str:
    dst.write_bytes(Path(src).read_bytes()[:n])
    return str(dst)


def test_truncated_in_member_data(tmp_path: Path, shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, idx, _ = shard
    e1 = idx.samples[1]
    cut = _truncate_copy(url, tmp_path / "cut.tar", e1.offset + 512 + 40)  # inside utt0001.codes.npy
    err = _expect_shard_error(cut, r"truncated: member 'utt0001\.codes\.npy'.*data bytes")
    assert err.reason.startswith("truncated")


def test_truncated_at_sample_boundary(tmp_path: Path, shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    """Cut exactly between samples: tarfile would silently report fewer samples."""
    url, idx, _ = shard
    cut = _truncate_copy(url, tmp_path / "cut.tar", idx.samples[3].offset)
    _expect_shard_error(cut, "without an end-of-archive marker")
    cut2 = _truncate_copy(url, tmp_path / "cut2.tar", idx.samples[3].offset + 100)
    _expect_shard_error(cut2, f"partial tar header at byte {idx.samples[3].offset}")


def test_corrupt_header_in_the_middle(tmp_path: Path, shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, idx, _ = shard
    bad = tmp_path / "bad.tar"
    data = bytearray(Path(url).read_bytes())
    at = idx.samples[2].offset
    data[at + 20 : at + 60] = b"\xff" * 40  # inside the member name of utt0002's first header
    bad.write_bytes(bytes(data))
    _expect_shard_error(str(bad), rf"corrupt: bad tar header at byte {at} \(bad checksum\)")
    with pytest.raises(SampleError, match="bad tar header") as ei:
        read_sample(str(bad), idx.samples[2])
    assert ei.value.key == "utt0002"


def test_bad_npy(tmp_path: Path, shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, idx, _ = shard
    bad = tmp_path / "bad.tar"
    data = bytearray(Path(url).read_bytes())
    at = idx.samples[1].offset + 512  # first data block of utt0001.codes.npy
    assert data[at : at + 6] == b"\x93NUMPY"
    data[at : at + 6] = b"NOTNPY"
    bad.write_bytes(bytes(data))
    err = _expect_shard_error(str(bad), r"sample 'utt0001': bad npy in utt0001\.codes\.npy", SampleError)
    assert err.key == "utt0001"
    with pytest.raises(SampleError, match="bad npy"):
        read_sample(str(bad), idx.samples[1])
    assert read_sample(str(bad), idx.samples[0]).key == "utt0000"  # neighbours unaffected


def test_member_missing(tmp_path: Path, codec: dict) -> None:
    url = tmp_path / "partial.tar"
    with tarfile.open(url, "w") as tf:
        for name, data in (("a.txt", b"x"), ("a.json", b"{}")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    err = _expect_shard_error(str(url), r"sample 'a': missing member\(s\) \['a\.codes\.npy'\]", SampleError)
    assert err.key == "a"


def test_parse_sample_damaged_ranges(shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, idx, _ = shard
    e = idx.samples[2]
    data = fs.read_range(url, e.offset, e.offset + e.length)
    with pytest.raises(SampleError, match=r"sample 'utt0002': truncated range"):
        parse_sample(data[:-512], e, url)
    stale = idx.samples[3]
    with pytest.raises(SampleError, match="stale index"):
        parse_sample(fs.read_range(url, stale.offset, stale.offset + e.length), e, url)
    with pytest.raises(SampleError, match="bad tar header"):
        parse_sample(b"\x01" * e.length, e, url)


def test_corrupt_sidecar_and_dataset_index(tmp_path: Path, shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, _, _ = shard
    Path(index_path_for(url)).write_text("{not json")
    with pytest.raises(ShardError, match="corrupt shard index"):
        load_shard_index(url)
    (tmp_path / "index.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ShardError, match="corrupt dataset index"):
        DatasetIndex.load(str(tmp_path))


def test_errors_survive_pickling() -> None:
    import pickle

    e = SampleError("s3://b/x.tar", "bad npy", key="k")
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is SampleError and str(e2) == str(e)
    assert str(SampleError(str(e))) == str(e)  # torch DataLoader re-raises as cls(msg)


# --------------------------------------------------------------------------- webdataset interop


def test_webdataset_reads_our_shards(shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    wds = pytest.importorskip("webdataset")
    url, _, samples = shard
    got = list(wds.WebDataset(url, shardshuffle=False))
    assert [d["__key__"] for d in got] == [s.key for s in samples]
    for d, s in zip(got, samples):
        assert {"codes.npy", "txt", "json"} <= set(d)
        codes = np.load(io.BytesIO(d["codes.npy"]))
        assert codes.dtype == np.uint16
        np.testing.assert_array_equal(codes, s.codes)
        assert d["txt"].decode() == s.text
        assert json.loads(d["json"]) == s.meta


# --------------------------------------------------------------------------- CLI


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return full_env


def run_cli_many(*calls: Sequence[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``python -m data_pipeline`` calls concurrently (keeps the tests fast)."""
    procs = [
        (
            list(args),
            subprocess.Popen(
                [sys.executable, "-m", "data_pipeline", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                env=_cli_env(env),
            ),
        )
        for args in calls
    ]
    results = []
    for args, p in procs:
        out, err = p.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return results


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli_many(args, env=env)[0]


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0]


def test_cli_inspect_shard_and_dataset(tmp_path: Path, codec: dict) -> None:
    out = tmp_path / "ds"
    samples = make_samples(codec, 5)
    ds = write_dataset(str(out), samples, codec, 3, "cli")
    tar = str(out / "shard-000000.tar")
    r_text, r_json, r_ds, r_ds_json = run_cli_many(
        ("inspect", tar),
        ("inspect", str(out / "shard-000000.idx.json"), "--json"),
        ("inspect", str(out), "--verify"),
        ("inspect", str(out / "index.json"), "--json"),
    )

    assert r_text.returncode == 0, r_text.stderr
    for needle in (
        f"path:       {tar}",
        "ok (matches sidecar)",
        "codec:      testcodec v1",
        "samples:    3",
        f"frames:     {sum(s.codes.shape[1] for s in samples[:3])}",
        "speakers:   3",
        "languages:  2",
        "first keys: utt0000, utt0001, utt0002",
    ):
        assert needle in r_text.stdout, r_text.stdout

    assert r_json.returncode == 0, r_json.stderr
    rep = json.loads(r_json.stdout)
    assert rep["n_samples"] == 3 and rep["sidecar"]["status"] == "ok"
    assert rep["n_frames_min"] <= rep["n_frames_mean"] <= rep["n_frames_max"]

    assert r_ds.returncode == 0, r_ds.stderr
    assert "2 shards, 5 samples" in r_ds.stdout and "shard-000001.tar" in r_ds.stdout
    assert "2/2 shards ok" in r_ds.stdout
    rep = json.loads(r_ds_json.stdout)
    assert rep["totals"]["n_samples"] == ds.n_samples and len(rep["shards"]) == 2


def test_cli_inspect_errors(tmp_path: Path, shard: tuple[str, ShardIndex, list[Sample]]) -> None:
    url, idx, _ = shard
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    cut = _truncate_copy(url, tmp_path / "cut.tar", idx.samples[2].offset + 700)
    # a sidecar that disagrees with its tar is a verification failure (exit 1)
    mismatched = str(tmp_path / "mismatch.tar")
    shutil.copy(url, mismatched)
    side = json.loads(Path(index_path_for(url)).read_text())
    side["sha256"] = "0" * 64
    Path(index_path_for(mismatched)).write_text(json.dumps(side))

    r_missing, r_junk, r_cut, r_mismatch = run_cli_many(
        ("inspect", str(tmp_path / "missing.tar")),
        ("inspect", str(junk)),
        ("inspect", cut),
        ("inspect", mismatched),
    )
    assert_one_line_error(r_missing, "missing.tar", "missing file")
    assert_one_line_error(r_junk, "junk.tar", "not a tar archive")
    assert_one_line_error(r_cut, "cut.tar", "truncated")
    assert r_mismatch.returncode == 1 and "MISMATCH" in r_mismatch.stdout, (r_mismatch.stdout, r_mismatch.stderr)


@pytest.mark.parametrize(("name", "needle"), [("nothing", "no such file"), ("emptydir", "not a dataset dir")])
def test_cli_inspect_bad_paths_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, needle: str
) -> None:
    from data_pipeline.__main__ import main

    (tmp_path / "emptydir").mkdir()
    assert main(["inspect", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_cli_index_rebuilds_sidecars_and_dataset(tmp_path: Path, codec: dict) -> None:
    out = tmp_path / "ds"
    ds = write_dataset(str(out), make_samples(codec, 5), codec, 2, "ds")
    originals = {s.index: (out / s.index).read_bytes() for s in ds.shards}
    for p in [*originals, "index.json"]:
        (out / p).unlink()
    outside = tmp_path / "elsewhere.tar"
    shutil.copy(out / ds.shards[0].path, outside)
    r, r_outside = run_cli_many(
        ("index", *[str(out / s.path) for s in ds.shards], "--dataset", str(out)),
        ("index", str(outside), "--dataset", str(out)),
    )
    assert r.returncode == 0, r.stderr
    assert_one_line_error(r_outside, "not inside dataset dir")
    assert not Path(index_path_for(str(outside))).exists()
    for name, raw in originals.items():
        assert (out / name).read_bytes() == raw
    assert DatasetIndex.load(str(out)) == ds

    (out / "index.json").unlink()
    r = run_cli("index", "--dataset", str(out), "--name", "again")
    assert r.returncode == 0, r.stderr
    again = DatasetIndex.load(str(out))
    assert again.name == "again" and again.shards == ds.shards



# ------------------------------------------------------- 0 frames; writing from the command line


def test_the_writer_and_the_index_builder_agree_on_zero_frame_samples(tmp_path):
    import io
    import json as _json
    import tarfile

    from data_pipeline.shards import Sample as _Sample
    from data_pipeline.shards import ShardError as _ShardError
    from data_pipeline.shards import ShardWriter as _ShardWriter
    from data_pipeline.shards import build_shard_index as _build

    codec = {"name": "c", "version": "1", "sample_rate": 16000, "frame_rate": 50, "n_q": 1, "codebook_size": 256}
    with pytest.raises(ValueError, match="0 frames"):
        with _ShardWriter(str(tmp_path / "w.tar"), codec) as w:
            w.write(_Sample(key="a/0", codes=np.zeros((1, 0), np.uint16), text="x", meta={}))
    tar = tmp_path / "shard-000000.tar"  # the same sample in a tar written by another tool
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for key, n in (("a/1", 3), ("a/0", 0)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.zeros((1, n), np.uint16), version=(1, 0))
            for ext, data in (("codes.npy", buf.getvalue()), ("txt", b"x"), ("json", _json.dumps({}).encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    with pytest.raises(_ShardError, match="a/0.*0 frames"):
        _build(str(tar), codec)


def test_write_builds_a_dataset_from_a_manifest(tmp_path, capsys):
    import json as _json

    from data_pipeline.__main__ import main as cli_main
    from data_pipeline.shards import DatasetIndex as _DatasetIndex
    from data_pipeline.shards import read_shard as _read_shard

    np.save(tmp_path / "u1.npy", np.array([[1, 2, 3, 4]], dtype=np.uint16))
    rows = [{"key": "c/s/1", "codes": "u1.npy", "text": "hello"},
            {"key": "c/s/2", "codes": [[5, 6, 7]], "text": "world", "meta": {"speaker": "s"}},
            {"key": "c/s/3", "codes": [[9, 9]], "text": "again"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    codec = {"name": "c", "version": "1", "sample_rate": 16000, "frame_rate": 50, "n_q": 1, "codebook_size": 256}
    out = tmp_path / "ds"
    assert cli_main(["write", str(manifest), "--out", str(out), "--codec-json", _json.dumps(codec),
                     "--samples-per-shard", "2", "--name", "mine"]) == 0
    ds = _DatasetIndex.load(str(out))
    assert ds.name == "mine" and len(ds.shards) == 2 and ds.n_samples == 3 and ds.n_frames == 9
    got = [s for u in ds.shard_urls() for s in _read_shard(u)]
    assert [s.key for s in got] == ["c/s/1", "c/s/2", "c/s/3"] and got[1].meta["speaker"] == "s"
    assert got[0].codes.tolist() == [[1, 2, 3, 4]]
    # bad input: one line, exit 2, nothing half-written over the dataset
    assert cli_main(["write", str(manifest), "--out", str(out), "--codec-json", _json.dumps(codec)]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_json.dumps({"key": "c/s/9", "text": "no codes"}) + "\n")
    assert cli_main(["write", str(bad), "--out", str(tmp_path / "ds2"), "--codec-json", _json.dumps(codec)]) == 2
    assert "bad.jsonl:1: KeyError" in capsys.readouterr().err
