"""Weighted mixing (data.sources): token shares, per-source epochs, exact resume (also over a DP
size, worker count or weight change), the curriculum order, state compatibility and the config."""
from __future__ import annotations

import collections
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.layouts import VocabLayout, build_layout
from data_pipeline.loader import DataConfigError, PackedLoader, SourceSpec
from data_pipeline.mixing import PackStream, StreamState
from data_pipeline.packing import _TAG_BINS, GlobalOrder, _rng, minimal_bin_slack
from data_pipeline.shards import Sample, load_shard_index, write_dataset
from data_pipeline.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import index_scale as sim  # noqa: E402

CODEC = {"name": "synth", "version": "1", "sample_rate": 16000, "frame_rate": 50, "n_q": 1, "codebook_size": 1024}
LAYOUT = build_layout("llasa", VocabLayout(text_vocab_size=256, codebook_size=1024))
BIG_LAYOUT = build_layout("llasa", VocabLayout(text_vocab_size=256, codebook_size=65536))


def samples(n: int, prefix: str, frames: tuple[int, int], seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [Sample(key=f"{prefix}/utt{i:04d}", codes=rng.integers(0, 1024, (1, int(rng.integers(*frames)))),
                   text=f"{prefix} number {i}", meta={}) for i in range(n)]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three small datasets on disk: short, long and mid utterances, of different sizes."""
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name, n, frames, seed in (("short", 90, (30, 90), 1), ("long", 40, (150, 300), 2), ("mid", 25, (80, 160), 3)):
        write_dataset(str(root / name), samples(n, name, frames, seed), CODEC, samples_per_shard=15, name=name)
        out[name] = str(root / name)
    return out


def specs(real: dict[str, str], weights: dict[str, float]) -> list[SourceSpec]:
    return [SourceSpec([real[n]], w, n) for n, w in weights.items()]


def loader(src, **kw) -> PackedLoader:
    args = dict(layout=LAYOUT, tokenizer=ByteTokenizer(), seq_len=512, micro_batch_size=2, global_batch_size=8,
                pack_window=48, num_workers=2, prefetch=2, seed=11)
    args.update(kw)
    return PackedLoader(sources=src, **args)


def rows(steps: list) -> list[tuple]:
    return [(pid, tuple(k), b.tokens[i].tolist()) for step in steps for b in step
            for i, (pid, k) in enumerate(zip(b.pack_ids, b.sample_keys))]


def keys_by_source(steps: list) -> dict[str, list[str]]:
    out = collections.defaultdict(list)
    for step in steps:
        for b in step:
            for row in b.sample_keys:
                for k in row:
                    out[k.split(":", 1)[1].split("/")[0]].append(k)
    return out


def assert_epochs_without_repeats(keys: dict[str, list[str]], sizes: dict[str, int]) -> None:
    """Each source's documents, in delivery order, cut into its epochs: no repeat within one, and
    every completed one covers the whole source."""
    for name, ks in keys.items():
        n = sizes[name]
        for e in range(0, len(ks), n):
            chunk = ks[e:e + n]
            assert len(set(chunk)) == len(chunk), f"{name}: a sample repeats within epoch {e // n}"
            if len(chunk) == n:
                assert len(set(chunk)) == n


# ------------------------------------------------------------------------------ shares (planning only)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Index-only sources (no tars) of different sizes and utterance lengths: mean tokens per
    sample differ ~3x, so a blend by samples would miss the token weights by far."""
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for name, n, median, seed in (("a", 3000, 2.5, 1), ("b", 8000, 8.0, 2), ("c", 1200, 4.0, 3)):
        sim.write_synthetic(str(root / name), n, 10, seed=seed, median_s=median, name=name)
        out[name] = str(root / name)
    return out


def synthetic_loader(synthetic: dict[str, str], weights: dict[str, float], **kw) -> PackedLoader:
    args = dict(layout=BIG_LAYOUT, tokenizer=ByteTokenizer(), seq_len=2048, micro_batch_size=1, global_batch_size=4,
                pack_window=256, num_workers=1, prefetch=0, seed=3)
    args.update(kw)
    return PackedLoader(sources=[SourceSpec([synthetic[n]], w, n) for n, w in weights.items()], **args)


def drive(ld: PackedLoader, stream: PackStream, n_windows: int, tally: np.ndarray, seen: dict) -> None:
    """Plan ``n_windows`` windows; add each source's packed tokens to ``tally`` and record every
    (source, its epoch, sample) in ``seen``."""
    src = ld._src
    for _ in range(n_windows):
        plan = stream.current_plan()
        for p in plan.packs:
            for s, k, n in zip(p.shards, p.indices, p.lengths):
                i = int(src.shard_source[s])
                tally[i] += n
                key = (i, plan.start[i].epoch, s, k)
                assert key not in seen, f"source {ld.sources[i]}: sample repeated within its epoch"
                seen[key] = True
        stream.position = type(stream.position)(plan.end, 0)


def test_token_shares_track_the_weights_also_across_a_weight_change(synthetic: dict[str, str]) -> None:
    w1, w2 = {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.1, "b": 0.6, "c": 0.3}
    with synthetic_loader(synthetic, w1) as ld:
        stream, tally, seen = ld._new_gen().stream, np.zeros(3), {}
        drive(ld, stream, 400, tally, seen)  # ~100k samples: each source through several epochs
        share = tally / tally.sum()
        np.testing.assert_allclose(share, list(w1.values()), rtol=0.01)
        epochs = {ld.sources[i]: st.epoch for i, st in enumerate(stream.position.streams)}
        assert min(epochs.values()) >= 1 and len(set(epochs.values())) == 3  # each source cycles on its own
        # per source and epoch: every completed epoch holds each of its samples exactly once
        per = collections.Counter((i, e) for i, e, _, _ in seen)
        for i, name in enumerate(ld.sources):
            lengths = np.concatenate([ld._info.shard_lengths(int(s)) for s in ld._src.streams[i].shards])
            fits = int(((lengths > 0) & (lengths <= 2048)).sum())  # the too-long ones are skipped
            assert fits < len(lengths) or name != "b"
            for e in range(epochs[name]):
                assert per[(i, e)] == fits
        ld._position = stream.position  # as if consumed up to here
        state = ld.state_dict()
    with synthetic_loader(synthetic, w2) as ld:
        ld.load_state_dict(state)  # a new stage: sources continue where they were
        stream, tally2 = ld._new_gen().stream, np.zeros(3)
        assert [(s.epoch, s.pos) for s in stream.position.streams] == [(s["epoch"], s["pos"]) for s in state["streams"]]
        drive(ld, stream, 300, tally2, seen)  # (seen: still no repeat within any source's epoch)
        np.testing.assert_allclose(tally2 / tally2.sum(), list(w2.values()), rtol=0.01)


def test_blend_is_by_tokens_not_samples(synthetic: dict[str, str]) -> None:
    with synthetic_loader(synthetic, {"a": 1.0, "b": 1.0}) as ld:
        stream, tally = ld._new_gen().stream, np.zeros(2)
        n_docs = np.zeros(2)
        for _ in range(100):
            plan = stream.current_plan()
            for p in plan.packs:
                for s, n in zip(p.shards, p.lengths):
                    tally[int(ld._src.shard_source[s])] += n
                    n_docs[int(ld._src.shard_source[s])] += 1
            stream.position = type(stream.position)(plan.end, 0)
    np.testing.assert_allclose(tally / tally.sum(), [0.5, 0.5], rtol=0.01)
    assert n_docs[0] > 2.5 * n_docs[1]  # a's utterances are ~3x shorter


# ------------------------------------------------------------------------------ real data: exact resume


def test_exact_resume_and_independence_of_dp_size_and_workers(real: dict[str, str]) -> None:
    w = {"short": 0.5, "long": 0.3, "mid": 0.2}
    with loader(specs(real, w), num_workers=1) as ref:
        expected = [ref.next_step() for _ in range(14)]
    sizes = {"short": 90, "long": 40, "mid": 25}
    keys = keys_by_source(expected)
    assert set(keys) == set(w) and all(len(v) > sizes[k] for k, v in keys.items() if k != "long")
    assert_epochs_without_repeats(keys, sizes)
    for b in (b for step in expected for b in step):  # token sources follow the names
        for r, row in enumerate(b.sample_keys):
            ids = b.source[r][b.document_ids[r] >= 0].unique().tolist()
            assert sorted(ref.sources[i] for i in ids) == sorted({k.split(":")[1].split("/")[0] for k in row})
    with loader(specs(real, w), dp_rank=0, dp_size=2) as r0, loader(specs(real, w), dp_rank=1, dp_size=2,
                                                                       num_workers=3) as r1:
        got = [[*a, *b] for a, b in ((r0.next_step(), r1.next_step()) for _ in range(5))]
        state = json.loads(json.dumps(r1.state_dict()))
    with loader(specs(real, w), dp_rank=0, dp_size=4, micro_batch_size=1, num_workers=4) as a, \
            loader(specs(real, w), dp_rank=1, dp_size=4, micro_batch_size=1) as b, \
            loader(specs(real, w), dp_rank=2, dp_size=4, micro_batch_size=1) as c, \
            loader(specs(real, w), dp_rank=3, dp_size=4, micro_batch_size=1) as d:
        for ld in (a, b, c, d):
            ld.load_state_dict(state)
        got += [[*x.next_step(), *y.next_step(), *z.next_step(), *v.next_step()] for _ in range(9)
                for x, y, z, v in [(a, b, c, d)]]
    assert rows(got) == rows(expected)


def test_resume_with_new_weights_continues_every_source(real: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    w1, w2 = {"short": 0.5, "long": 0.3, "mid": 0.2}, {"short": 0.2, "long": 0.2, "mid": 0.6}
    with loader(specs(real, w1)) as first:
        before = [first.next_step() for _ in range(3)]  # mid-window: 24 packs of a ~40-pack window
        state = json.loads(json.dumps(first.state_dict()))
    assert state["position"]["offset"] > 0
    caplog.set_level(logging.WARNING, logger="data_pipeline.loader")
    with loader(specs(real, w2)) as second:
        assert second.resume_differences(state) == []
        second.load_state_dict(state)
        after = [second.next_step() for _ in range(4)]
        mid = json.loads(json.dumps(second.state_dict()))
        after += [second.next_step() for _ in range(8)]
    assert "a new stage: weights short 0.5 -> 0.2, long 0.3 -> 0.2, mid 0.2 -> 0.6" in caplog.text
    # no source loses or repeats a sample of its epoch across the change
    assert_epochs_without_repeats(keys_by_source(before + after), {"short": 90, "long": 40, "mid": 25})
    # the window in progress finished under the old weights, then the new ones apply
    assert mid["streams"][0]["weight"] == 0.2 and state["streams"][0]["weight"] == 0.5
    # resuming inside the new stage is exact again
    with loader(specs(real, w2), num_workers=3) as third:
        third.load_state_dict(mid)
        assert rows([third.next_step() for _ in range(8)]) == rows(after[4:])


def test_what_a_resume_refuses_and_what_it_allows(real: dict[str, str], tmp_path: Path) -> None:
    w = {"short": 0.5, "long": 0.5}
    with loader(specs(real, w)) as ld:
        ld.next_step()
        state = ld.state_dict()
    with loader(specs(real, {"short": 1.0})) as ld:
        assert ld.resume_differences(state) == ["data.sources: source 'long' was removed (checkpoint "
                                                f"{state['streams'][1]['fingerprint']!r}, now absent)"]
        with pytest.raises(DataConfigError, match="source 'long' was removed"):
            ld.load_state_dict(state)
    other = [SourceSpec([real["short"]], 0.5, "short"), SourceSpec([real["mid"]], 0.5, "long")]
    with loader(other) as ld:
        assert "the datasets of source 'long'" in ld.resume_differences(state)[0]
    with loader(specs(real, {**w, "mid": 0.2})) as ld:  # an added source starts at its beginning
        assert ld.resume_differences(state) == []
        ld.load_state_dict(state)
        assert ld.state_dict()["streams"][2]["pos"] == 0
    with PackedLoader([real["short"]], layout=LAYOUT, tokenizer=ByteTokenizer(), seq_len=512, micro_batch_size=2,
                      global_batch_size=8, pack_window=48, seed=11) as ld:
        assert "the form of the data" in ld.resume_differences(state)[0]
    with loader(specs(real, w), seq_len=384) as ld:
        assert ld.resume_differences(state) == ["data.seq_len: checkpoint 512, now 384"]


def test_a_version_1_state_resumes_with_the_plan_it_was_made_with(real: dict[str, str]) -> None:
    """Loader state version 1 (one stream, minimal bin slack, bins shuffled with (seed, epoch, tag,
    window)) continues exactly where that plan was."""
    kw = dict(layout=LAYOUT, tokenizer=ByteTokenizer(), seq_len=512, micro_batch_size=2, global_batch_size=8,
              pack_window=32, seed=11, prefetch=0, num_workers=1)
    with PackedLoader([real["short"]], **kw) as ld:
        fp = ld.state_dict()["dataset"]
        sizes, lengths = ld._src.streams[0].order.shard_sizes, ld._info
    v1 = {"version": 1, "seed": 11, "seq_len": 512, "pack_window": 32, "layout": "llasa", "tokenizer": "byte-v1",
          "dataset": fp, "position": {"epoch": 1, "window": 1, "offset": 1}, "consumed_packs": 160,
          "consumed_docs": 500, "consumed_tokens": 70000, "global_batch_size": 8, "dp_size": 1}
    # version 1's plan of epoch 1, window 1, recomputed from its primitives
    order = GlobalOrder(sizes, 11)
    sh, ix = order.slice(1, 32, 64)
    n = lengths.lengths(sh, ix)
    bins = minimal_bin_slack(n.tolist(), 512)
    perm = _rng(11, 1, _TAG_BINS, 1).permutation(len(bins))
    urls = sorted(str(p) for p in Path(real["short"]).glob("*.tar"))
    key = {(s, k): f"{Path(u).name}:{e.key}" for s, u in enumerate(urls) for k, e in enumerate(load_shard_index(u).samples)}
    want = [[key[(int(sh[m]), int(ix[m]))] for m in sorted(bins[b])] for b in perm][1:]
    assert 3 <= len(want) < 8  # the rest of the window, then the next one
    with PackedLoader([real["short"]], **kw) as ld:
        assert ld.resume_differences(v1) == []
        ld.load_state_dict(v1)
        assert ld.state_dict()["packer"] == "mbs64"
        got = [row for b in ld.next_step() for row in b.sample_keys]
    assert got[: len(want)] == want


def test_duration_order_is_a_curriculum_within_each_window(synthetic: dict[str, str]) -> None:
    with synthetic_loader(synthetic, {"a": 1, "b": 1}) as shuffled, \
            synthetic_loader(synthetic, {"a": 1, "b": 1}, sample_order="duration") as curriculum:
        for ld in (shuffled, curriculum):
            ld.plan0 = ld._new_gen().stream.current_plan()
    mean = [float(np.mean(p.seconds)) for p in curriculum.plan0.packs]
    assert mean == sorted(mean) and mean[0] < mean[-1] / 2
    assert sorted(curriculum.plan0.packs, key=lambda p: p.indices) == sorted(shuffled.plan0.packs, key=lambda p: p.indices)
    assert [float(np.mean(p.seconds)) for p in shuffled.plan0.packs] != mean


def test_bad_sources_are_config_errors(real: dict[str, str]) -> None:
    with pytest.raises(DataConfigError, match="two sources named 'x'"):
        loader([SourceSpec([real["short"]], 1, "x"), SourceSpec([real["mid"]], 1, "x")])
    with pytest.raises(DataConfigError, match="every weight is 0"):
        loader([SourceSpec([real["short"]], 0, "x")])
    with pytest.raises(DataConfigError, match="exactly one"):
        PackedLoader([real["short"]], sources=specs(real, {"mid": 1}), layout=LAYOUT, tokenizer=ByteTokenizer(),
                     seq_len=512, micro_batch_size=1, global_batch_size=1)


def test_config_sources_and_sample_order(real: dict[str, str]) -> None:
    from megatron_tts.config import ConfigError, load_config

    cfg = load_config("configs/tiny.yaml", ["data.paths=null", "data.sample_order=duration",
                                             f"data.sources=[{{paths: [{real['short']}], weight: 0.7, name: s}}, "
                                             f"{{paths: [{real['mid']}], weight: 0.3}}]"])
    assert [(s.paths, s.weight, s.name) for s in cfg.data.sources] == [([real["short"]], 0.7, "s"),
                                                                      ([real["mid"]], 0.3, None)]
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["data.sample_order=random", "data.sources=[{paths: [], weight: -1, name: x},"
                                          " {paths: [a], name: x}]"])
    msg = str(e.value)
    for needle in ("data.paths and data.sources: give exactly one", "add data.paths=null",
                   "data.sample_order: 'random' unknown", "data.sources[0].paths: empty",
                   "data.sources[0].weight=-1.0: must be >= 0", "names ['x'] repeat"):
        assert needle in msg, needle


def test_a_paused_source_is_not_drawn_and_does_not_hold_the_epoch(synthetic: dict[str, str]) -> None:
    with synthetic_loader(synthetic, {"a": 1.0, "c": 0.0}) as ld:
        stream, tally = ld._new_gen().stream, np.zeros(2)
        drive(ld, stream, 40, tally, {})  # ~10k samples: a (3,000) goes round three times
        assert tally[1] == 0 and stream.position.streams[1] == StreamState()
        assert ld._planner.epoch_of(stream.position.streams) == stream.position.streams[0].epoch >= 3
