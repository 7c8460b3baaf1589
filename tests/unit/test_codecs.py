"""Codecs behind one interface: real architectures (snac, transformers' EnCodec and DAC, the demo's
mel k-means) with random weights, saved to a local dir and loaded back through load_codec (the code
path real weights take). Shapes, frame counts and rates, decode lengths, identity, failures."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipeline.audio.resample import resample
from data_pipeline.codecs import CodecError, load_codec
from data_pipeline.shard_format import CODEC_IDENTITY_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CODEBOOK = os.path.join(REPO, "data", "demo", "codebook.npy")

# Small channel counts, the published models' strides and rates.
SNAC_SMALL = {"sampling_rate": 24000, "encoder_dim": 8, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 32,
              "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
              "vq_strides": [4, 2, 1], "noise": True, "depthwise": True}
ENCODEC_SMALL = {"hidden_size": 32, "num_filters": 4, "codebook_dim": 32}  # 24 kHz, 75 Hz, 1024 codes
DAC_SMALL = {"encoder_hidden_size": 4, "decoder_hidden_size": 16, "hidden_size": 32, "n_codebooks": 4,
             "downsampling_ratios": [2, 4, 5, 8], "upsampling_ratios": [8, 5, 4, 2], "sampling_rate": 24000}
EXPECTED = {  # name: (sample rate, stored frame rate, n_q, codebook size, level rates)
    "mel-kmeans": (22050, 50.0, 1, 256, (50.0,)),
    "snac": (24000, 24000 / 2048, 7, 4096, (24000 / 2048, 24000 / 1024, 24000 / 512)),
    "encodec": (24000, 75.0, 8, 1024, (75.0,) * 8),
    "dac": (24000, 75.0, 4, 1024, (75.0,) * 4),
}


@pytest.fixture(scope="module")
def codec_dirs(tmp_path_factory):
    from data_pipeline.codecs.dac import save_random_dac
    from data_pipeline.codecs.encodec import save_random_encodec
    from data_pipeline.codecs.snac import save_random_snac

    root = tmp_path_factory.mktemp("codecs")
    return {"mel-kmeans": DEMO_CODEBOOK,
            "snac": save_random_snac(str(root / "snac"), SNAC_SMALL),
            "encodec": save_random_encodec(str(root / "encodec"), **ENCODEC_SMALL),
            "dac": save_random_dac(str(root / "dac"), **DAC_SMALL)}


def _speechlike(sr: int, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.3 * env * np.sin(2 * np.pi * (150 + 50 * rng.random()) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_encode_decode_shapes_frames_and_rates(name, codec_dirs):
    codec = load_codec(name, codec_dirs[name], device="cpu")
    sr, rate, n_q, cbs, levels = EXPECTED[name]
    assert (codec.sample_rate, codec.n_q, codec.codebook_size) == (sr, n_q, cbs)
    assert codec.frame_rate == pytest.approx(rate) and codec.level_rates == pytest.approx(levels)
    waves = [_speechlike(sr, 1.0, 0), _speechlike(sr, 2.37, 1)]
    codes = codec.encode(waves)
    for w, c in zip(waves, codes):
        assert c.shape == (n_q, codec.n_frames(len(w)))
        assert c.min() >= 0 and c.max() < cbs
        # frames per second of audio match the declared rate (within one frame of padding)
        assert abs(c.shape[1] - len(w) / sr * rate) <= 1.0
        audio = codec.decode(c)
        assert audio.dtype == np.float32 and audio.shape == (c.shape[1] * codec.samples_per_frame,)
        assert np.isfinite(audio).all()
    assert codec.samples_per_frame == pytest.approx(sr / rate)
    # batching never changes an item's codes (zero padding to the batch's longest is cut away)
    np.testing.assert_array_equal(codec.encode([waves[1]])[0], codes[1])
    info = codec.codec_info()
    assert set(CODEC_IDENTITY_KEYS) <= set(info) and len(info["checkpoint_sha256"]) == 64
    json.dumps(info)  # goes into every shard


def test_codes_are_not_degenerate(codec_dirs):
    """Random codebooks (not EnCodec's all-zero init): different audio, different codes."""
    for name in ("snac", "encodec", "dac"):
        codec = load_codec(name, codec_dirs[name])
        a, b = codec.encode([_speechlike(24000, 1.0, 3), _speechlike(24000, 1.0, 4) * 3])
        assert len(np.unique(a)) > 1, name
        if name != "encodec":  # (a tiny random EnCodec maps both clips to the same constant books)
            assert not np.array_equal(a, b), name


def test_weights_hash_identifies_the_weights(codec_dirs, tmp_path):
    from data_pipeline.codecs.snac import save_random_snac

    a = load_codec("snac", codec_dirs["snac"]).codec_info()
    other = load_codec("snac", save_random_snac(str(tmp_path / "s2"), SNAC_SMALL, seed=1)).codec_info()
    same = load_codec("snac", save_random_snac(str(tmp_path / "s3"), SNAC_SMALL, seed=0)).codec_info()
    assert a["checkpoint_sha256"] != other["checkpoint_sha256"]
    assert a["checkpoint_sha256"] == same["checkpoint_sha256"]
    assert a["version"].startswith("snac==")


def test_mel_kmeans_info_is_the_demo_datas(codec_dirs):
    codec = load_codec("mel-kmeans", os.path.dirname(DEMO_CODEBOOK))  # a dir holding codebook.npy works too
    with open(os.path.join(REPO, "data", "demo", "index.json")) as f:
        assert codec.codec_info() == json.load(f)["codec"]


def test_encodec_bandwidth_picks_books(codec_dirs):
    assert load_codec("encodec", codec_dirs["encodec"], bandwidth=1.5).n_q == 2
    with pytest.raises(CodecError, match="bandwidth"):
        load_codec("encodec", codec_dirs["encodec"], bandwidth=5.0)


def test_load_failures_are_one_line_codec_errors(tmp_path, codec_dirs):
    with pytest.raises(CodecError, match="unknown codec"):
        load_codec("wavtokenizer", str(tmp_path))
    with pytest.raises(CodecError, match="not a local directory"):
        load_codec("snac", "hubertsiuzdak/snac_24khz")  # a hub id is never fetched
    with pytest.raises(CodecError, match="lacks"):
        load_codec("snac", str(tmp_path))
    with pytest.raises(CodecError, match="config.json or model weights"):
        load_codec("dac", str(tmp_path))
    with pytest.raises(CodecError, match="mel-kmeans"):
        load_codec("mel-kmeans", str(tmp_path / "none.npy"))
    with pytest.raises(CodecError, match="unexpected keyword|got an unexpected"):
        load_codec("snac", codec_dirs["snac"], bandwidth=6)
    with pytest.raises(CodecError, match="bf16"):
        load_codec("mel-kmeans", DEMO_CODEBOOK, precision="bf16")


def test_cuda_without_cuda_fails_clearly(codec_dirs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(CodecError, match="CUDA is not available"):
        load_codec("snac", codec_dirs["snac"], device="cuda")
    from data_pipeline.tokenize.worker import auto_batch_seconds

    with pytest.raises(CodecError, match="needs device=cuda"):
        auto_batch_seconds(load_codec("snac", codec_dirs["snac"]), 30.0)


def test_xcodec2_fails_clearly_where_it_does_not_install(tmp_path):
    try:
        from xcodec2 import modeling_xcodec2  # noqa: F401
    except Exception:
        (tmp_path / "w2v-bert-2.0").mkdir()
        with pytest.raises(CodecError, match="xcodec2.*not importable.*--no-deps xcodec2==0.1.5"):
            load_codec("xcodec2", str(tmp_path))
        return
    pytest.skip("xcodec2 imports here: its load path needs the w2v-bert-2.0 semantic model in a local dir")


def test_resample_keeps_frequency_and_length():
    sr, new = 22050, 16000
    t = np.arange(sr) / sr
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    y = resample(x, sr, new)
    assert y.shape == (int(np.ceil(sr * new / sr)),) and y.dtype == np.float32
    spec = np.abs(np.fft.rfft(y[1000:-1000] * np.hanning(len(y) - 2000)))
    peak_hz = np.argmax(spec) * new / (len(y) - 2000)
    assert abs(peak_hz - 440) < 3
    assert abs(np.abs(y[1000:-1000]).max() - 1.0) < 0.02
    # content above the new Nyquist is removed, not aliased
    hi = np.sin(2 * np.pi * 10000 * t).astype(np.float32)
    assert np.abs(resample(hi, sr, new)[1000:-1000]).max() < 0.05
