"""Audio samples of a checkpoint for fixed prompts: ``python -m megatron_tts.generate.samples
--checkpoint CKPT --out RUN_DIR/samples/step_XXXXXXXX --prompts '["text", ...]'``.

Run by the training job in a side process (train/hooks.py AudioSamples), so that sampling never
stalls a step. Per prompt ``i``: ``i.wav``, ``i.json`` (text, speech codes, seconds, why sampling
stopped) and ``i.png`` (a log-magnitude spectrogram); ``samples.json`` last, atomically: a directory
without it is unfinished and never shown."""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib
from typing import Optional

from megatron_tts.generate.quiet import quiet

import numpy as np

SUMMARY = "samples.json"


def spectrogram(audio: np.ndarray, sample_rate: int, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """log-magnitude STFT [freq, time], low frequencies first."""
    x = np.asarray(audio, dtype=np.float64)
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft), axis=1)).T
    return np.log10(spec + 1e-6)


def write_png(path: str, image: np.ndarray) -> None:
    """An 8-bit grayscale PNG of image [rows, cols] scaled to its range (row 0 at the top)."""
    a = np.asarray(image, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    g = ((a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in g)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", g.shape[1], g.shape[0], 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) +
                chunk(b"IEND", b""))


def sample_checkpoint(checkpoint: str, out: str, prompts: list[str], max_tokens: int, seed: int, greedy: bool,
                      temperature: float, codec: Optional[str] = None, codec_path: Optional[str] = None) -> dict:
    from megatron_tts.generate.audio import codec_for, write_wav
    from megatron_tts.generate.model import load, prompt_ids, to_codes
    from megatron_tts.generate.sample import Sampling, generate

    t0 = time.time()
    lm = load(checkpoint)
    dec = codec_for(lm, codec, codec_path)
    os.makedirs(out, exist_ok=True)
    rows = []
    for i, text in enumerate(prompts):
        ids, stop = generate(lm, prompt_ids(lm, text),
                             Sampling(greedy=greedy, temperature=temperature, max_tokens=max_tokens, seed=seed + i))
        codes = to_codes(lm, ids)
        audio = dec.decode(codes) if codes.shape[1] else np.zeros(dec.sample_rate // 10, dtype=np.float32)
        write_wav(os.path.join(out, f"{i}.wav"), audio, dec.sample_rate)
        write_png(os.path.join(out, f"{i}.png"), spectrogram(audio, dec.sample_rate)[::-1])
        row = {"index": i, "text": text, "codes": codes.tolist(), "frames": int(codes.shape[1]),
               "seconds": len(audio) / dec.sample_rate, "stop": stop}
        with open(os.path.join(out, f"{i}.json"), "w") as f:
            json.dump(row, f)
        rows.append({k: v for k, v in row.items() if k != "codes"})
    summary = {"checkpoint": checkpoint, "prompts": rows, "seconds": round(time.time() - t0, 3),
               "sample_rate": dec.sample_rate, "time": time.time()}
    tmp = os.path.join(out, SUMMARY + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, SUMMARY))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    quiet()
    p = argparse.ArgumentParser(prog="python -m megatron_tts.generate.samples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", required=True, help="a JSON list of texts")
    p.add_argument("--max-tokens", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--codec")
    p.add_argument("--codec-path")
    a = p.parse_args(argv)
    try:
        s = sample_checkpoint(a.checkpoint, a.out, list(json.loads(a.prompts)), a.max_tokens, a.seed, a.greedy,
                              a.temperature, a.codec, a.codec_path)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"out": a.out, "seconds": s["seconds"], "prompts": len(s["prompts"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
