"""EnCodec (VALL-E): transformers' ``EncodecModel`` from a local dir (the 24 kHz model: 75 Hz,
1,024 codes per book; ``bandwidth`` picks the books: 6 kbps = 8, VALL-E's setting).

(The ``encodec`` package itself imports torchaudio at import time, which has no build for the
torch used here; transformers' port loads the same published weights, facebook/encodec_24khz.)
"""
from __future__ import annotations

import numpy as np

from ._hf import HFCodec, load_hf_model, save_random_hf
from .base import CodecError, fit_length


class EncodecCodec(HFCodec):
    name = "encodec"
    bf16_ok = True

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32", bandwidth: float = 6.0) -> None:
        self.model, sha, tf_version = load_hf_model(self.name, path, "EncodecModel", device)
        cfg = self.model.config
        bandwidth = float(bandwidth)
        if bandwidth not in [float(b) for b in cfg.target_bandwidths]:
            raise CodecError(f"codec 'encodec': bandwidth={bandwidth:g} not in {list(cfg.target_bandwidths)}")
        if cfg.audio_channels != 1:
            raise CodecError("codec 'encodec': only mono models are supported (the 24 kHz model)")
        self.bandwidth = bandwidth
        self._setup(tf_version, cfg.sampling_rate, cfg.upsampling_ratios,
                    self.model.quantizer.get_num_quantizers_for_bandwidth(bandwidth), cfg.codebook_size)
        super().__init__(sha, device, precision)

    def codec_info(self) -> dict:
        return {**super().codec_info(), "bandwidth_kbps": self.bandwidth}

    def _encode_batch(self, wav, lengths):
        import torch

        mask = torch.zeros_like(wav, dtype=torch.bool)
        for i, n in enumerate(lengths):
            mask[i, :n] = True
        out = self.model.encode(wav.unsqueeze(1), padding_mask=mask.unsqueeze(1), bandwidth=self.bandwidth)
        codes = out.audio_codes[0]  # [B, n_q, T] (one chunk: chunk_length is None for the 24 kHz model)
        return list(codes.long().cpu().numpy())

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        c = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.device)[None, None]
        with torch.inference_mode():
            audio = self.model.decode(c, [None]).audio_values
        return fit_length(audio.reshape(-1).float().cpu().numpy(), c.shape[-1] * self.hop)


def save_random_encodec(path: str, seed: int = 0, **config) -> str:
    """EnCodec with random weights (default: the 24 kHz architecture; pass smaller dims for tests)."""
    return save_random_hf(path, "EncodecModel", "EncodecConfig", seed, **config)
