"""The compact index (index.cidx): what it holds, that every writer writes the same bytes, that the
loader reads it instead of the sidecars (and copes when it is absent, stale, corrupt or lacks
token counts), and the fast sample decoder against the generic tar parser."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import compact_index as ci
from data_pipeline import samples as samples_mod
from data_pipeline import shards as shards_mod
from data_pipeline.__main__ import main as cli
from data_pipeline.compact_index import CompactIndex, CompactIndexError
from data_pipeline.layouts import VocabLayout, build_layout
from data_pipeline.loader import DataConfigError, PackedLoader
from data_pipeline.shards import DatasetIndex, Sample, finalize_dataset, load_shard_index, write_dataset
from data_pipeline.tokenizer import ByteTokenizer
from tests.unit.test_loader import assert_steps_equal, word_tokenizer

REPO = Path(__file__).resolve().parents[2]
CODEC = {"name": "synth", "version": "1", "sample_rate": 16000, "frame_rate": 50, "n_q": 1, "codebook_size": 1024}
LAYOUT = build_layout("llasa", VocabLayout(text_vocab_size=256, codebook_size=1024))


def synth(n: int, seed: int = 0, prefix: str = "") -> list[Sample]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
    return [Sample(key=f"{prefix}spk{i % 3}/utt{i:04d}", codes=rng.integers(0, 1024, (1, int(rng.integers(40, 200)))),
                   text=" ".join(rng.choice(words, size=int(rng.integers(3, 8)))),
                   meta={"speaker": f"spk{i % 3}", "language": "en"}) for i in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("cidx") / "ds"
    write_dataset(str(d), synth(150), CODEC, samples_per_shard=20, name="cidx")
    return str(d)


def make_loader(path, **kw) -> PackedLoader:
    args = dict(layout=LAYOUT, tokenizer=ByteTokenizer(), seq_len=512, micro_batch_size=2, global_batch_size=4,
                pack_window=64, num_workers=2, prefetch=1, seed=5)
    args.update(kw)
    return PackedLoader(path, **args)


def steps(ld: PackedLoader, n: int) -> list:
    return [ld.next_step() for _ in range(n)]


def assert_same(a: list, b: list) -> None:
    assert_steps_equal(a, b)
    for sa, sb in zip(a, b):
        for x, y in zip(sa, sb):
            assert torch.equal(x.source, y.source)


# ------------------------------------------------------------------------------ the file


def test_columns_hold_what_the_sidecars_say(dataset: str) -> None:
    ds = DatasetIndex.load(dataset)
    ix = CompactIndex.open(dataset)
    assert (ix.name, ix.codec, ix.n_samples, ix.n_shards) == ("cidx", ds.codec, 150, 8)
    assert ix.shard_sizes.tolist() == [s.n_samples for s in ds.shards]
    assert ix.tokens_column(ByteTokenizer.fingerprint) == "text_bytes" and ix.tokens_column("other") is None
    raw = (Path(dataset) / "index.json").read_bytes()
    assert ix.index_json == {"size": len(raw), "sha256": __import__("hashlib").sha256(raw).hexdigest()}
    assert ix.size_bytes().tolist() == [s.size_bytes for s in ds.shards]
    for s, url in enumerate(ds.shard_urls()):
        side = load_shard_index(url)
        assert ix.shard_url(s) == url
        for col, attr in (("offset", "offset"), ("nbytes", "length"), ("n_frames", "n_frames"),
                          ("text_bytes", "text_bytes")):
            assert ix.column(col, s).tolist() == [getattr(e, attr) for e in side.samples], col
        np.testing.assert_allclose(ix.column("duration_s", s), [e.duration_s for e in side.samples], rtol=1e-6)
    # the narrowest widths that fit
    assert ix._cols["n_frames"].dtype == np.dtype("<u2") and ix._cols["offset"].dtype == np.dtype("<u4")
    ix.close()


def test_every_writer_writes_the_same_bytes(tmp_path: Path, dataset: str) -> None:
    ref = (Path(dataset) / "index.cidx").read_bytes()
    fin = tmp_path / "fin"
    shutil.copytree(dataset, fin)
    for f in ("index.cidx", "index.json"):
        (fin / f).unlink()
    finalize_dataset(str(fin), name="cidx", codec=CODEC)
    assert (fin / "index.cidx").read_bytes() == ref
    (fin / "index.cidx").unlink()
    assert cli(["index", "--dataset", str(fin), "--compact-only"]) == 0
    assert (fin / "index.cidx").read_bytes() == ref
    assert cli(["index", "--dataset", str(fin), "--name", "cidx"]) == 0  # rescans the tars
    assert (fin / "index.cidx").read_bytes() == ref


def test_the_committed_demo_index_is_what_its_sidecars_make(tmp_path: Path) -> None:
    """data/demo/index.cidx is reproduced byte for byte (build-demo writes it through write_dataset,
    whose bytes equal these: previous test)."""
    demo = REPO / "data" / "demo"
    ds = DatasetIndex.load(str(demo))
    out = tmp_path / "demo"
    out.mkdir()
    ci.write_for_dataset(str(out), ds.name, ds.codec,
                         ((s.path, load_shard_index(u)) for s, u in zip(ds.shards, ds.shard_urls())),
                         (demo / "index.json").read_bytes())
    assert (out / "index.cidx").read_bytes() == (demo / "index.cidx").read_bytes()


def test_damaged_or_newer_files_are_refused_naming_the_file(tmp_path: Path, dataset: str) -> None:
    good = (Path(dataset) / "index.cidx").read_bytes()
    head = int(np.frombuffer(good[8:16], np.uint64)[0])
    header = json.loads(good[16:16 + head])
    newer = json.dumps({**header, "version": ci.VERSION + 1}).encode()
    cases = {
        "bad magic": b"NOTCIDX\n" + good[8:],
        "truncated": good[: len(good) - 100],
        "corrupt header": good[:16] + b"x" + good[17:],
        f"version {ci.VERSION + 1} is newer": good[:8] + np.uint64(len(newer)).tobytes() + newer,
    }
    for i, (what, data) in enumerate(cases.items()):
        d = tmp_path / f"d{i}"
        shutil.copytree(dataset, d)
        (d / "index.cidx").write_bytes(data)
        with pytest.raises(CompactIndexError, match=what):
            CompactIndex.open(str(d))
        with pytest.raises(DataConfigError, match=rf"{d}.*index.cidx.*{what}.*--compact-only"):
            make_loader(str(d))


def test_a_stale_index_is_not_used(tmp_path: Path, dataset: str, caplog: pytest.LogCaptureFixture) -> None:
    """index.json rewritten after index.cidx (here: renamed): the sidecars are read instead, loudly."""
    d = tmp_path / "ds"
    shutil.copytree(dataset, d)
    meta = json.loads((d / "index.json").read_text())
    meta["name"] = "renamed"
    (d / "index.json").write_text(json.dumps(meta))
    caplog.set_level(logging.WARNING, logger="data_pipeline.loader")
    with make_loader(str(d)) as ld:
        assert ld.sources == ["renamed"]
        ld.next_step()
    assert "index.cidx is stale" in caplog.text and "--compact-only" in caplog.text


# ------------------------------------------------------------------------------ the loader reads it


def test_start_up_and_planning_read_no_sidecar_and_little_of_the_index(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "many"
    write_dataset(str(d), synth(1600, seed=3), CODEC, samples_per_shard=40, name="many")  # 40 shards
    size = os.path.getsize(d / "index.cidx")

    def no_sidecars(url: str):
        raise AssertionError(f"sidecar of {url} read")

    monkeypatch.setattr(shards_mod, "load_shard_index", no_sidecars)
    monkeypatch.setattr(samples_mod.shards, "load_shard_index", no_sidecars)
    with make_loader(str(d), pack_window=40, prefetch=0) as ld:
        opened = ld.index_bytes_read
        assert opened < size / 2  # header + shard table, no sample column
        keys = [k for _ in range(3) for b in ld.next_step() for row in b.sample_keys for k in row]
        assert keys and ld.stats["skipped_bad_sample"] == 0
        # a 40-sample window comes from one or two 40-sample shards: only their column slices were read
        assert ld.index_bytes_read - opened < size / 4


def test_fast_decoding_equals_the_generic_parser(tmp_path: Path) -> None:
    samples = synth(60, seed=7)
    samples[3].key = "spk0/" + "long" * 40  # > 100 bytes: a pax header, decoded by the generic path
    samples[8].key = "spk1/ünïcode"  # non-ASCII: pax too
    samples[11].codes = samples[11].codes[:, :1]  # one frame
    write_dataset(str(tmp_path / "ds"), samples, CODEC, samples_per_shard=15, name="fast")
    with make_loader(str(tmp_path / "ds")) as fast, make_loader(str(tmp_path / "ds"), fast_read=False) as slow:
        a, b = steps(fast, 12), steps(slow, 12)
        assert fast.stats["epoch"] >= 1 and fast.stats["skipped_bad_sample"] == 0
    assert_same(a, b)
    keys = {k for step in a for batch in step for row in batch.sample_keys for k in row}
    assert {f"shard-000000.tar:{samples[3].key}", f"shard-000000.tar:{samples[8].key}"} <= keys


def test_decode_fast_declines_what_it_does_not_check() -> None:
    ds = DatasetIndex.load(str(REPO / "data" / "demo"))
    url = ds.shard_urls()[0]
    raw = bytearray(Path(url).read_bytes())
    e = load_shard_index(url).samples[2]
    dt = shards_mod.codes_dtype(ds.codec["codebook_size"])
    key, codes, text = shards_mod.decode_fast(bytes(raw), e.offset, e.length, 1, e.n_frames, dt)
    s = shards_mod.parse_sample(bytes(raw[e.offset:e.end]), e, url)
    assert (key, text) == (s.key, s.text) and np.array_equal(codes, s.codes)
    assert shards_mod.decode_fast(bytes(raw), e.offset, e.length, 1, e.n_frames + 1, dt) is None  # shape
    assert shards_mod.decode_fast(bytes(raw), e.offset, e.length - 512, 1, e.n_frames, dt) is None  # length
    assert shards_mod.decode_fast(bytes(raw), e.offset, e.length, 1, e.n_frames, np.dtype("<i4")) is None  # dtype
    bad = bytearray(raw)
    at = raw.find(f"{e.key}.txt".encode(), e.offset)
    bad[at:at + 4] = b"XXXX"  # the second member's name
    assert shards_mod.decode_fast(bytes(bad), e.offset, e.length, 1, e.n_frames, dt) is None


def test_token_counts_of_another_tokenizer(tmp_path: Path, dataset: str, caplog: pytest.LogCaptureFixture) -> None:
    """Without its counts in index.cidx a tokenizer's lengths come from the sidecars (warned);
    `index --compact-only --text-tokenizer` adds them and the sidecars are no longer needed."""
    hf = word_tokenizer(tmp_path)
    layout = build_layout("llasa", VocabLayout(text_vocab_size=hf.vocab_size, codebook_size=1024))
    caplog.set_level(logging.WARNING, logger="data_pipeline.loader")
    with make_loader(dataset, tokenizer=hf, layout=layout) as ld:
        fallback = steps(ld, 6)
    assert "has no token counts for tokenizer" in caplog.text
    d = tmp_path / "ds"
    shutil.copytree(dataset, d)
    assert cli(["index", "--dataset", str(d), "--compact-only", "--text-tokenizer", "hf",
                "--tokenizer-path", str(tmp_path / "tokenizer.json")]) == 0
    assert CompactIndex.open(str(d)).tokens_column(hf.fingerprint) == f"tokens:{hf.fingerprint}"
    for side in d.glob("*.idx.json"):
        side.unlink()
    with make_loader(str(d), tokenizer=hf, layout=layout) as ld:
        assert_same(fallback, steps(ld, 6))


def test_a_dataset_without_a_compact_index_still_loads(tmp_path: Path, dataset: str) -> None:
    d = tmp_path / "old"
    shutil.copytree(dataset, d)
    (d / "index.cidx").unlink()
    with make_loader(dataset) as new, make_loader(str(d)) as old:
        assert new.state_dict() == old.state_dict()
        assert_same(steps(new, 5), steps(old, 5))


def test_inspect_says_whether_the_loader_will_use_it(tmp_path: Path, dataset: str, capsys) -> None:
    d = tmp_path / "ds"
    shutil.copytree(dataset, d)
    assert cli(["inspect", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compact_index"]["status"] == "ok"
    meta = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**meta, "name": "other"}))
    assert cli(["inspect", str(d), "--verify"]) == 1  # stale
    assert "compact:    stale" in capsys.readouterr().out
    (d / "index.cidx").write_bytes(b"garbage")
    assert cli(["inspect", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compact_index"]["status"] == "corrupt"
