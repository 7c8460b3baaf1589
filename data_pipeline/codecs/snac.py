"""SNAC (Orpheus): the ``snac`` package's model, loaded from a local dir (config.json +
pytorch_model.bin, the layout of the published checkpoints).

SNAC encodes into levels at different rates (24 kHz model: 3 x 4096 at 24000/512/{4,2,1} =
11.7/23.4/46.9 Hz). Shards store one row set per coarse frame: the 7 slot rows of
:func:`data_pipeline.layouts.snac_to_slots` (Orpheus order), so ``n_q = 7`` at the coarse rate and
the flattened layout reproduces Orpheus's token ids. Other level counts are stored the same way
(sum of strides rows per coarse frame, in that coarse-frame interleave).
"""
from __future__ import annotations

import math
import os

import numpy as np

from .base import Codec, CodecError, fit_length, require_dir, sha256_files


def _import():
    try:
        import snac  # noqa: F401
        from snac import SNAC
    except ImportError as e:
        raise CodecError(f"codec 'snac' needs the snac package: pip install snac==1.2.1 --no-deps einops ({e})") from None
    return SNAC


class SnacCodec(Codec):
    name = "snac"
    bf16_ok = True

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32") -> None:
        import torch

        SNAC = _import()
        import snac as snac_pkg

        path = require_dir(path, self.name, "config.json and pytorch_model.bin")
        files = [os.path.join(path, "config.json"), os.path.join(path, "pytorch_model.bin")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CodecError(f"codec 'snac': {path} lacks {', '.join(os.path.basename(m) for m in missing)}")
        # from_pretrained takes the local branch for a directory (it would call the hub otherwise).
        try:
            model = SNAC.from_pretrained(path)
        except Exception as e:  # a wrong config or state dict
            raise CodecError(f"codec 'snac': cannot load {path}: {type(e).__name__}: {e}") from None
        self.model = model.to(device).eval()
        self.version = f"snac=={getattr(snac_pkg, '__version__', '1.2.1')}"
        self.sample_rate = int(model.sampling_rate)
        self.strides = [int(s) for s in model.vq_strides]
        self.hop = int(model.hop_length)
        self.codebook_size = int(model.codebook_size)
        top = self.strides[0]
        if any(top % s for s in self.strides):
            raise CodecError(f"codec 'snac': vq_strides {self.strides} must divide the coarsest stride")
        self.level_rates = tuple(self.sample_rate / (self.hop * s) for s in self.strides)
        self.frame_rate = self.sample_rate / (self.hop * top)
        self.n_q = sum(top // s for s in self.strides)
        # SNAC pads the input to hop * lcm(top stride, attention window).
        self.pad_multiple = self.hop * math.lcm(top, model.attn_window_size or 1)
        super().__init__(sha256_files(files), device, precision)
        del torch

    @property
    def samples_per_frame(self) -> int:
        return self.hop * self.strides[0]

    def _to_rows(self, levels: list[np.ndarray]) -> np.ndarray:
        """Levels ``[T0 * top/s]`` -> rows ``[n_q, T0]`` in coarse-frame interleave (Orpheus order for 3 levels)."""
        if len(levels) == 3 and self.strides == [4, 2, 1]:
            from ..layouts import snac_to_slots

            return snac_to_slots(*levels)
        top = self.strides[0]
        t0 = levels[0].shape[0]
        rows = [lvl.reshape(t0, top // s).T for lvl, s in zip(levels, self.strides)]
        return np.concatenate(rows, axis=0)

    def _from_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        if len(self.strides) == 3 and self.strides == [4, 2, 1]:
            from ..layouts import slots_to_snac

            return list(slots_to_snac(rows))
        top, i, out = self.strides[0], 0, []
        for s in self.strides:
            k = top // s
            out.append(rows[i:i + k].T.reshape(-1))
            i += k
        return out

    def _encode_batch(self, wav, lengths):
        codes = self.model.encode(wav.unsqueeze(1))  # list of [B, T_level]
        levels = [c.long().cpu().numpy() for c in codes]
        return [self._to_rows([lvl[b] for lvl in levels]) for b in range(wav.shape[0])]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        rows = np.asarray(codes, dtype=np.int64)
        levels = [torch.as_tensor(x, device=self.device)[None] for x in self._from_rows(rows)]
        with torch.inference_mode():
            audio = self.model.decode(levels)
        return fit_length(audio.reshape(-1).float().cpu().numpy(), rows.shape[1] * self.samples_per_frame)


# The published 24 kHz model's config (hubertsiuzdak/snac_24khz), used by tests with fewer channels.
SNAC_24KHZ_CONFIG = {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8],
                     "decoder_dim": 1024, "decoder_rates": [8, 8, 4, 2], "attn_window_size": None,
                     "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [4, 2, 1], "noise": True,
                     "depthwise": True}


def save_random_snac(path: str, config: dict | None = None, seed: int = 0) -> str:
    """Build SNAC from ``config`` with random weights and save it as the published layout does."""
    import json

    import torch

    SNAC = _import()
    cfg = dict(SNAC_24KHZ_CONFIG if config is None else config)
    torch.manual_seed(seed)
    model = SNAC(**cfg).eval()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    return path


__all__ = ["SnacCodec", "save_random_snac", "SNAC_24KHZ_CONFIG", "np"]
