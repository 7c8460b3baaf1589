"""The one small interface every speech codec adapter implements.

A codec turns mono float waveforms at its ``sample_rate`` into integer codes ``[n_q, T]`` (the
rows a token shard stores, raw, without vocabulary offsets) and back. ``frame_rate`` is the rate
of those stored rows; ``level_rates`` the native rate of each codebook level (they differ for
multi-scale codecs: SNAC's 3 levels at ~12/23/47 Hz are stored as 7 rows at the coarse rate).

Weights only ever come from a local path: adapters never call a hub, and ``checkpoint_sha256``
(the hash of the weight files) goes into every shard so that training can refuse a dataset
tokenized with other weights.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class CodecError(RuntimeError):
    """A codec cannot be loaded or used here (missing package, weights, CUDA); one-line message."""


def sha256_files(paths: Sequence[str]) -> str:
    """sha256 over the bytes of ``paths`` in the given order (the weights' identity)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def require_dir(path: str | None, name: str, expected: str) -> str:
    """``path`` must be an existing local directory (never a hub id: nothing is downloaded)."""
    if not path:
        raise CodecError(f"codec {name!r} needs --codec-path DIR (a local directory with {expected})")
    if "://" in str(path) or not os.path.isdir(path):
        raise CodecError(f"codec {name!r}: {path} is not a local directory (it must hold {expected}; "
                         f"weights are never downloaded at run time)")
    return str(path)


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when CUDA is available else 'cpu'; 'cuda[:N]' without CUDA is a CodecError."""
    import torch

    dev = (device or "auto").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise CodecError(f"device={device!r} but CUDA is not available here "
                         f"(torch {torch.__version__}); use device=cpu")
    return dev


class Codec(ABC):
    """Batched encode with lengths, decode, and the identity recorded in the dataset."""

    name: str = ""
    version: str = ""
    sample_rate: int = 0
    frame_rate: float = 0.0  # rate of the stored rows
    level_rates: tuple[float, ...] = ()
    n_q: int = 0
    codebook_size: int = 0
    bf16_ok: bool = False  # the encoder tolerates bf16 autocast (quantisers stay fp32)
    pad_multiple: int = 1  # batches are zero padded to a multiple of this many samples

    def __init__(self, checkpoint_sha256: str, device: str = "cpu", precision: str = "fp32") -> None:
        self.checkpoint_sha256 = checkpoint_sha256
        self.device = device
        if precision not in ("fp32", "bf16"):
            raise CodecError(f"precision must be fp32 or bf16, got {precision!r}")
        if precision == "bf16" and not self.bf16_ok:
            raise CodecError(f"codec {self.name!r} is not run in bf16 (its codes change); use precision=fp32")
        self.precision = precision

    # --------------------------------------------------------------- shapes

    @property
    @abstractmethod
    def samples_per_frame(self) -> int:
        """Waveform samples per stored frame (hop of the stored rows)."""

    def n_frames(self, n_samples: int) -> int:
        """Stored frames for ``n_samples`` of audio: ``ceil(n / samples_per_frame)``."""
        return -(-int(n_samples) // self.samples_per_frame)

    # --------------------------------------------------------------- encode / decode

    @abstractmethod
    def _encode_batch(self, wav, lengths) -> "list[np.ndarray]":
        """``wav`` float32 tensor ``[B, N]`` on ``self.device`` (zero padded), ``lengths`` ints ->
        one integer array ``[n_q, >= n_frames(length)]`` per item."""

    def encode(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Mono float waveforms at ``sample_rate`` -> codes ``[n_q, n_frames(len)]`` each (int64).

        The batch is zero padded to its longest item; each item's codes are cut to its own frame
        count. Group items of similar length (the tokenizer buckets them) to waste little."""
        import torch

        if not len(waveforms):
            return []
        lengths = [int(np.asarray(w).shape[-1]) for w in waveforms]
        if min(lengths) <= 0:
            raise ValueError("cannot encode an empty waveform")
        n = -(-max(lengths) // self.pad_multiple) * self.pad_multiple
        batch = torch.zeros(len(waveforms), n, dtype=torch.float32)
        for i, w in enumerate(waveforms):
            batch[i, : lengths[i]] = torch.as_tensor(np.asarray(w, dtype=np.float32))
        batch = batch.to(self.device)
        with torch.inference_mode(), self._autocast():
            raw = self._encode_batch(batch, lengths)
        out = []
        for codes, length in zip(raw, lengths):
            t = self.n_frames(length)
            c = np.asarray(codes, dtype=np.int64)
            if c.shape[0] != self.n_q or c.shape[1] < t:
                raise RuntimeError(f"codec {self.name}: got codes {c.shape} for {length} samples, "
                                   f"expected [{self.n_q}, >= {t}]")
            out.append(np.ascontiguousarray(c[:, :t]))
        return out

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes ``[n_q, T]`` -> mono float32 waveform of ``T * samples_per_frame`` samples."""

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --------------------------------------------------------------- identity

    def codec_info(self) -> dict:
        """The codec dict written into every shard and index.json (CODEC_IDENTITY_KEYS and more)."""
        return {"name": self.name, "version": self.version, "sample_rate": int(self.sample_rate),
                "frame_rate": float(self.frame_rate), "n_q": int(self.n_q),
                "codebook_size": int(self.codebook_size), "checkpoint_sha256": self.checkpoint_sha256,
                "level_rates": [float(r) for r in self.level_rates]}

    def describe(self) -> str:
        return (f"{self.name} v{self.version}: {self.sample_rate} Hz, {self.n_q} x {self.codebook_size} "
                f"at {self.frame_rate:g} Hz (levels {', '.join(f'{r:g}' for r in self.level_rates)} Hz), "
                f"weights sha256 {self.checkpoint_sha256[:12]}, {self.device}, {self.precision}")


def fit_length(wav: np.ndarray, n: int) -> np.ndarray:
    """Cut or zero-pad a decoded waveform to exactly ``n`` samples (decoders may differ by a few)."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.shape[0] >= n:
        return wav[:n]
    return np.concatenate([wav, np.zeros(n - wav.shape[0], dtype=np.float32)])
