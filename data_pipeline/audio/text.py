"""Transcript normalisation: Unicode NFKC, whitespace collapsed, plus an optional
language-specific hook (``text_normalizer=package.module:function``, str -> str)."""
from __future__ import annotations

import importlib
import re
import unicodedata
from typing import Callable

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, every run of whitespace (newlines, tabs, NBSP after NFKC) to one space, stripped;
    control characters dropped."""
    t = unicodedata.normalize("NFKC", text)
    t = "".join(c for c in t if c in "\t\n\r " or unicodedata.category(c)[0] != "C")
    return _WS.sub(" ", t).strip()


def load_normalizer(spec: str | None) -> Callable[[str], str]:
    """``None`` -> :func:`normalize_text`; ``"pkg.mod:func"`` -> that function applied after it."""
    if not spec:
        return normalize_text
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise ValueError(f"text_normalizer={spec!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"text_normalizer={spec!r}: {type(e).__name__}: {e}") from None

    def both(text: str) -> str:
        return normalize_text(str(fn(normalize_text(text))))

    return both
