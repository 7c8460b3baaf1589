"""What the tokenizer refuses, each with a counter name (a per-shard report lists them all);
nothing here raises for bad data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .decode import Audio

# Every skip reason, in report order (decode-time reasons come from audio.decode).
REASONS = ("empty_file", "not_audio", "decode_error", "incomplete", "zero_length", "silent",
           "bad_sample_rate", "clipping", "too_short", "too_long", "no_transcript", "empty_transcript",
           "read_error")


@dataclass
class FilterConfig:
    min_duration: float = 0.3
    """Shortest utterance kept (s)."""
    max_duration: float = 30.0
    """Longest utterance kept (s); longer ones are skipped, or split at silences with split_long."""
    split_long: bool = False
    """Cut files longer than max_duration at silences into segments (which carry no transcript)."""
    min_segment: float = 1.0
    """split_long: shortest segment before a cut is allowed (s)."""
    max_clipped_fraction: float = 0.001
    """Skip audio with more than this fraction of samples at full scale (|x| >= 0.999)."""
    min_sample_rate: int = 8000
    """Skip audio recorded below this rate (upsampling cannot restore the band it lacks)."""
    max_sample_rate: int = 384000
    """Skip audio whose header claims more than this (a damaged or mislabelled file)."""
    require_text: bool = True
    """Skip utterances without a transcript (missing, or empty after normalisation)."""


def audio_problem(a: Audio, cfg: FilterConfig, target_rate: int) -> Optional[str]:
    """The first reason ``a`` is not kept (ignoring max_duration when it will be split), or None."""
    if a.source_samples == 0 or a.samples.size == 0:
        return "zero_length"
    if not cfg.min_sample_rate <= a.source_rate <= cfg.max_sample_rate:
        return "bad_sample_rate"
    if not np.any(a.samples):
        return "silent"
    if a.clipped_fraction > cfg.max_clipped_fraction:
        return "clipping"
    seconds = a.source_samples / a.source_rate
    if seconds < cfg.min_duration:
        return "too_short"
    if seconds > cfg.max_duration and not cfg.split_long:
        return "too_long"
    return None


def text_problem(text: Optional[str]) -> Optional[str]:
    if text is None:
        return "no_transcript"
    if not text:
        return "empty_transcript"
    return None
