"""DAC (Descript Audio Codec): transformers' ``DacModel`` from a local dir (published as
descript/dac_16khz, dac_24khz, dac_44khz: 50 / 75 / 86.1 Hz, 12 / 32 / 9 books of 1,024)."""
from __future__ import annotations

import numpy as np

from ._hf import HFCodec, load_hf_model, save_random_hf
from .base import CodecError, fit_length


class DacCodec(HFCodec):
    name = "dac"
    bf16_ok = True

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32", n_q: int | None = None) -> None:
        self.model, sha, tf_version = load_hf_model(self.name, path, "DacModel", device)
        cfg = self.model.config
        books = int(cfg.n_codebooks)
        self.n_q = books if n_q in (None, 0) else int(n_q)
        if not 1 <= self.n_q <= books:
            raise CodecError(f"codec 'dac': n_q={n_q} outside [1, {books}]")
        self._setup(tf_version, cfg.sampling_rate, cfg.downsampling_ratios, self.n_q, cfg.codebook_size)
        super().__init__(sha, device, precision)

    def _encode_batch(self, wav, lengths):
        out = self.model.encode(wav.unsqueeze(1), n_quantizers=self.n_q)
        return list(out.audio_codes[:, : self.n_q].long().cpu().numpy())

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        c = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.device)[None]
        with torch.inference_mode():
            audio = self.model.decode(audio_codes=c).audio_values
        return fit_length(audio.reshape(-1).float().cpu().numpy(), c.shape[-1] * self.hop)


def save_random_dac(path: str, seed: int = 0, **config) -> str:
    return save_random_hf(path, "DacModel", "DacConfig", seed, **config)
