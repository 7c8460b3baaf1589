"""The tokenizer on small generated corpora (tone audio written with soundfile, the demo's mel
k-means codec): every reader layout, stable keys, bad audio skipped and counted, filters, text
normalisation, silence splits, resume by work unit, worker identity."""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.audio import FilterConfig, normalize_text, split_at_silences
from data_pipeline.audio.decode import make_decoder
from data_pipeline.shards import DatasetIndex, read_shard
from data_pipeline.tokenize.cli import main as tokenize
from data_pipeline.tokenize.plan import worker_identity
from data_pipeline.tokenize.readers import open_source

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODEBOOK = os.path.join(REPO, "data", "demo", "codebook.npy")
SR = 22050


def tone(seconds: float, f: float = 220.0, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * f * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def encoded(x: np.ndarray, fmt: str = "WAV", sr: int = SR, **kw) -> bytes:
    b = io.BytesIO()
    sf.write(b, x, sr, format=fmt, **kw)
    return b.getvalue()


def run(inputs, out, *settings) -> int:
    return tokenize(["--codec", "mel-kmeans", "--codec-path", CODEBOOK, "--input", *map(str, inputs),
                     "--out", str(out), "progress=false", "rank=0", "world_size=1", *settings])


def samples(out) -> dict:
    ds = DatasetIndex.load(str(out))
    return {s.key: s for url in ds.shard_urls() for s in read_shard(url)}


def report(out) -> dict:
    with open(os.path.join(out, "tokenize_report.json")) as f:
        return json.load(f)


@pytest.fixture
def fish(tmp_path):
    root = tmp_path / "fishcorpus"
    for spk, n in (("alice", 3), ("bob", 2)):
        (root / spk).mkdir(parents=True)
        for i in range(n):
            (root / spk / f"u{i}.wav").write_bytes(encoded(tone(1.0 + 0.3 * i, 200 + 40 * i)))
            (root / spk / f"u{i}.lab").write_text(f"Hello   {spk}\n number {i}\u00a0!")
    return root


def test_fish_layout_end_to_end(fish, tmp_path):
    out = tmp_path / "out"
    assert run([fish], out, "shard_size=2") == 0
    got = samples(out)
    assert sorted(got) == ["fishcorpus/alice/u0", "fishcorpus/alice/u1", "fishcorpus/alice/u2",
                           "fishcorpus/bob/u0", "fishcorpus/bob/u1"]
    s = got["fishcorpus/bob/u1"]
    assert s.text == "Hello bob number 1 !"  # NFKC + whitespace
    assert s.meta["speaker"] == "bob" and s.meta["dataset"] == "fishcorpus" and s.meta["decoder"]
    assert s.codes.shape == (1, 65) and s.meta["duration_s"] == pytest.approx(1.3)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    r = report(out)
    assert (r["samples"], r["items"], r["speakers"], r["skipped_total"]) == (5, 5, 2, 0)
    assert r["tokens"] == sum(x.codes.size for x in got.values())
    assert DatasetIndex.load(str(out)).codec["name"] == "mel-kmeans"


def test_libritts_layout_and_keys_are_stable(tmp_path):
    root = tmp_path / "LibriTTS"
    d = root / "84" / "121123"
    d.mkdir(parents=True)
    for i in range(3):
        stem = f"84_121123_00000{i}_000000"
        (d / f"{stem}.wav").write_bytes(encoded(tone(0.8, 300 + 20 * i, sr=24000), sr=24000))
        (d / f"{stem}.normalized.txt").write_text(f"Chapter text {i}.")
        (d / f"{stem}.original.txt").write_text("IGNORED")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([root], a, "shard_size=1") == 0
    assert run([root], b, "shard_size=3") == 0  # other shard sizes, same keys and codes
    sa, sb = samples(a), samples(b)
    assert sorted(sa) == sorted(sb) == [f"LibriTTS/84/121123/84_121123_00000{i}_000000" for i in range(3)]
    for k in sa:
        np.testing.assert_array_equal(sa[k].codes, sb[k].codes)
        assert sa[k].meta["speaker"] == "84" and sa[k].meta["source_sample_rate"] == 24000
    assert sa["LibriTTS/84/121123/84_121123_000001_000000"].text == "Chapter text 1."


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_manifests(tmp_path, fmt):
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = []
    for i in range(3):
        (audio / f"clip{i}.flac").write_bytes(encoded(tone(0.7, 250 + 30 * i), "FLAC"))
        rows.append({"path": f"audio/clip{i}.flac", "text": f"line {i}", "speaker": f"s{i % 2}",
                     "language": "de", "duration": 0.7, "source": "radio", "license": "cc-by"})
    man = tmp_path / f"corpus.{fmt}"
    if fmt == "jsonl":
        man.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        with open(man, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    out = tmp_path / "out"
    assert run([man], out) == 0
    got = samples(out)
    assert sorted(got) == ["corpus/audio/clip0", "corpus/audio/clip1", "corpus/audio/clip2"]
    m = got["corpus/audio/clip1"].meta
    assert (m["speaker"], m["language"], m["source"], m["license"]) == ("s1", "de", "radio", "cc-by")
    assert m["manifest_duration_s"] == pytest.approx(0.7)


def _wds_tar(path, entries):
    with tarfile.open(path, "w") as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_webdataset_tars_are_units(tmp_path):
    tars = tmp_path / "emilia"
    tars.mkdir()
    for t in range(2):
        entries = []
        for i in range(3):
            key = f"EN_B{t:05d}_S{i:05d}"
            entries.append((f"{key}.mp3", encoded(tone(1.0, 200 + 50 * i), "MP3")))
            entries.append((f"{key}.json", json.dumps({"text": f"tar {t} utt {i}", "speaker": f"EN_B{t:05d}",
                                                        "language": "en", "duration": 1.0}).encode()))
        _wds_tar(tars / f"EN-B{t:06d}.tar", entries)
    # a txt transcript wins over the json's
    _wds_tar(tars / "zz.tar", [("k1.flac", encoded(tone(0.9), "FLAC")), ("k1.txt", b"from txt"),
                               ("k1.json", b'{"text": "from json"}')])
    out = tmp_path / "out"
    assert run([tars], out) == 0
    got = samples(out)
    assert len(got) == 7 and got["emilia/zz/k1"].text == "from txt"
    assert got["emilia/EN-B000001/EN_B00001_S00002"].text == "tar 1 utt 2"
    assert got["emilia/EN-B000001/EN_B00001_S00002"].meta["speaker"] == "EN_B00001"
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert open_source(str(tars)).kind == "tars"


def test_bad_audio_is_skipped_counted_and_the_rest_intact(tmp_path):
    root = tmp_path / "bad"
    (root / "spk").mkdir(parents=True)
    good = encoded(tone(1.2), "FLAC")
    mp3 = bytearray(encoded(tone(3.0), "MP3"))
    mp3[len(mp3) // 2: len(mp3) // 2 + 400] = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
    files = {"a_good.flac": good, "b_truncated.flac": good[: len(good) // 2], "c_zero.wav": b"",
             "d_text.wav": b"this is a text file, not audio\n" * 20, "e_corrupt.mp3": bytes(mp3),
             "f_good.wav": encoded(tone(0.9, 330)), "g_short.wav": encoded(tone(0.1)),
             "h_notext.wav": encoded(tone(1.0)), "i_clipped.wav": encoded(np.clip(tone(1.0, amp=3.0), -1, 1)),
             "j_8khz_ok.wav": encoded(tone(1.0, sr=8000), sr=8000), "k_4khz.wav": encoded(tone(1.0, sr=4000), sr=4000),
             "l_long.wav": encoded(tone(5.0)), "m_silent.wav": encoded(np.zeros(SR, np.float32))}
    for name, data in files.items():
        (root / "spk" / name).write_bytes(data)
        if name != "h_notext.wav":
            (root / "spk" / (name.rsplit(".", 1)[0] + ".lab")).write_text("" if name == "f_good.wav" else "words")
    (root / "spk" / "f_good.lab").write_text("   ")  # empty after normalisation
    out = tmp_path / "out"
    assert run([root], out, "max_duration=4") == 0
    got = samples(out)
    assert sorted(got) == ["bad/spk/a_good", "bad/spk/j_8khz_ok"]
    r = report(out)
    assert r["skipped"] == {"empty_file": 1, "not_audio": 1, "decode_error": 1, "incomplete": 1, "silent": 1,
                            "bad_sample_rate": 1, "clipping": 1, "too_short": 1, "too_long": 1,
                            "no_transcript": 1, "empty_transcript": 1}
    with open(out / "shard-000000.report.json") as f:
        per_shard = json.load(f)
    assert per_shard["skipped_examples"]["incomplete"][0].endswith("e_corrupt.mp3")
    assert per_shard["upsampled"] == 1  # the 8 kHz file


def test_split_long_at_silences(tmp_path):
    sr = SR
    parts = []
    for i in range(4):  # 4 x (2.5 s of tone + 0.4 s of silence) = 11.6 s
        parts += [tone(2.5, 200 + 60 * i), np.zeros(int(0.4 * sr), np.float32)]
    x = np.concatenate(parts)
    cuts = split_at_silences(x, sr, max_s=6.0, min_s=1.0)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(x)
    assert all(b - a <= 6.0 * sr for a, b in cuts)
    for a, _ in cuts[1:]:  # every cut lies in a silence
        assert np.abs(x[a - 200:a + 200]).max() == 0.0
    root = tmp_path / "long" / "spk"
    root.mkdir(parents=True)
    (root / "talk.wav").write_bytes(encoded(x))
    (root / "talk.lab").write_text("a long talk")
    out = tmp_path / "out"
    assert run([root.parent], out, "max_duration=6", "split_long=true") == 0
    got = samples(out)
    assert sorted(got) == [f"long/spk/talk/seg00{i}" for i in range(len(cuts))]
    seg = got["long/spk/talk/seg001"]
    assert seg.text == "" and seg.meta["source_text"] == "a long talk" and seg.meta["n_segments"] == len(cuts)
    assert report(out)["segments_split"] == 1


def test_rerun_does_only_missing_units_and_never_twice(fish, tmp_path):
    out = tmp_path / "out"
    # worker 1 of 2 first (as an array task would), then a single worker for everything
    assert tokenize(["--codec", "mel-kmeans", "--codec-path", CODEBOOK, "--input", str(fish), "--out", str(out),
                     "progress=false", "shard_size=1", "rank=1", "world_size=2"]) == 0
    assert not (out / "index.json").exists()  # units 0, 2, 4 are still to do
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert sorted(first) == ["shard-000001.tar", "shard-000003.tar"]
    (out / ".shard-000000.tar.abc.tmp").write_bytes(b"partial")  # a killed writer's leftover
    assert run([fish], out, "shard_size=1") == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[13].tar")} == first  # not redone
    assert not list(out.glob(".*.tmp"))
    assert len(samples(out)) == 5 and DatasetIndex.load(str(out)).n_samples == 5
    assert run([fish], out, "shard_size=1") == 0  # a finished run: nothing to do, same dataset
    assert DatasetIndex.load(str(out)).n_samples == 5
    # other settings into the same output are refused (units would mean other items)
    assert run([fish], out, "shard_size=2") == 3


def test_bad_settings_and_inputs_exit_3(tmp_path, capsys, fish):
    assert run([fish], tmp_path / "o", "bogus=1") == 3
    assert "unknown setting 'bogus'" in capsys.readouterr().err
    assert run([tmp_path / "missing"], tmp_path / "o") == 3
    assert run([fish], tmp_path / "o", "min_duration=5", "max_duration=2") == 3
    assert tokenize(["--codec", "snac", "--codec-path", str(tmp_path), "--input", str(fish),
                     "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err  # one line per run


def test_text_normalisation():
    assert normalize_text(" Ｈｅｌｌｏ,\tworld\u00a0\n ﬁne \x07") == "Hello, world fine"
    from data_pipeline.audio import load_normalizer

    assert load_normalizer("string:capwords")("  a  b ") == "A B"
    with pytest.raises(ValueError, match="package.module:function"):
        load_normalizer("nocolon")


def test_decoders_agree_on_lossless_audio():
    x = tone(1.0)
    data = [encoded(x), encoded(x, "FLAC")]
    sfd, desc = make_decoder("soundfile", 16000)
    assert desc.startswith("soundfile")
    a = sfd.decode(data)
    assert a[0].samples.shape == (16000,) and np.allclose(a[0].samples, a[1].samples, atol=1e-4)
    try:
        dali, desc = make_decoder("dali", 16000)
    except ValueError as e:
        pytest.skip(f"DALI not importable here: {e}")
    b = dali.decode(data + [b"", encoded(x, "MP3")])
    assert desc.startswith("dali")
    assert b[0].decoder == "dali" and b[3].decoder == "soundfile"  # mp3: DALI has no decoder for it
    assert b[2].reason == "empty_file"
    assert abs(len(b[0].samples) - 16000) <= 1
    n = min(len(b[0].samples), 16000)
    assert np.abs(b[0].samples[100:n - 100] - a[0].samples[100:n - 100]).max() < 0.02  # two resamplers


def test_worker_identity_from_the_environment():
    assert worker_identity(env={}) == (0, 1, 0, "single process")
    assert worker_identity(env={"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"})[:3] == (3, 8, 3)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
             "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert worker_identity(env=slurm) == (3, 6, 1, "slurm array")
    assert worker_identity(2, 4, env={})[:2] == (2, 4)
    with pytest.raises(ValueError):
        worker_identity(4, 4, env={})


def test_filter_defaults_are_documented():
    # every filter setting is a key=value setting of the CLI
    from data_pipeline.tokenize.cli import parse_settings

    settings, _ = parse_settings([f"{k}={v}" for k, v in vars(FilterConfig()).items()])
    assert settings["max_duration"] == 30.0 and settings["split_long"] is False


def test_data_codec_config_is_validated_and_compared():
    from megatron_tts.config.load import ConfigError, load_config
    from megatron_tts.train.build import DataConfigError, check_dataset_codec

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["data.codec.name=mel-kmeans", "data.codec.frame_rate=50"])
    assert cfg.data.codec == {"name": "mel-kmeans", "frame_rate": 50}
    with pytest.raises(ConfigError, match="data.codec.bogus: unknown"):
        load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["data.codec.bogus=1"])
    demo = DatasetIndex.load(os.path.join(REPO, "data", "demo")).codec
    check_dataset_codec(cfg.data.codec, demo)  # 50 and 50.0 agree
    check_dataset_codec(None, demo)
    with pytest.raises(DataConfigError, match="checkpoint_sha256: data.codec has 'abc'"):
        check_dataset_codec({"name": "mel-kmeans", "checkpoint_sha256": "abc"}, demo)
