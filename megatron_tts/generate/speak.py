"""Hear a trained model on sentences it trained on, and score it against the reference codes:

    python -m megatron_tts.generate.speak RUN_DIR --data DATASET --out speech.wav [--count N]

Greedy decoding of the first sample's transcript is written to --out; for N samples the sampled
codes are compared with the dataset's codes position by position (a missing or extra frame
counts as a miss): the token accuracy of memorisation, which ``make demo`` prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_tts.generate.quiet import quiet

import numpy as np


def token_accuracy(got: np.ndarray, want: np.ndarray) -> tuple[int, int]:
    """(matching positions, positions) over the longer of the two code rows [n_q, T]."""
    n = max(got.shape[1], want.shape[1])
    g = np.full((want.shape[0], n), -1)
    w = np.full((want.shape[0], n), -2)
    g[:, : got.shape[1]] = got[: want.shape[0]]
    w[:, : want.shape[1]] = want
    return int((g == w).sum()), int(w.size)


def main(argv: Optional[list[str]] = None) -> int:
    quiet()
    p = argparse.ArgumentParser(prog="python -m megatron_tts.generate.speak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--data", required=True, help="the training dataset (its samples are the references)")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=20, help="samples scored (the first is written to --out)")
    a = p.parse_args(argv)
    from data_pipeline.shards import DatasetIndex, read_shard
    from megatron_tts.generate.audio import AudioError, codec_for, write_wav
    from megatron_tts.generate.model import load, prompt_ids, to_codes
    from megatron_tts.generate.sample import Sampling, generate

    try:
        lm = load(a.run)
        codec = codec_for(lm, None, a.data)
        refs = []
        for url in DatasetIndex.load(a.data).shard_urls():
            refs.extend(read_shard(url))
            if len(refs) >= a.count:
                break
    except (AudioError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    hits = total = 0
    for i, ref in enumerate(refs[: a.count]):
        ids, _ = generate(lm, prompt_ids(lm, ref.text), Sampling(greedy=True, max_tokens=ref.codes.size + 50))
        codes = to_codes(lm, ids)
        h, t = token_accuracy(codes, np.asarray(ref.codes))
        hits, total = hits + h, total + t
        if i == 0:
            audio = codec.decode(codes) if codes.shape[1] else np.zeros(codec.sample_rate // 10, np.float32)
            write_wav(a.out, audio, codec.sample_rate)
            print(f"the model says \"{ref.text}\": {a.out} ({len(audio) / codec.sample_rate:.2f} s)")
    print(f"greedy codes match the reference codes for {100.0 * hits / max(total, 1):.1f}% of frames "
          f"({hits} of {total}, {min(len(refs), a.count)} training sentences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
