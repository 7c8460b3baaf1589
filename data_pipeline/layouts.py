"""Token layouts: how a (text ids, codec codes) sample becomes one training sequence.

Shards store raw codec codes ``[n_q, T]`` without offsets; everything model-specific
(vocab offsets, special-token framing, interleaving, loss targets) happens here, in the
loader, so one token shard serves every layout.

Vocabulary (:class:`VocabLayout`)::

    [0, text_vocab_size)                         text ids (the text tokenizer's vocab)
    [text_vocab_size, speech_offset)             special tokens, in ``special_tokens`` order
    [speech_offset, vocab_size)                  speech ids: speech_offset + k * codebook_size + code

With the defaults (LLaSA: Llama-3 text vocab 128256, 8 special tokens, one 65536-entry
xcodec2 codebook) the special ids are 128256..128263, speech id = 128264 + code and the
vocab size is 193800, identical to the released LLaSA checkpoints.

Sequence (both implemented layouts)::

    TEXT_UNDERSTANDING_START, *text, TEXT_UNDERSTANDING_END,
    SPEECH_GENERATION_START, *speech, SPEECH_GENERATION_END

Each position carries a segment code (index into :data:`SEGMENTS`), and the target mask is
``segment in loss_segments``.  The LLaSA default trains on the speech ids and
SPEECH_GENERATION_END only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

__all__ = [
    "LLASA_SPECIAL_TOKENS",
    "SEGMENTS",
    "SEGMENT_INDEX",
    "DEFAULT_LOSS_SEGMENTS",
    "LAYOUTS",
    "LayoutError",
    "VocabLayout",
    "Encoded",
    "Layout",
    "LlasaLayout",
    "FlattenedLayout",
    "SNAC_SLOTS",
    "snac_to_slots",
    "slots_to_snac",
    "build_layout",
]

LLASA_SPECIAL_TOKENS: list[str] = [
    "<|TEXT_GENERATION_START|>",
    "<|TEXT_GENERATION_END|>",
    "<|TEXT_UNDERSTANDING_START|>",
    "<|TEXT_UNDERSTANDING_END|>",
    "<|SPEECH_GENERATION_START|>",
    "<|SPEECH_GENERATION_END|>",
    "<|SPEECH_UNDERSTANDING_START|>",
    "<|SPEECH_UNDERSTANDING_END|>",
]

SEGMENTS: tuple[str, ...] = ("text_start", "text", "text_end", "speech_start", "speech", "speech_end", "template")
SEGMENT_INDEX: dict[str, int] = {name: i for i, name in enumerate(SEGMENTS)}
DEFAULT_LOSS_SEGMENTS: tuple[str, ...] = ("speech", "speech_end")
# LLaSA's chat-framed recipe trains from SPEECH_GENERATION_START to the end (eos excluded)
CHAT_LOSS_SEGMENTS: tuple[str, ...] = ("speech_start", "speech", "speech_end", "template")

_TEXT_START = "<|TEXT_UNDERSTANDING_START|>"
_TEXT_END = "<|TEXT_UNDERSTANDING_END|>"
_SPEECH_START = "<|SPEECH_GENERATION_START|>"
_SPEECH_END = "<|SPEECH_GENERATION_END|>"
_FRAMING_TOKENS = (_TEXT_START, _TEXT_END, _SPEECH_START, _SPEECH_END)

# Segment code of each of the 6 runs of a framed sequence, in order (see _FramedLayout).
_RUN_SEGMENTS = np.arange(len(SEGMENTS), dtype=np.int8)


class LayoutError(ValueError):
    """A sample does not fit the configured vocab/layout (bad code, text id, n_q, ...)."""


@dataclass(frozen=True)
class VocabLayout:
    """Id ranges of the model vocabulary: text, then special tokens, then speech codes.

    Attributes:
        text_vocab_size: size of the text tokenizer vocab (128256 for Llama-3).
        special_tokens: names of the special tokens, appended after the text vocab in this
            order; defaults to LLaSA's 8.
        n_codebooks: number of speech id blocks (codebooks, or slots for the flattened layout).
        codebook_size: entries per codebook.
    """

    text_vocab_size: int
    special_tokens: list[str] = field(default_factory=lambda: list(LLASA_SPECIAL_TOKENS))
    n_codebooks: int = 1
    codebook_size: int = 65536

    def __post_init__(self) -> None:
        specials = list(self.special_tokens)
        object.__setattr__(self, "special_tokens", specials)
        for attr in ("text_vocab_size", "n_codebooks", "codebook_size"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise LayoutError(f"VocabLayout.{attr} must be a positive int, got {v!r}")
            object.__setattr__(self, attr, int(v))
        if any(not isinstance(s, str) or not s for s in specials):
            raise LayoutError(f"special token names must be non-empty strings, got {specials!r}")
        if len(set(specials)) != len(specials):
            dupes = sorted({s for s in specials if specials.count(s) > 1})
            raise LayoutError(f"duplicate special token names: {dupes}")

    @property
    def speech_offset(self) -> int:
        """First speech id (= text_vocab_size + number of special tokens)."""
        return self.text_vocab_size + len(self.special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids actually used (before padding for tensor parallelism)."""
        return self.speech_offset + self.n_codebooks * self.codebook_size

    def special_id(self, name: str) -> int:
        try:
            return self.text_vocab_size + self.special_tokens.index(name)
        except ValueError:
            raise LayoutError(
                f"unknown special token {name!r}; this vocab has {self.special_tokens}"
            ) from None

    def speech_id(self, code: int, codebook: int = 0) -> int:
        if not 0 <= codebook < self.n_codebooks:
            raise LayoutError(f"codebook {codebook} out of range [0, {self.n_codebooks})")
        if not 0 <= code < self.codebook_size:
            raise LayoutError(f"code {code} out of range [0, {self.codebook_size})")
        return self.speech_offset + codebook * self.codebook_size + int(code)

    def padded_vocab_size(self, multiple: int) -> int:
        """``vocab_size`` rounded up to a multiple of ``multiple`` (pass 128 * TP).

        The extra rows are never produced by a layout; they only make the embedding and
        output layer shard evenly across tensor-parallel ranks.
        """
        if isinstance(multiple, bool) or int(multiple) != multiple or multiple < 1:
            raise LayoutError(f"padding multiple must be a positive int, got {multiple!r}")
        m = int(multiple)
        return -(-self.vocab_size // m) * m

    @property
    def speech_range(self) -> tuple[int, int]:
        """``[start, end)`` of all speech ids."""
        return self.speech_offset, self.vocab_size

    def to_dict(self) -> dict:
        """JSON-serialisable form (for checkpoint / dataset metadata)."""
        return {
            "text_vocab_size": self.text_vocab_size,
            "special_tokens": list(self.special_tokens),
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "speech_offset": self.speech_offset,
            "vocab_size": self.vocab_size,
        }


@dataclass
class Encoded:
    """One encoded sample.

    Attributes:
        ids: int64 ``[L]`` token ids.
        target_mask: bool ``[L]``; True where ``ids[i]`` is a token the model is trained to
            predict from position ``i - 1``.  The loader applies the usual shift
            (labels = ids[1:], mask[1:]); ``target_mask[0]`` only matters when samples are
            packed without a document boundary in the attention/loss.
        segment: int8 ``[L]``, index into :data:`SEGMENTS`.
    """

    ids: np.ndarray
    target_mask: np.ndarray
    segment: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[-1])


