"""Built-in "mel-kmeans" speech codec: log-mel frames at 50 Hz, vector-quantised by k-means.

This codec exists so the project can ship a demo dataset derived from real audio without
downloading a neural codec. It is deliberately simple and fully deterministic:

* Front end: mono float audio -> frames centred at ``t * hop`` (``hop = sample_rate / 50``,
  zero padding of ``n_fft // 2`` on both sides, so ``T = ceil(n_samples / hop)``), Hann
  window, ``|rfft|^2`` power spectrum, triangular mel filterbank on the **HTK** mel scale
  ``mel(f) = 2595 * log10(1 + f / 700)`` (filters peak at 1.0, no area normalisation),
  natural log with a floor of ``log_floor``.
* Quantiser: k-means (k-means++ init from a seeded ``np.random.Generator``, a fixed number of
  Lloyd iterations, float64 arithmetic) over the log-mel frames. The fitted codebook is stored
  as float32 and all encoding uses exactly that stored codebook, so a saved-and-reloaded codec
  produces the same codes as the one that was just fitted.

Reproducibility notes (why the code looks the way it does):

* The mel projection is done band by band with elementwise operations in a fixed order rather
  than a BLAS matmul, because OpenBLAS picks CPU-specific kernels whose rounding differs.
* Nearest-centroid search uses BLAS for speed, but rows whose best two candidates are within a
  relative ``_TIE_RTOL`` of each other are re-scored with exact elementwise arithmetic, so the
  assignment does not depend on the BLAS kernel.
* Centroid sums use ``np.bincount`` (a sequential loop), not pairwise/SIMD reductions.

Only numpy is imported.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

CODEC_NAME = "mel-kmeans"
CODEC_VERSION = "1"
FRAME_RATE = 50

# Rows whose two best squared distances differ by less than this (relative to the squared norms
# involved) are re-scored exactly; BLAS rounding error is orders of magnitude below it.
_TIE_RTOL = 1e-8
_CHUNK_ROWS = 8192


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular mel filterbank, shape ``[n_mels, n_fft // 2 + 1]``, float64.

    Band ``m`` rises linearly from mel edge ``m`` to a peak of 1.0 at edge ``m + 1`` and falls
    to zero at edge ``m + 2``, with ``n_mels + 2`` edges spaced uniformly on the HTK mel scale
    between ``fmin`` and ``fmax`` (default: Nyquist). Filters are not area-normalised.
    """
    if fmax is None:
        fmax = sample_rate / 2.0
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin} fmax={fmax}")
    n_bins = n_fft // 2 + 1
    bin_hz = np.arange(n_bins, dtype=np.float64) * sample_rate / n_fft
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


@dataclass(frozen=True)
class MelParams:
    """Front-end parameters; everything needed (with the codebook) to reproduce encoding."""

    sample_rate: int = 22050
    n_fft: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None
    log_floor: float = 1e-5

    @property
    def hop_length(self) -> int:
        return self.sample_rate // FRAME_RATE

    def validate(self) -> None:
        if self.sample_rate <= 0 or self.sample_rate % FRAME_RATE:
            raise ValueError(f"sample_rate must be a positive multiple of {FRAME_RATE}, "
                             f"got {self.sample_rate}")
        if self.n_fft < self.hop_length:
            raise ValueError(f"n_fft ({self.n_fft}) must be >= hop ({self.hop_length})")
        if self.n_mels < 1 or self.log_floor <= 0:
            raise ValueError("n_mels must be >= 1 and log_floor > 0")


def default_n_fft(sample_rate: int) -> int:
    """Smallest power of two >= 2 * hop (1024 at 22.05 kHz and at 16 kHz)."""
    hop = sample_rate // FRAME_RATE
    return 1 << int(math.ceil(math.log2(2 * hop)))


