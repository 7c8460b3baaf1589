"""Speech codecs behind one interface (:class:`Codec`), loaded by name from a local path.

``load_codec(name, path, device="cpu", precision="fp32", **options)``; names: mel-kmeans, snac,
encodec, dac, xcodec2. Each adapter imports its package lazily: a missing package is a
:class:`CodecError` naming the install command, not an ImportError at import time.
"""
from __future__ import annotations

from typing import Any

from .base import Codec, CodecError, resolve_device

CODECS = ("mel-kmeans", "snac", "encodec", "dac", "xcodec2")


def _class(name: str):
    key = name.strip().lower().replace("_", "-")
    if key == "mel-kmeans":
        from .mel_kmeans import MelKMeans as cls
    elif key == "snac":
        from .snac import SnacCodec as cls
    elif key == "encodec":
        from .encodec import EncodecCodec as cls
    elif key == "dac":
        from .dac import DacCodec as cls
    elif key == "xcodec2":
        from .xcodec2 import XCodec2Codec as cls
    else:
        raise CodecError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return cls


def load_codec(name: str, path: str, device: str = "cpu", precision: str = "fp32", **options: Any) -> Codec:
    """Load codec ``name`` from the local directory (or file, for mel-kmeans) ``path``."""
    cls = _class(name)
    device = resolve_device(device)
    try:
        return cls(path, device=device, precision=precision, **options)
    except TypeError as e:  # an option this codec does not take
        raise CodecError(f"codec {name!r}: {e}") from None


__all__ = ["Codec", "CodecError", "CODECS", "load_codec", "resolve_device"]
