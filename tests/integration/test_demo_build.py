"""Integration tests for the demo dataset builder and the committed data/demo dataset."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import demo
from data_pipeline.codec import MelKMeansCodec
from data_pipeline.shards import DatasetIndex, read_shard

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "data" / "demo"
HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(
    not HAS_ESPEAK, reason="espeak-ng not installed (apt-get install espeak-ng); "
                           "the committed data/demo is still checked by the other tests")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_espeak
def test_small_build_is_byte_identical(tmp_path: Path) -> None:
    kwargs = dict(n_sentences=20, seed=7, codebook_size=32, samples_per_shard=8, verbose=False)
    a = demo.build_demo(tmp_path / "a", workers=4, **kwargs)
    b = demo.build_demo(tmp_path / "b", workers=1, **kwargs)
    assert a == b
    shards_a = sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar"))
    assert shards_a == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in shards_a + ["index.json", "codebook.npy", "BUILD.json"]:
        assert _sha256(tmp_path / "a" / name) == _sha256(tmp_path / "b" / name), name
    assert a["shards"] == {n: _sha256(tmp_path / "a" / n) for n in shards_a}

    ds = DatasetIndex.load(str(tmp_path / "a"))
    assert ds.n_samples == 20 and ds.codec["name"] == "mel-kmeans"
    samples = [s for url in ds.shard_urls(str(tmp_path / "a")) for s in read_shard(url)]
    assert [s.key.split("/")[1] for s in samples[:4]] == ["en-us", "en-gb", "en-us_f3", "en_m3"]
    for s in samples:
        assert s.codes.dtype == np.uint16 and s.codes.shape[0] == 1
        assert s.meta["language"] == "en" and s.meta["dataset"] == "demo"
        assert abs(s.meta["n_frames"] / 50.0 - s.meta["duration_s"]) < 0.021
    stats = a["stats"]
    assert 0 < stats["bigram_conditional_entropy_nats"] < stats["unigram_entropy_nats"] \
        <= np.log(32) + 1e-9


@needs_espeak
def test_rebuild_into_same_dir_removes_stale_shards(tmp_path: Path) -> None:
    out = tmp_path / "d"
    demo.build_demo(out, n_sentences=12, seed=1, codebook_size=16, samples_per_shard=4,
                    verbose=False)
    assert len(list(out.glob("shard-*.tar"))) == 3
    demo.build_demo(out, n_sentences=12, seed=1, codebook_size=16, samples_per_shard=6,
                    verbose=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar",
                                                               "shard-000001.tar"]
    assert DatasetIndex.load(str(out)).n_samples == 12


def test_missing_espeak_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    rc = demo.main(["build-demo", "--out", str(tmp_path / "out"), "--sentences", "5"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "apt-get install espeak-ng" in err and "data/demo" in err
    assert not (tmp_path / "out").exists()


def test_committed_demo_index_and_hashes() -> None:
    build = json.loads((COMMITTED / "BUILD.json").read_text())
    ds = DatasetIndex.load(str(COMMITTED))
    assert ds.name == "demo"
    assert ds.n_samples == build["stats"]["utterances"]
    assert ds.n_frames == build["stats"]["tokens"]
    assert sorted(s.path for s in ds.shards) == sorted(build["shards"])
    total = 0
    for s in ds.shards:
        path = COMMITTED / s.path
        assert _sha256(path) == build["shards"][s.path] == s.sha256, s.path
        total += path.stat().st_size
    assert total == build["total_shard_bytes"] < 2_000_000
    assert sum(p.stat().st_size for p in COMMITTED.iterdir()) < 2_000_000
    codec = MelKMeansCodec.load(COMMITTED / build["codebook_file"])
    assert codec.codec_info() == ds.codec
    assert codec.checkpoint_sha256() == build["codebook_sha256"]


@needs_espeak
def test_committed_demo_matches_local_espeak() -> None:
    """Re-synthesise a few committed utterances and re-encode them with the committed codebook."""
    build = json.loads((COMMITTED / "BUILD.json").read_text())
    version = demo.espeak_version(demo.find_espeak())
    if version != build["espeak_ng_version"]:
        pytest.skip(f"local espeak-ng {version} != {build['espeak_ng_version']} used for data/demo")
    codec = MelKMeansCodec.load(COMMITTED / build["codebook_file"])
    ds = DatasetIndex.load(str(COMMITTED))
    committed = {s.key: s for s in read_shard(ds.shard_urls(str(COMMITTED))[0])}
    plan = demo.plan_utterances(build["n_sentences"], build["seed"], build["voices"])[:6]
    for utt in demo.synthesize(plan, demo.find_espeak()):
        key = f"demo/{demo.speaker_slug(utt.voice)}/{utt.index:05d}"
        sample = committed[key]
        assert sample.text == utt.text
        np.testing.assert_array_equal(codec.encode(utt.audio), sample.codes)