class LogMel:
    """Deterministic numpy log-mel front end at 50 frames per second."""

    def __init__(self, params: MelParams) -> None:
        params.validate()
        self.params = params
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(params.n_fft) / params.n_fft))
        fb = mel_filterbank(params.sample_rate, params.n_fft, params.n_mels, params.fmin,
                            params.fmax)
        # Sparse (bin range, weights) per band; see the module docstring for why not a matmul.
        self._bands: list[tuple[int, np.ndarray]] = []
        for row in fb:
            nz = np.flatnonzero(row)
            if nz.size == 0:
                self._bands.append((0, np.zeros(0)))
            else:
                self._bands.append((int(nz[0]), row[nz[0]:nz[-1] + 1].copy()))
        self.filterbank = fb

    def n_frames(self, n_samples: int) -> int:
        """Number of frames produced for ``n_samples`` of audio: ``ceil(n / hop)``."""
        return -(-n_samples // self.params.hop_length)

    def power_spectrum(self, audio: np.ndarray) -> np.ndarray:
        """``|rfft(window * frame)|^2``, shape ``[T, n_fft // 2 + 1]``, float64."""
        x = _as_mono_float64(audio)
        p = self.params
        t = self.n_frames(x.shape[0])
        pad = p.n_fft // 2
        padded = np.zeros(pad + max(x.shape[0], (t - 1) * p.hop_length + 1) + pad)
        padded[pad:pad + x.shape[0]] = x
        starts = np.arange(t) * p.hop_length
        frames = padded[starts[:, None] + np.arange(p.n_fft)[None, :]] * self.window
        spec = np.fft.rfft(frames, axis=1)
        return spec.real * spec.real + spec.imag * spec.imag

    def mel(self, power: np.ndarray) -> np.ndarray:
        """Project a power spectrum ``[T, n_bins]`` onto the mel bands -> ``[T, n_mels]``."""
        out = np.zeros((power.shape[0], len(self._bands)))
        for m, (lo, w) in enumerate(self._bands):
            acc = out[:, m]
            for j in range(w.shape[0]):
                acc += power[:, lo + j] * w[j]
        return out

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Log-mel features, shape ``[T, n_mels]``, float64."""
        return np.log(np.maximum(self.mel(self.power_spectrum(audio)), self.params.log_floor))


def _as_mono_float64(audio: np.ndarray) -> np.ndarray:
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio of shape [n_samples], got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        raise ValueError("expected float audio in [-1, 1]; convert integer PCM first")
    return x.astype(np.float64, copy=False)


def _exact_sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared distances ``[n, K]`` summed dimension by dimension (no BLAS, fixed order)."""
    out = np.zeros((x.shape[0], c.shape[0]))
    for d in range(x.shape[1]):
        diff = x[:, d:d + 1] - c[None, :, d]
        out += diff * diff
    return out


def _exact_sqnorm(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape[0])
    for d in range(x.shape[1]):
        out += x[:, d] * x[:, d]
    return out


def assign(x: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codebook row for every row of ``x`` (float64 math, lowest index wins ties).

    Returns ``(labels int64 [N], squared distances float64 [N])``. Distances come from the
    BLAS expansion ``|x|^2 - 2 x.c + |c|^2`` except for near-tied rows, which are re-scored
    exactly so the labels do not depend on the BLAS build or CPU.
    """
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(codebook, dtype=np.float64)
    k = c.shape[0]
    c_sq = _exact_sqnorm(c)
    c_sq_max = float(c_sq.max())
    labels = np.empty(x.shape[0], dtype=np.int64)
    dists = np.empty(x.shape[0], dtype=np.float64)
    for lo in range(0, x.shape[0], _CHUNK_ROWS):
        xc = x[lo:lo + _CHUNK_ROWS]
        x_sq = _exact_sqnorm(xc)
        d = x_sq[:, None] - 2.0 * (xc @ c.T) + c_sq[None, :]
        if k >= 2:
            two = np.partition(d, 1, axis=1)[:, :2]
            scale = x_sq + c_sq_max + 1.0
            tied = np.flatnonzero(two[:, 1] - two[:, 0] <= _TIE_RTOL * scale)
        else:
            tied = np.arange(xc.shape[0])
        if tied.size:
            d[tied] = _exact_sqdist(xc[tied], c)
        lab = np.argmin(d, axis=1)
        labels[lo:lo + xc.shape[0]] = lab
        dists[lo:lo + xc.shape[0]] = np.maximum(d[np.arange(xc.shape[0]), lab], 0.0)
    return labels, dists


def kmeans(x: np.ndarray, k: int, seed: int, n_iter: int = 30) -> tuple[np.ndarray, dict]:
    """k-means++ initialisation followed by ``n_iter`` Lloyd iterations, float64.

    Deterministic for a given ``(x, k, seed, n_iter)``. An emptied cluster is re-seeded with
    the point currently farthest from its centroid. Returns ``(centroids [k, D] float64,
    stats)`` where stats holds the per-iteration mean squared distance.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    n, dim = x.shape
    if k < 1 or n < k:
        raise ValueError(f"k-means needs at least k={k} frames, got {n}")
    rng = np.random.default_rng(seed)

    centroids = np.empty((k, dim))
    centroids[0] = x[int(rng.integers(n))]
    closest = _exact_sqdist(x, centroids[:1])[:, 0]
    for i in range(1, k):
        cum = np.cumsum(closest)
        total = float(cum[-1])
        if total > 0.0:
            idx = int(np.searchsorted(cum, rng.random() * total, side="right"))
            idx = min(idx, n - 1)
        else:
            idx = int(rng.integers(n))
        centroids[i] = x[idx]
        closest = np.minimum(closest, _exact_sqdist(x, centroids[i:i + 1])[:, 0])

    history: list[float] = []
    n_reseeded = 0
    for _ in range(n_iter):
        labels, dists = assign(x, centroids)
        history.append(float(dists.mean()))
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=x[:, d], minlength=k) for d in range(dim)],
                        axis=1)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
        if not nonempty.all():
            far = dists.copy()
            for j in np.flatnonzero(~nonempty):
                idx = int(np.argmax(far))
                centroids[j] = x[idx]
                far[idx] = -1.0
                n_reseeded += 1
    _, dists = assign(x, centroids)
    history.append(float(dists.mean()))
    return centroids, {"mse_history": history, "n_reseeded": n_reseeded, "n_frames": n}


