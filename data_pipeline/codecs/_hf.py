"""Shared loading for codecs that come as transformers models (EnCodec, DAC): a local directory
written by ``save_pretrained`` (config.json + model.safetensors), as the published checkpoints
are; ``local_files_only`` so that nothing is ever fetched."""
from __future__ import annotations

import glob
import os

import numpy as np

from .base import Codec, CodecError, require_dir, sha256_files


class HFCodec(Codec):
    """A transformers codec with one frame rate for all its books (EnCodec, DAC)."""

    hop = 0

    def _setup(self, tf_version: str, sample_rate: int, ratios, n_q: int, codebook_size: int) -> None:
        self.version = f"transformers=={tf_version}"
        self.sample_rate = int(sample_rate)
        self.hop = int(np.prod(ratios))
        self.frame_rate = self.sample_rate / self.hop
        self.n_q = int(n_q)
        self.level_rates = (self.frame_rate,) * self.n_q
        self.codebook_size = int(codebook_size)
        # Both pad their input to a multiple of the hop in their own code; transformers' ports leave it to us.
        self.pad_multiple = self.hop

    @property
    def samples_per_frame(self) -> int:
        return self.hop


def load_hf_model(name: str, path: str, class_name: str, device: str):
    """(model in eval mode on ``device``, sha256 of its weight files, transformers version)."""
    try:
        import transformers
    except ImportError as e:
        raise CodecError(f"codec {name!r} needs transformers (pip install 'transformers>=5'): {e}") from None
    path = require_dir(path, name, "config.json and model.safetensors (save_pretrained)")
    weights = sorted(glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "*.bin")))
    if not os.path.isfile(os.path.join(path, "config.json")) or not weights:
        raise CodecError(f"codec {name!r}: {path} lacks config.json or model weights (*.safetensors / *.bin)")
    cls = getattr(transformers, class_name)
    transformers.utils.logging.disable_progress_bar()  # no per-process "Loading weights" bars
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise CodecError(f"codec {name!r}: cannot load {path}: {type(e).__name__}: {e}") from None
    return model.to(device).eval(), sha256_files(weights), transformers.__version__


def save_random_hf(path: str, class_name: str, config_name: str, seed: int = 0, **config) -> str:
    """A real architecture with random weights, saved the way published checkpoints are."""
    import torch
    import transformers

    torch.manual_seed(seed)
    transformers.utils.logging.disable_progress_bar()
    model = getattr(transformers, class_name)(getattr(transformers, config_name)(**config)).eval()
    with torch.no_grad():
        # Real checkpoints have trained codebooks; freshly initialised ones can be all zeros
        # (EnCodec's), which would map every frame to code 0. Random codebooks exercise every path.
        for mod_name, buf_name, buf in [(m, b, t) for m, mod in model.named_modules()
                                        for b, t in mod.named_buffers(recurse=False)]:
            if buf_name == "embed" and buf.dtype.is_floating_point:
                buf.normal_()
    model.save_pretrained(path)
    return path
