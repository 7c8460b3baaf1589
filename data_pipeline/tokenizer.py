"""Text tokenizers for the speech-LM data pipeline.

Two implementations of the :class:`TextTokenizer` protocol:

* :class:`ByteTokenizer` -- UTF-8 bytes, vocab 256, no files needed (tests, toy runs).
* :class:`HFTokenizer` -- a Hugging Face ``tokenizers`` ``tokenizer.json`` read from a
  local path (e.g. the Llama-3 tokenizer shipped with a LLaSA checkpoint).  It never
  downloads anything: a hub model id or URL is rejected instead of resolved.

Text ids produced here are *raw* text ids in ``[0, vocab_size)``; the layout
(:mod:`data_pipeline.layouts`) adds the special-token framing and speech offsets.  Neither
tokenizer adds special tokens (BOS/EOS, chat template) itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = [
    "TextTokenizer",
    "TokenizerError",
    "ByteTokenizer",
    "HFTokenizer",
    "TOKENIZER_KINDS",
    "build_tokenizer",
]

TOKENIZER_KINDS = ("byte", "hf")
_TOKENIZER_FILE = "tokenizer.json"
_INSTALL_HINT = "pip install tokenizers"


class TokenizerError(ValueError):
    """A tokenizer could not be built or does not match the model configuration."""


@runtime_checkable
class TextTokenizer(Protocol):
    """What the data pipeline needs from a text tokenizer.

    ``fingerprint`` identifies the exact vocabulary/merges so that cached or packed data can
    be tied to the tokenizer that produced it.
    """

    name: str
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 byte tokenizer: one id per byte, vocab size 256."""

    name: ClassVar[str] = "byte"
    vocab_size: ClassVar[int] = 256
    fingerprint: ClassVar[str] = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Inverse of :meth:`encode`; invalid UTF-8 (e.g. a truncated sequence) becomes U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _resolve_tokenizer_file(path: str | os.PathLike[str]) -> Path:
    raw = os.fspath(path)
    if "://" in raw:
        raise TokenizerError(
            f"HF tokenizer path {raw!r} is a URL; only local paths are supported "
            f"(copy the {_TOKENIZER_FILE} to local disk first, nothing is downloaded)"
        )
    p = Path(raw).expanduser()
    if p.is_dir():
        candidate = p / _TOKENIZER_FILE
        if not candidate.is_file():
            raise TokenizerError(
                f"HF tokenizer directory {str(p)!r} has no {_TOKENIZER_FILE}; point the tokenizer "
                f"path at a directory containing {_TOKENIZER_FILE} or at the file itself "
                "(slow/sentencepiece-only tokenizers must be converted to tokenizer.json first)"
            )
        return candidate
    if p.is_file():
        return p
    raise TokenizerError(
        f"HF tokenizer path {str(p)!r} does not exist; expected a local {_TOKENIZER_FILE} "
        f"or a directory containing one (hub model ids are not resolved or downloaded)"
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local ``tokenizer.json``.

    Args:
        path: the ``tokenizer.json`` file, or a directory containing it.

    Attributes:
        path: resolved path of the ``tokenizer.json`` that was loaded.
        vocab_size: ``get_vocab_size(with_added_tokens=True)``, i.e. including added tokens
            (128256 for the Llama-3 tokenizer), which is the text vocab the model embeds.
        fingerprint: sha256 hex digest of the ``tokenizer.json`` bytes.

    ``encode`` never adds special tokens: a ``post_processor`` in the file that would insert
    BOS/EOS is bypassed, because the layout owns all framing tokens.
    """

    name: str = "hf"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        file = _resolve_tokenizer_file(path)
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise TokenizerError(
                f"loading the HF tokenizer at {str(file)!r} needs the `tokenizers` package "
                f"(it does not need torch): {_INSTALL_HINT}"
            ) from e
        try:
            self._tok: Any = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise TokenizerError(f"could not parse HF tokenizer file {str(file)!r}: {e}") from e
        self.path: str = str(file)
        self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.fingerprint: str = _sha256_file(file)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (uses the library's native thread pool)."""
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def build_tokenizer(
    kind: str,
    path: str | os.PathLike[str] | None = None,
    expected_vocab_size: int | None = None,
) -> TextTokenizer:
    """Build a text tokenizer and check it against the model's text vocab size.

    Args:
        kind: ``"byte"`` (``path`` is ignored) or ``"hf"`` (``path`` required).
        path: local ``tokenizer.json`` or a directory containing it.
        expected_vocab_size: the text vocab size the model/vocab layout was configured with;
            a mismatch raises :class:`TokenizerError`, because a tokenizer/vocab mismatch
            silently shifts every special-token and speech-token id.

    Raises:
        TokenizerError: unknown kind, missing path, ``tokenizers`` not installed, unreadable
            file, or vocab size mismatch (the message names the path and both sizes).
    """
    k = str(kind).strip().lower()
    tok: TextTokenizer
    if k == "byte":
        tok = ByteTokenizer()
        where = "<builtin byte tokenizer>"
    elif k == "hf":
        if path is None or os.fspath(path) == "":
            raise TokenizerError(
                "tokenizer kind 'hf' needs a path to a local tokenizer.json or its directory"
            )
        hf = HFTokenizer(path)
        tok = hf
        where = hf.path
    else:
        raise TokenizerError(
            f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}"
        )
    if expected_vocab_size is not None and tok.vocab_size != int(expected_vocab_size):
        raise TokenizerError(
            f"tokenizer {tok.name!r} at {where} has vocab_size {tok.vocab_size} but the "
            f"configured text vocab size (expected_vocab_size) is {int(expected_vocab_size)}; "
            f"use the tokenizer that matches the checkpoint, or set the text vocab size to "
            f"{tok.vocab_size} if this tokenizer is intended"
        )
    return tok
