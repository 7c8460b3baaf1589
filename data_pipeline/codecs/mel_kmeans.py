"""The demo's mel k-means codec behind the Codec interface, with a decoder.

Encoding is :class:`data_pipeline.codec.MelKMeansCodec` unchanged (numpy, bit-reproducible).
Decoding inverts what can be inverted: each code's centroid is a log-mel frame; ``exp`` gives mel
power, a non-negative least-squares-ish pseudo-inverse of the (triangular, HTK) filterbank gives a
linear power spectrum, and Griffin-Lim (torch.stft/istft, same Hann window and hop as the
encoder, centred frames) recovers a phase. The result is intelligible-ish buzz: enough to listen
to what 256 codes keep, and to check frame counts; it is not a vocoder.
"""
from __future__ import annotations

import os

import numpy as np

from ..codec import CODEC_NAME, CODEC_VERSION, FRAME_RATE, MelKMeansCodec
from .base import Codec, CodecError

CODEBOOK_FILE = "codebook.npy"


def griffin_lim(magnitude, n_fft: int, hop: int, n_iter: int = 32, length: int | None = None, seed: int = 0):
    """Waveform whose STFT magnitude approximates ``magnitude`` ``[n_fft//2+1, frames]`` (torch)."""
    import torch

    window = torch.hann_window(n_fft, periodic=True, dtype=magnitude.dtype, device=magnitude.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    angles = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=gen, dtype=magnitude.dtype))
    spec = magnitude * angles.to(magnitude.device)
    wav = None
    for _ in range(max(1, n_iter)):
        wav = torch.istft(spec, n_fft, hop_length=hop, window=window, center=True, length=length)
        rebuilt = torch.stft(wav, n_fft, hop_length=hop, window=window, center=True, pad_mode="constant",
                             return_complex=True)
        spec = magnitude * torch.exp(1j * torch.angle(rebuilt))
    return torch.istft(spec, n_fft, hop_length=hop, window=window, center=True, length=length)


class MelKMeans(Codec):
    name = CODEC_NAME
    version = CODEC_VERSION
    frame_rate = float(FRAME_RATE)
    level_rates = (float(FRAME_RATE),)
    n_q = 1

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32", griffin_lim_iters: int = 32) -> None:
        file = os.path.join(path, CODEBOOK_FILE) if os.path.isdir(path) else path
        try:
            self.inner = MelKMeansCodec.load(file)
        except (OSError, ValueError) as e:
            raise CodecError(f"mel-kmeans: cannot load {file}: {e} (it needs codebook.npy + codebook.json "
                             f"as `python -m data_pipeline build-demo` writes them)") from None
        self.sample_rate = self.inner.sample_rate
        self.codebook_size = self.inner.codebook_size
        self.griffin_lim_iters = griffin_lim_iters
        super().__init__(self.inner.checkpoint_sha256(), "cpu" if device in (None, "auto") else device, precision)
        self._pinv = None

    @property
    def samples_per_frame(self) -> int:
        return self.inner.hop_length

    def codec_info(self) -> dict:
        # Exactly the dict the demo data were written with (frame_rate an int): shards and their
        # hashes stay byte-identical to data/demo.
        return self.inner.codec_info()

    def encode(self, waveforms):
        # Deterministic numpy path, one item at a time (the codec has no batch dimension to gain).
        return [self.inner.encode(np.asarray(w, dtype=np.float32)).astype(np.int64) for w in waveforms]

    def _encode_batch(self, wav, lengths):  # pragma: no cover - encode() is overridden
        return [self.inner.encode(wav[i, :n].cpu().numpy()) for i, n in enumerate(lengths)]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        log_mel = self.inner.decode_to_mel(codes).astype(np.float64)  # [T, n_mels]
        if self._pinv is None:
            self._pinv = np.linalg.pinv(self.inner.frontend.filterbank)  # [n_bins, n_mels]
        power = np.maximum(np.exp(log_mel) @ self._pinv.T, 0.0)  # [T, n_bins]
        mag = torch.as_tensor(np.sqrt(power).T.copy(), dtype=torch.float32)  # [n_bins, T]
        t = mag.shape[1]
        # A centred STFT of T*hop samples has T+1 frames: repeat the last one.
        mag = torch.cat([mag, mag[:, -1:]], dim=1)
        p = self.inner.params
        wav = griffin_lim(mag, p.n_fft, p.hop_length, self.griffin_lim_iters, length=t * p.hop_length)
        return wav.numpy().astype(np.float32)