class MelKMeansCodec:
    """Log-mel + k-means speech tokenizer with one codebook (``n_q = 1``) at 50 Hz."""

    def __init__(self, sample_rate: int = 22050, codebook_size: int = 256, n_mels: int = 64,
                 n_fft: int | None = None, fmin: float = 0.0, fmax: float | None = None,
                 log_floor: float = 1e-5, seed: int = 0, n_iter: int = 30) -> None:
        if not 1 <= codebook_size <= 65536:
            raise ValueError(f"codebook_size must be in [1, 65536], got {codebook_size}")
        self.params = MelParams(sample_rate=sample_rate,
                                n_fft=n_fft if n_fft is not None else default_n_fft(sample_rate),
                                n_mels=n_mels, fmin=fmin, fmax=fmax, log_floor=log_floor)
        self.frontend = LogMel(self.params)
        self.codebook_size = codebook_size
        self.seed = seed
        self.n_iter = n_iter
        self.codebook: np.ndarray | None = None
        self.fit_stats: dict = {}

    @property
    def sample_rate(self) -> int:
        return self.params.sample_rate

    @property
    def hop_length(self) -> int:
        return self.params.hop_length

    def features(self, waveform: np.ndarray) -> np.ndarray:
        """Log-mel features ``[T, n_mels]`` (float64) of one mono waveform."""
        return self.frontend(waveform)

    def fit(self, waveforms: Sequence[np.ndarray]) -> "MelKMeansCodec":
        """Fit the codebook on the frames of ``waveforms`` (concatenated in the given order)."""
        if not waveforms:
            raise ValueError("fit() needs at least one waveform")
        feats = np.concatenate([self.features(w) for w in waveforms], axis=0)
        centroids, stats = kmeans(feats, self.codebook_size, self.seed, self.n_iter)
        # Store and encode with the float32 codebook so a reloaded codec is bit-identical.
        self.codebook = centroids.astype(np.float32)
        stats["final_mse_float32_codebook"] = float(assign(feats, self.codebook)[1].mean())
        self.fit_stats = stats
        return self

    def _require_codebook(self) -> np.ndarray:
        if self.codebook is None:
            raise RuntimeError("codec has no codebook: call fit() or MelKMeansCodec.load()")
        return self.codebook

    def encode_features(self, feats: np.ndarray) -> np.ndarray:
        """Quantise log-mel features ``[T, n_mels]`` -> codes ``[1, T]`` uint16."""
        labels, _ = assign(feats, self._require_codebook())
        return labels.astype(np.uint16)[None, :]

    def encode(self, waveform: np.ndarray) -> np.ndarray:
        """Mono float waveform at ``sample_rate`` -> codes ``[1, T]`` uint16, T = ceil(n / hop)."""
        return self.encode_features(self.features(waveform))

    def decode_to_mel(self, codes: np.ndarray) -> np.ndarray:
        """Codebook lookup: codes ``[1, T]`` (or ``[T]``) -> log-mel ``[T, n_mels]`` float32."""
        cb = self._require_codebook()
        c = np.asarray(codes)
        if c.ndim == 2:
            if c.shape[0] != 1:
                raise ValueError(f"mel-kmeans has n_q=1, got codes of shape {c.shape}")
            c = c[0]
        if c.size and (c.min() < 0 or c.max() >= cb.shape[0]):
            raise ValueError(f"codes outside [0, {cb.shape[0]})")
        return cb[c.astype(np.int64)]

    def codebook_bytes(self) -> bytes:
        """The exact bytes :meth:`save` writes for the codebook ``.npy``."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(self._require_codebook()), allow_pickle=False)
        return buf.getvalue()

    def checkpoint_sha256(self) -> str:
        """sha256 of the saved codebook ``.npy`` file."""
        return hashlib.sha256(self.codebook_bytes()).hexdigest()

    def config(self) -> dict:
        """JSON-serialisable parameters written next to the codebook."""
        return {"name": CODEC_NAME, "version": CODEC_VERSION, "frame_rate": FRAME_RATE,
                "hop_length": self.hop_length, "mel_scale": "htk", "window": "hann",
                "codebook_size": self.codebook_size, "seed": self.seed, "n_iter": self.n_iter,
                **asdict(self.params)}

    def codec_info(self) -> dict:
        """Codec dict for shard metadata (see docs/design/data-contract.md)."""
        return {"name": CODEC_NAME, "version": CODEC_VERSION, "sample_rate": self.sample_rate,
                "frame_rate": FRAME_RATE, "n_q": 1, "codebook_size": self.codebook_size,
                "checkpoint_sha256": self.checkpoint_sha256()}

    @staticmethod
    def config_path_for(path: str | Path) -> Path:
        """``codebook.npy`` -> ``codebook.json``."""
        return Path(path).with_suffix(".json")

    def save(self, path: str | Path) -> None:
        """Write the codebook to ``path`` (``.npy``) and the parameters to ``<stem>.json``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.codebook_bytes())
        cfg = {**self.config(), "checkpoint_sha256": self.checkpoint_sha256()}
        self.config_path_for(path).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MelKMeansCodec":
        """Load a codec written by :meth:`save`; verifies the recorded checkpoint hash."""
        path = Path(path)
        cfg_path = cls.config_path_for(path)
        if not path.is_file() or not cfg_path.is_file():
            raise FileNotFoundError(f"mel-kmeans checkpoint needs {path} and {cfg_path}")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("name") != CODEC_NAME or cfg.get("version") != CODEC_VERSION:
            raise ValueError(f"{cfg_path}: not a {CODEC_NAME} v{CODEC_VERSION} checkpoint")
        raw = path.read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        if cfg.get("checkpoint_sha256") not in (None, sha):
            raise ValueError(f"{path}: sha256 {sha} does not match {cfg_path} "
                             f"({cfg['checkpoint_sha256']})")
        codebook = np.load(io.BytesIO(raw), allow_pickle=False)
        if codebook.dtype != np.float32 or codebook.ndim != 2:
            raise ValueError(f"{path}: expected a float32 [K, n_mels] codebook, got "
                             f"{codebook.dtype} {codebook.shape}")
        codec = cls(sample_rate=cfg["sample_rate"], codebook_size=cfg["codebook_size"],
                    n_mels=cfg["n_mels"], n_fft=cfg["n_fft"], fmin=cfg["fmin"],
                    fmax=cfg["fmax"], log_floor=cfg["log_floor"], seed=cfg["seed"],
                    n_iter=cfg["n_iter"])
        if codebook.shape != (codec.codebook_size, codec.params.n_mels):
            raise ValueError(f"{path}: codebook shape {codebook.shape} does not match config")
        codec.codebook = codebook
        return codec


def pcm16_to_float(pcm: bytes | np.ndarray) -> np.ndarray:
    """Little-endian 16-bit PCM -> float32 in [-1, 1)."""
    a = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray)) else pcm
    return (np.asarray(a, dtype=np.float32) / np.float32(32768.0)).astype(np.float32)
