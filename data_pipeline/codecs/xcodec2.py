"""xcodec2 (LLaSA): 16 kHz in, one FSQ book of 65,536 codes at 50 Hz.

The ``xcodec2`` package pins torch 2.5 and friends; install it without its pins and with what it
really imports (README "Install"): ``pip install --no-deps xcodec2==0.1.5 vector-quantize-pytorch==1.17.8
torchtune==0.6.1 torchao`` plus einops, einx, transformers.

``XCodec2Model.__init__`` itself loads its semantic model with
``Wav2Vec2BertModel.from_pretrained("facebook/w2v-bert-2.0")`` (and the feature extractor the same
way): a hub download. The adapter redirects exactly that id to a local directory (``semantic_path``,
default ``CODEC_PATH/w2v-bert-2.0``), with ``local_files_only``, while the model is constructed,
so nothing is fetched. The codec directory is the published HKUST-Audio/xcodec2 layout
(config.json + model.safetensors).

Batched encode: xcodec2's ``encode_code`` only looks at the first item of a batch; the adapter
computes each item's w2v-bert features itself (with xcodec2's padding: wav padded to a multiple
of 320 samples, plus 160 on both sides for the features) and calls ``encode_batch_feats``.
"""
from __future__ import annotations

import contextlib
import glob
import os

import numpy as np

from .base import Codec, CodecError, fit_length, require_dir, sha256_files

SEMANTIC_ID = "facebook/w2v-bert-2.0"
HOP = 320
INSTALL_HINT = ("pip install --no-deps xcodec2==0.1.5 vector-quantize-pytorch==1.17.8 torchtune==0.6.1 "
                "torchao einx (the package pins torch==2.5.0: never install it with its dependencies)")


def _import():
    try:
        from xcodec2 import modeling_xcodec2
    except Exception as e:  # ImportError, or a torchao/torchtune that does not fit this torch
        raise CodecError(f"codec 'xcodec2' is not importable here ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return modeling_xcodec2


@contextlib.contextmanager
def _local_semantic_model(module, semantic_path: str):
    """Make xcodec2's hard-coded hub id resolve to ``semantic_path`` while the model is built."""
    originals = {}

    def redirect(cls_name):
        cls = getattr(module, cls_name)
        orig = cls.from_pretrained
        originals[cls_name] = (cls, orig)

        def from_pretrained(name, *args, **kwargs):
            if name == SEMANTIC_ID:
                name = semantic_path
            kwargs["local_files_only"] = True
            return orig(name, *args, **kwargs)

        # A plain function stored on the module's name for the class, not on the class itself.
        setattr(module, cls_name, type(cls.__name__, (cls,), {"from_pretrained": staticmethod(from_pretrained)}))

    for n in ("Wav2Vec2BertModel", "AutoFeatureExtractor"):
        redirect(n)
    try:
        yield
    finally:
        for n, (cls, _) in originals.items():
            setattr(module, n, cls)


class XCodec2Codec(Codec):
    name = "xcodec2"
    sample_rate = 16000
    frame_rate = 50.0
    level_rates = (50.0,)
    n_q = 1
    codebook_size = 65536
    pad_multiple = 1

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32", semantic_path: str | None = None) -> None:
        module = _import()
        path = require_dir(path, self.name, "config.json and model.safetensors (HKUST-Audio/xcodec2)")
        semantic = semantic_path or os.path.join(path, "w2v-bert-2.0")
        require_dir(semantic, self.name + " semantic model", "w2v-bert-2.0's config.json, weights and "
                    "preprocessor_config.json (set semantic_path=DIR)")
        weights = sorted(glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "*.bin")))
        if not weights:
            raise CodecError(f"codec 'xcodec2': no *.safetensors / *.bin in {path}")
        sem_weights = sorted(glob.glob(os.path.join(semantic, "*.safetensors")) or glob.glob(os.path.join(semantic, "*.bin")))
        try:
            with _local_semantic_model(module, semantic):
                model = module.XCodec2Model.from_pretrained(path, local_files_only=True)
        except CodecError:
            raise
        except Exception as e:
            raise CodecError(f"codec 'xcodec2': cannot load {path} (semantic model {semantic}): "
                             f"{type(e).__name__}: {e}") from None
        import xcodec2

        self.model = model.to(device).eval()
        self.version = f"xcodec2=={getattr(xcodec2, '__version__', None) or _dist_version('xcodec2')}"
        super().__init__(sha256_files(weights + sem_weights), device, precision)

    @property
    def samples_per_frame(self) -> int:
        return HOP

    def n_frames(self, n_samples: int) -> int:
        # xcodec2 always pads 320 - n % 320 samples (a whole extra hop when n is a multiple).
        return int(n_samples) // HOP + 1

    def _encode_batch(self, wav, lengths):
        import torch
        import torch.nn.functional as F

        fe = self.model.feature_extractor
        waves, feats = [], []
        for i, n in enumerate(lengths):
            w = wav[i, :n]
            w = F.pad(w, (0, HOP - n % HOP))
            waves.append(w)
            f = fe(F.pad(w.cpu(), (160, 160)), sampling_rate=self.sample_rate, return_tensors="pt").input_features
            feats.append(f[0])
        t_wav = max(w.shape[0] for w in waves)
        t_feat = max(f.shape[0] for f in feats)
        wb = torch.stack([F.pad(w, (0, t_wav - w.shape[0])) for w in waves])[:, None].to(self.device)
        fb = torch.stack([F.pad(f, (0, 0, 0, t_feat - f.shape[0])) for f in feats])[:, None].to(self.device)
        codes = self.model.encode_batch_feats(wb, fb)  # [B, 1, T]
        return list(codes.long().cpu().numpy())

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        c = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.device)[None]
        with torch.inference_mode():
            audio = self.model.decode_code(c)
        return fit_length(audio.reshape(-1).float().cpu().numpy(), c.shape[-1] * HOP)


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
