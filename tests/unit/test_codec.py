"""Unit tests for the built-in mel-kmeans codec (data_pipeline/codec.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from data_pipeline.codec import (
    FRAME_RATE,
    LogMel,
    MelKMeansCodec,
    MelParams,
    assign,
    hz_to_mel,
    kmeans,
    mel_filterbank,
    mel_to_hz,
    pcm16_to_float,
)

SR = 16000


def tone(freq: float, seconds: float = 1.0, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chirpy_speechlike(seconds: float, seed: int, sr: int = SR) -> np.ndarray:
    """Deterministic test signal with a changing spectrum (tones + noise bursts + silence)."""
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(int(seconds * 10)):
        n = sr // 10
        kind = rng.integers(3)
        if kind == 0:
            pieces.append(tone(float(rng.uniform(100, 4000)), 0.1, sr))
        elif kind == 1:
            pieces.append((0.1 * rng.standard_normal(n)).astype(np.float32))
        else:
            pieces.append(np.zeros(n, dtype=np.float32))
    return np.concatenate(pieces)


def test_htk_mel_scale_round_trip_and_reference_points() -> None:
    assert hz_to_mel(0.0) == pytest.approx(0.0)
    assert hz_to_mel(700.0) == pytest.approx(2595.0 * np.log10(2.0))
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.5)  # HTK scale: ~1000 mel at 1 kHz
    f = np.array([0.0, 55.0, 440.0, 3000.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-9)


def test_filterbank_shape_and_coverage() -> None:
    fb = mel_filterbank(SR, 1024, 64)
    assert fb.shape == (64, 513)
    assert fb.min() >= 0.0 and fb.max() <= 1.0 + 1e-12
    # Every band has at least one non-zero bin at this resolution, peaks are ordered.
    assert (fb.max(axis=1) > 0).all()
    peaks = fb.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_pure_tone_lands_in_the_right_mel_band(freq: float) -> None:
    params = MelParams(sample_rate=SR, n_fft=1024, n_mels=64)
    front = LogMel(params)
    feats = front(tone(freq))
    band = int(np.median(feats.argmax(axis=1)))
    # Expected band: the one whose centre frequency is nearest the tone on the mel scale.
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), 64 + 2))
    centres = edges[1:-1]
    expected = int(np.argmin(np.abs(hz_to_mel(centres) - hz_to_mel(freq))))
    assert abs(band - expected) <= 1, (freq, band, expected)


def test_mel_projection_matches_dense_matmul() -> None:
    front = LogMel(MelParams(sample_rate=SR, n_fft=1024, n_mels=64))
    power = front.power_spectrum(chirpy_speechlike(0.5, seed=3))
    np.testing.assert_allclose(front.mel(power), power @ front.filterbank.T, rtol=1e-10,
                               atol=1e-12)


def test_kmeans_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(loc=c, scale=0.3, size=(200, 4)) for c in range(5)])
    c1, s1 = kmeans(x, 8, seed=7, n_iter=10)
    c2, s2 = kmeans(x, 8, seed=7, n_iter=10)
    assert c1.tobytes() == c2.tobytes()
    assert s1 == s2
    c3, _ = kmeans(x, 8, seed=8, n_iter=10)
    assert c1.tobytes() != c3.tobytes()
    # Lloyd iterations never increase the objective.
    hist = s1["mse_history"]
    assert all(b <= a + 1e-9 for a, b in zip(hist, hist[1:]))


def test_kmeans_recovers_separated_clusters() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([rng.normal(c, 0.1, size=(100, 2)) for c in centres])
    cent, _ = kmeans(x, 3, seed=0, n_iter=20)
    found = cent[np.argsort(cent[:, 0] * 100 + cent[:, 1])]
    want = centres[np.argsort(centres[:, 0] * 100 + centres[:, 1])]
    np.testing.assert_allclose(found, want, atol=0.1)


def test_kmeans_rejects_too_few_points() -> None:
    with pytest.raises(ValueError, match="at least k=10"):
        kmeans(np.zeros((5, 3)), 10, seed=0)


def test_assign_matches_exact_nearest_and_breaks_ties_low() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 16))
    cb = rng.normal(size=(32, 16))
    labels, d = assign(x, cb)
    exact = ((x[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, exact.argmin(1))
    np.testing.assert_allclose(d, exact.min(1), rtol=1e-9, atol=1e-9)
    dup = np.stack([cb[0], cb[0], cb[1]])
    lab, _ = assign(cb[:1], dup)
    assert lab.tolist() == [0]


@pytest.fixture(scope="module")
def fitted() -> MelKMeansCodec:
    waves = [chirpy_speechlike(1.0, seed=s) for s in range(4)]
    return MelKMeansCodec(sample_rate=SR, codebook_size=16, n_mels=32, seed=0,
                          n_iter=10).fit(waves)


def test_encode_shape_dtype_and_50hz_frame_rate(fitted: MelKMeansCodec) -> None:
    assert fitted.hop_length == SR // FRAME_RATE == 320
    for seconds in (1.0, 2.5, 0.013):
        x = chirpy_speechlike(max(seconds, 0.1), seed=11)[: int(round(seconds * SR))]
        codes = fitted.encode(x)
        assert codes.dtype == np.uint16
        assert codes.ndim == 2 and codes.shape[0] == 1
        assert codes.shape[1] == -(-x.size // fitted.hop_length)
        assert int(codes.max()) < fitted.codebook_size
    assert fitted.encode(chirpy_speechlike(1.0, seed=5)).shape == (1, 50)
    assert fitted.encode(tone(440.0, 3.0)).shape == (1, 150)


def test_encode_rejects_bad_input(fitted: MelKMeansCodec) -> None:
    with pytest.raises(ValueError, match="mono"):
        fitted.encode(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="integer PCM"):
        fitted.encode(np.zeros(100, dtype=np.int16))
    with pytest.raises(RuntimeError, match="no codebook"):
        MelKMeansCodec(sample_rate=SR).encode(np.zeros(100, dtype=np.float32))


def test_decode_to_mel_is_codebook_lookup(fitted: MelKMeansCodec) -> None:
    x = chirpy_speechlike(1.0, seed=2)
    codes = fitted.encode(x)
    mel = fitted.decode_to_mel(codes)
    assert mel.shape == (codes.shape[1], 32) and mel.dtype == np.float32
    np.testing.assert_array_equal(mel, fitted.codebook[codes[0].astype(np.int64)])
    # The reconstruction is closer to the real features than the global mean is.
    feats = fitted.features(x)
    err = ((feats - mel) ** 2).mean()
    baseline = ((feats - feats.mean(0)) ** 2).mean()
    assert err < baseline


def test_save_load_round_trip(tmp_path, fitted: MelKMeansCodec) -> None:
    path = tmp_path / "cb" / "codebook.npy"
    fitted.save(path)
    assert (tmp_path / "cb" / "codebook.json").is_file()
    info = fitted.codec_info()
    assert info == {"name": "mel-kmeans", "version": "1", "sample_rate": SR, "frame_rate": 50,
                    "n_q": 1, "codebook_size": 16,
                    "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    loaded = MelKMeansCodec.load(path)
    assert loaded.codec_info() == info
    assert loaded.params == fitted.params
    np.testing.assert_array_equal(loaded.codebook, fitted.codebook)
    x = chirpy_speechlike(2.0, seed=9)
    np.testing.assert_array_equal(loaded.encode(x), fitted.encode(x))
    # Saving twice gives identical bytes (no timestamps or pickles).
    first = path.read_bytes()
    loaded.save(path)
    assert path.read_bytes() == first


def test_load_detects_tampered_codebook(tmp_path, fitted: MelKMeansCodec) -> None:
    path = tmp_path / "codebook.npy"
    fitted.save(path)
    other = fitted.codebook.copy()
    other[0, 0] += 1.0
    np.save(path, other)
    with pytest.raises(ValueError, match="does not match"):
        MelKMeansCodec.load(path)


def test_fit_is_deterministic() -> None:
    waves = [chirpy_speechlike(1.0, seed=s) for s in range(3)]
    a = MelKMeansCodec(sample_rate=SR, codebook_size=8, n_mels=24, seed=4, n_iter=5).fit(waves)
    b = MelKMeansCodec(sample_rate=SR, codebook_size=8, n_mels=24, seed=4, n_iter=5).fit(waves)
    assert a.checkpoint_sha256() == b.checkpoint_sha256()


def test_pcm16_to_float_range() -> None:
    pcm = np.array([-32768, 0, 32767], dtype="<i2").tobytes()
    x = pcm16_to_float(pcm)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-1.0, 0.0, 32767 / 32768])


def test_sample_rate_must_divide_frame_rate() -> None:
    with pytest.raises(ValueError, match="multiple of 50"):
        MelKMeansCodec(sample_rate=22051)