def _normalise_loss_segments(loss_segments: Sequence[str] | str) -> tuple[str, ...]:
    # A bare string (e.g. from a YAML scalar) would otherwise be split into characters.
    names = (loss_segments,) if isinstance(loss_segments, str) else tuple(loss_segments)
    unknown = [n for n in names if n not in SEGMENT_INDEX]
    if unknown:
        raise ValueError(
            f"unknown loss segment(s) {unknown}; valid names: {', '.join(SEGMENTS)}"
        )
    return tuple(dict.fromkeys(names))


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise LayoutError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


class Layout(ABC):
    """Maps (text ids, codes ``[n_q, T]``) to a training sequence.

    Single-stream layouts (``n_streams = 1``, everything implemented here) return 1-D ids.
    A delay-pattern layout (MusicGen / VoiceCraft / Moshi) fits beside them with
    ``n_streams = K``: K parallel streams where cell ``(k, t) = c_k[t - d_k]`` (``d_k = k`` by
    default) and empty cells get a special padding id, consumed by a model that sums K
    embeddings per position and has K output heads (loss ``sum_k w_k * CE_k``).  Its
    :class:`Encoded` would carry ids of shape ``[K, L]`` (and a per-stream target mask of the
    same shape), while ``segment`` stays ``[L]`` and ``length()`` still returns ``L``, so
    packing and padding code that works on the last axis needs no change.

    Attributes:
        name: registry name (see :func:`build_layout`).
        n_streams: number of parallel token streams per position.
        vocab: the vocab id ranges.
        loss_segments: segment names whose tokens are targets.
    """

    name: ClassVar[str]
    n_streams: ClassVar[int] = 1

    def __init__(
        self, vocab: VocabLayout, loss_segments: Sequence[str] | str = DEFAULT_LOSS_SEGMENTS
    ) -> None:
        self.vocab = vocab
        self.loss_segments = _normalise_loss_segments(loss_segments)
        self._target_lut = np.zeros(len(SEGMENTS), dtype=bool)
        for s in self.loss_segments:
            self._target_lut[SEGMENT_INDEX[s]] = True

    @abstractmethod
    def length(self, n_text_tokens: int, n_frames: int, n_q: int) -> int:
        """Sequence length ``encode`` would produce, without building it (for packing plans).

        Raises :class:`LayoutError` for the same ``n_q`` that ``encode`` rejects.
        """

    def lengths(self, n_text_tokens: np.ndarray, n_frames: np.ndarray, n_q: int) -> np.ndarray:
        """:meth:`length` of many samples of one codec (int64 array); LayoutError for ``n_q``."""
        return np.fromiter((self.length(int(t), int(f), n_q) for t, f in zip(n_text_tokens, n_frames)),
                           np.int64, len(n_frames))

    @abstractmethod
    def encode(self, text_ids: Sequence[int] | np.ndarray, codes: np.ndarray) -> Encoded:
        """Build the sequence; :class:`LayoutError` for bad codes, text ids or ``n_q``."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab.vocab_size}, "
            f"loss_segments={self.loss_segments})"
        )


class _FramedLayout(Layout):
    """Shared TEXT_UNDERSTANDING/SPEECH_GENERATION framing; subclasses map codes to speech ids."""

    def __init__(
        self, vocab: VocabLayout, loss_segments: Sequence[str] | str = DEFAULT_LOSS_SEGMENTS, framing=None
    ) -> None:
        super().__init__(vocab, loss_segments)
        self.framing = framing  # data_pipeline.chat.ChatFrame (model.framing=llasa_chat) or None
        missing = [t for t in _FRAMING_TOKENS if t not in vocab.special_tokens]
        if missing:
            raise LayoutError(
                f"layout {self.name!r} needs special tokens {missing} in the vocab "
                f"(vocab special_tokens = {vocab.special_tokens})"
            )
        self._text_start = vocab.special_id(_TEXT_START)
        self._text_end = vocab.special_id(_TEXT_END)
        self._speech_start = vocab.special_id(_SPEECH_START)
        self._speech_end = vocab.special_id(_SPEECH_END)

    @abstractmethod
    def _check_n_q(self, n_q: int) -> None: ...

    @abstractmethod
    def _speech_ids(self, codes: np.ndarray) -> np.ndarray:
        """Validated integer codes ``[n_q, T]`` -> 1-D int64 speech ids."""

    def length(self, n_text_tokens: int, n_frames: int, n_q: int) -> int:
        n_text = _check_count("n_text_tokens", n_text_tokens)
        n_frames = _check_count("n_frames", n_frames)
        n_q = _check_count("n_q", n_q)
        self._check_n_q(n_q)
        return 4 + n_text + n_q * n_frames + (self.framing.extra if self.framing is not None else 0)

    def lengths(self, n_text_tokens: np.ndarray, n_frames: np.ndarray, n_q: int) -> np.ndarray:
        self._check_n_q(_check_count("n_q", n_q))  # (vectorised: the packing plan's hot path)
        return 4 + np.asarray(n_text_tokens, np.int64) + n_q * np.asarray(n_frames, np.int64)

    def _validate_text(self, text_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        text = np.asarray(text_ids)
        if text.ndim == 1 and text.size == 0:
            # np.asarray([]) is float64; an empty transcript is valid.
            return np.empty(0, dtype=np.int64)
        if text.ndim != 1 or not np.issubdtype(text.dtype, np.integer):
            raise LayoutError(
                f"text_ids must be a 1-D sequence of ints, got shape {text.shape} dtype {text.dtype}"
            )
        lo, hi = int(text.min()), int(text.max())
        if lo < 0 or hi >= self.vocab.text_vocab_size:
            bad = lo if lo < 0 else hi
            raise LayoutError(
                f"text id {bad} outside the text vocab range [0, {self.vocab.text_vocab_size}); "
                "the tokenizer does not match VocabLayout.text_vocab_size"
            )
        return text.astype(np.int64, copy=False)

    def _validate_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise LayoutError(f"codes must have shape [n_q, T], got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise LayoutError(f"codes must be integers, got dtype {codes.dtype}")
        self._check_n_q(codes.shape[0])
        if codes.size:
            cb = self.vocab.codebook_size
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= cb:
                bad_mask = (codes < 0) | (codes >= cb)
                q, t = (int(i) for i in np.argwhere(bad_mask)[0])
                raise LayoutError(
                    f"code {int(codes[q, t])} at (codebook {q}, frame {t}) outside the codebook "
                    f"range [0, {cb}); the codec's codebook_size does not match the vocab layout"
                )
        return codes

    def encode(self, text_ids: Sequence[int] | np.ndarray, codes: np.ndarray) -> Encoded:
        text = self._validate_text(text_ids)
        speech = self._speech_ids(self._validate_codes(codes))
        n_text, n_speech = text.shape[0], speech.shape[0]
        ids = np.empty(n_text + n_speech + 4, dtype=np.int64)
        ids[0] = self._text_start
        ids[1 : 1 + n_text] = text
        ids[1 + n_text] = self._text_end
        ids[2 + n_text] = self._speech_start
        ids[3 + n_text : 3 + n_text + n_speech] = speech
        ids[-1] = self._speech_end
        segment = np.repeat(_RUN_SEGMENTS[:6], (1, n_text, 1, 1, n_speech, 1))
        if self.framing is not None:
            return self._frame(ids, segment, n_text)
        return Encoded(ids=ids, target_mask=self._target_lut[segment], segment=segment)

    def _frame(self, ids: np.ndarray, segment: np.ndarray, n_text: int) -> Encoded:
        """LLaSA's chat framing around the plain sequence (data_pipeline.chat). The targets are the
        tokens from SPEECH_GENERATION_START on (of the loss segments), never an eos."""
        f = self.framing
        cut = 2 + n_text  # [TUS text TUE] | [SGS speech SGE]
        pieces = [np.asarray(f.before_text, dtype=np.int64), ids[:cut], np.asarray(f.between, dtype=np.int64),
                  ids[cut:], np.asarray(f.after_speech, dtype=np.int64)]
        template = SEGMENT_INDEX["template"]
        segs = [np.full(len(f.before_text), template, np.int8), segment[:cut],
                np.full(len(f.between), template, np.int8), segment[cut:],
                np.full(len(f.after_speech), template, np.int8)]
        ids, segment = np.concatenate(pieces), np.concatenate(segs)
        target = self._target_lut[segment] & (ids != f.eos_id)
        start = len(f.before_text) + cut + len(f.between)
        target[:start] = False  # the prompt (user turn, assistant header) is never a target
        return Encoded(ids=ids, target_mask=target, segment=segment)


class LlasaLayout(_FramedLayout):
    """LLaSA TTS layout: one codebook (xcodec2), speech id = speech_offset + code.

    ``[TEXT_UNDERSTANDING_START, *text, TEXT_UNDERSTANDING_END, SPEECH_GENERATION_START,
    *speech, SPEECH_GENERATION_END]``.  With the default ``loss_segments`` this reproduces
    LLaSA's labels: -100 up to and including SPEECH_GENERATION_START, trained on the speech
    ids and SPEECH_GENERATION_END.  (LLaSA additionally wraps this in the Llama-3 chat
    template; that prompt text is not part of this layout.)

    Codes must have ``n_q == 1``: multi-codebook codecs need :class:`FlattenedLayout` (or a
    delay-pattern layout), so silently keeping only codebook 0 is refused.
    """

    name: ClassVar[str] = "llasa"

    def __init__(
        self, vocab: VocabLayout, loss_segments: Sequence[str] | str = DEFAULT_LOSS_SEGMENTS, framing=None
    ) -> None:
        if vocab.n_codebooks != 1:
            raise LayoutError(
                f"layout 'llasa' uses a single codebook but the vocab has n_codebooks="
                f"{vocab.n_codebooks}; use layout 'flattened' for multi-codebook codecs"
            )
        super().__init__(vocab, loss_segments, framing)

    def _check_n_q(self, n_q: int) -> None:
        if n_q != 1:
            raise LayoutError(
                f"layout 'llasa' needs codes with n_q == 1 (one codebook), got n_q={n_q}; "
                "use layout 'flattened' for multi-codebook codecs"
            )

    def _speech_ids(self, codes: np.ndarray) -> np.ndarray:
        return codes[0].astype(np.int64) + self.vocab.speech_offset


class FlattenedLayout(_FramedLayout):
    """Flattened multi-codebook layout (Orpheus/SNAC style): frame-major interleave of slots.

    Codes ``[n_q, T]`` are emitted as::

        for t in range(T):
            for slot in range(n_q):
                speech_offset + slot * codebook_size + codes[slot, t]

    so each slot has its own id block and ``n_q`` must equal ``vocab.n_codebooks``.  Framing
    and loss segments are the same as :class:`LlasaLayout`.

    SNAC (24 kHz, 3 levels x 4096 at ~12/23/47 Hz) must be stored as 7 slot rows per coarse
    frame ``f`` in Orpheus order::

        [L0[f], L1[2f], L2[4f], L2[4f+1], L1[2f+1], L2[4f+2], L2[4f+3]]

    (use :func:`snac_to_slots`), with ``VocabLayout(n_codebooks=7, codebook_size=4096)``.
    The speech ids are then exactly Orpheus's ``base + 4096 * slot + code`` with
    ``base = speech_offset``; Orpheus's base is 128266 (128256 + 10 specials), so a vocab with
    10 special tokens reproduces its speech ids, while the surrounding framing tokens are
    this project's, not Orpheus's start_of_human/start_of_ai markers.  Unlike Orpheus's
    preprocessing, no frames are dropped when L0 repeats.
    """

    name: ClassVar[str] = "flattened"

    def __init__(
        self, vocab: VocabLayout, loss_segments: Sequence[str] | str = DEFAULT_LOSS_SEGMENTS, framing=None
    ) -> None:
        super().__init__(vocab, loss_segments, framing)
        self._slot_offsets = (
            vocab.speech_offset + np.arange(vocab.n_codebooks, dtype=np.int64) * vocab.codebook_size
        )

    def _check_n_q(self, n_q: int) -> None:
        if n_q != self.vocab.n_codebooks:
            raise LayoutError(
                f"layout 'flattened' needs codes with n_q == vocab.n_codebooks "
                f"({self.vocab.n_codebooks} slots), got n_q={n_q}"
            )

    def _speech_ids(self, codes: np.ndarray) -> np.ndarray:
        # [n_q, T] -> [T, n_q] then C-order ravel = frame-major, slot-minor.
        return (codes.T.astype(np.int64) + self._slot_offsets).ravel()


SNAC_SLOTS = 7
"""Slot rows per SNAC coarse frame (1 + 2 + 4 codes over the 3 levels)."""


def snac_to_slots(l0: np.ndarray, l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """Rearrange SNAC's 3 levels into 7 slot rows ``[7, T0]`` in Orpheus order.

    Args:
        l0: ``[T0]`` coarse codes; ``l1``: ``[2*T0]``; ``l2``: ``[4*T0]``.

    Returns:
        ``slots[:, f] = [L0[f], L1[2f], L2[4f], L2[4f+1], L1[2f+1], L2[4f+2], L2[4f+3]]``,
        dtype = common dtype of the inputs.  Store this as the shard's codes and encode it
        with :class:`FlattenedLayout`.
    """
    a0, a1, a2 = (np.asarray(x) for x in (l0, l1, l2))
    for lvl, a in enumerate((a0, a1, a2)):
        if a.ndim != 1:
            raise LayoutError(f"SNAC level {lvl} must be 1-D, got shape {a.shape}")
    t0 = a0.shape[0]
    if a1.shape[0] != 2 * t0 or a2.shape[0] != 4 * t0:
        raise LayoutError(
            f"SNAC levels must have lengths T0, 2*T0, 4*T0; got {a0.shape[0]}, {a1.shape[0]}, "
            f"{a2.shape[0]}"
        )
    slots = np.empty((SNAC_SLOTS, t0), dtype=np.result_type(a0, a1, a2))
    slots[0] = a0
    slots[1] = a1[0::2]
    slots[2] = a2[0::4]
    slots[3] = a2[1::4]
    slots[4] = a1[1::2]
    slots[5] = a2[2::4]
    slots[6] = a2[3::4]
    return slots


def slots_to_snac(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`snac_to_slots`: ``[7, T0]`` -> (L0 ``[T0]``, L1 ``[2*T0]``, L2 ``[4*T0]``)."""
    s = np.asarray(slots)
    if s.ndim != 2 or s.shape[0] != SNAC_SLOTS:
        raise LayoutError(f"SNAC slots must have shape [7, T0], got {s.shape}")
    l0 = s[0].copy()
    l1 = np.stack([s[1], s[4]], axis=1).reshape(-1)
    l2 = np.stack([s[2], s[3], s[5], s[6]], axis=1).reshape(-1)
    return l0, l1, l2


LAYOUTS: dict[str, type[Layout]] = {
    LlasaLayout.name: LlasaLayout,
    FlattenedLayout.name: FlattenedLayout,
}


def build_layout(
    name: str,
    vocab: VocabLayout,
    loss_segments: Sequence[str] | str = DEFAULT_LOSS_SEGMENTS,
    framing=None,
) -> Layout:
    """Construct a layout by name (``"llasa"`` or ``"flattened"``); ``framing``: a
    data_pipeline.chat.ChatFrame for LLaSA's chat-framed sequences."""
    key = str(name).strip().lower()
    if key not in LAYOUTS:
        raise LayoutError(f"unknown layout {name!r}; valid layouts: {', '.join(LAYOUTS)}")
    if framing is not None:
        return LAYOUTS[key](vocab, loss_segments, framing)
    return LAYOUTS[key](vocab, loss_segments)
