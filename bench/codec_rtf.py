"""Real-time factor (seconds of audio per wall second) of each codec's encoder on one CPU thread,
and decode throughput of DALI vs soundfile, side by side in one run.

    OMP_NUM_THREADS=1 python bench/codec_rtf.py [--seconds 20] [--full-snac]

Codecs are the real architectures with random weights (speed does not depend on the weights):
SNAC 24 kHz (published config), EnCodec 24 kHz (transformers, published config, 8 books), DAC
24 kHz (transformers, published config), and the demo's mel k-means. xcodec2 is listed when it
imports. Audio: espeak-ng-like tone bursts (content does not change the cost)."""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.audio.decode import make_decoder  # noqa: E402
from data_pipeline.codecs import load_codec  # noqa: E402


def audio(sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def rtf(codec, seconds: float, clip: float = 10.0) -> float:
    clips = [audio(codec.sample_rate, clip) for _ in range(max(1, int(seconds // clip)))]
    codec.encode(clips[:1])  # warm-up
    t0 = time.perf_counter()
    codec.encode(clips)
    return len(clips) * clip / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU node")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from data_pipeline.codecs.dac import save_random_dac
    from data_pipeline.codecs.encodec import save_random_encodec
    from data_pipeline.codecs.snac import SNAC_24KHZ_CONFIG, save_random_snac

    tmp = tempfile.mkdtemp()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    specs = [("mel-kmeans", os.path.join(repo, "data", "demo", "codebook.npy")),
             ("snac", save_random_snac(os.path.join(tmp, "snac"), SNAC_24KHZ_CONFIG)),
             ("encodec", save_random_encodec(os.path.join(tmp, "encodec"))),
             ("dac", save_random_dac(os.path.join(tmp, "dac"), n_codebooks=32, downsampling_ratios=[2, 4, 5, 8],
                                     upsampling_ratios=[8, 5, 4, 2], sampling_rate=24000))]
    print(f"torch {torch.__version__}, 1 thread, {args.seconds:g} s of audio per codec (10 s clips, one batch)")
    print(f"{'codec':<12} {'RTF (audio s / wall s)':>24} {'core-hours per 250k h':>24}")
    for name, path in specs:
        r = rtf(load_codec(name, path, device=args.device), args.seconds)
        print(f"{name:<12} {r:>24.2f} {250_000 / r:>24,.0f}")
    # decode: DALI vs soundfile on the same FLAC/WAV bytes, resampled 22.05 -> 16 kHz
    items = []
    for i in range(40):
        b = io.BytesIO()
        import soundfile as sf

        sf.write(b, audio(22050, 4.0), 22050, format="FLAC" if i % 2 else "WAV")
        items.append(b.getvalue())
    for kind in ("soundfile", "dali"):
        try:
            dec, desc = make_decoder(kind, 16000, batch_size=40)
        except ValueError as e:
            print(f"decode {kind}: unavailable ({e})")
            continue
        dec.decode(items[:2])
        t0 = time.perf_counter()
        for _ in range(3):
            dec.decode(items)
        dt = (time.perf_counter() - t0) / 3
        print(f"decode {kind:<10} {len(items) * 4.0 / dt:>10.0f} audio s / wall s  ({desc})")


if __name__ == "__main__":
    main()
