"""Band-limited resampling in torch (windowed-sinc polyphase, the method torchaudio's
``sinc_interp_hann`` uses), so it runs wherever torch runs, CUDA included: torchaudio has no
build for every torch, and the tokenizer must not depend on it."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=32)
def _kernel(orig: int, new: int, width_zeros: int = 6, rolloff: float = 0.99):
    import torch

    base = min(orig, new) * rolloff  # cut-off below the lower Nyquist
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return (sinc * window * (base / orig)).float(), width


def resample(x, orig: int, new: int):
    """Resample ``x`` (numpy or torch, ``[N]`` or ``[B, N]``) from ``orig`` to ``new`` Hz; the
    output has ``ceil(N * new / orig)`` samples and the input's type (and torch device)."""
    import torch
    import torch.nn.functional as F

    if orig == new:
        return x
    if orig <= 0 or new <= 0:
        raise ValueError(f"sample rates must be positive, got {orig} -> {new}")
    as_numpy = isinstance(x, np.ndarray)
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if as_numpy else x.float()
    shape = t.shape
    t = t.reshape(-1, 1, shape[-1])
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    kernel, width = _kernel(o, n)
    kernel = kernel.to(t.device)
    n_in = shape[-1]
    y = F.conv1d(F.pad(t, (width, width + o)), kernel, stride=o)  # [B, n, frames]
    y = y.transpose(1, 2).reshape(t.shape[0], -1)[:, : math.ceil(n * n_in / o)]
    y = y.reshape(*shape[:-1], y.shape[-1])
    return y.numpy() if as_numpy else y
