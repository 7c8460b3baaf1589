"""Cut long recordings at silences, so that no segment is longer than ``max_s``."""
from __future__ import annotations

import numpy as np


def frame_energy_db(audio: np.ndarray, sr: int, frame_s: float = 0.02) -> np.ndarray:
    """RMS level of consecutive ``frame_s`` frames in dB relative to full scale."""
    hop = max(1, int(sr * frame_s))
    n = len(audio) // hop
    if n == 0:
        return np.zeros(0)
    frames = audio[: n * hop].astype(np.float64).reshape(n, hop)
    rms = np.sqrt((frames * frames).mean(axis=1))
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


def split_at_silences(audio: np.ndarray, sr: int, max_s: float, min_s: float = 1.0,
                      silence_db: float = -35.0, frame_s: float = 0.02) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` sample ranges covering ``audio``, each at most ``max_s`` long.

    Each cut is placed in the quietest frame (relative to the loudest, ``silence_db``) found
    between ``min_s`` and ``max_s`` after the previous cut, preferring the latest quiet frame;
    without a quiet frame there the cut falls at the quietest frame of that range."""
    n = len(audio)
    max_len, min_len = int(max_s * sr), int(min_s * sr)
    if n <= max_len:
        return [(0, n)]
    hop = max(1, int(sr * frame_s))
    db = frame_energy_db(audio, sr, frame_s)
    quiet = db <= (db.max() if db.size else 0.0) + silence_db
    cuts, start = [], 0
    while n - start > max_len:
        lo, hi = (start + min_len) // hop, (start + max_len) // hop
        window = np.arange(lo, max(lo + 1, hi))
        window = window[window < len(db)]
        if window.size == 0:
            cut = start + max_len
        else:
            q = window[quiet[window]]
            f = int(q[-1]) if q.size else int(window[np.argmin(db[window])])
            cut = min(f * hop + hop // 2, start + max_len)
        cut = max(cut, start + 1)
        cuts.append((start, cut))
        start = cut
    cuts.append((start, n))
    return cuts
