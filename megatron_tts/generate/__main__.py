"""python -m megatron_tts.generate --checkpoint RUN_DIR|CHECKPOINT|HF_DIR --text "..." --out speech.wav

Samples speech tokens for a text (greedy, or temperature / top-k / top-p, seeded) with a KV cache,
framed as in training (LLaSA's chat framing or the plain one), and decodes them with the run's
codec into a wav. ``--prompt-audio WAV --prompt-text TEXT``: LLaSA-style voice continuation (the
prompt's codes follow SPEECH_GENERATION_START, its transcript precedes the text). ``--print-ids``
prints the sampled speech codes on one line. Exit 0 on success, 3 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_tts.generate.quiet import quiet


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_tts.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, or Hugging Face model dir")
    p.add_argument("--text", required=True)
    p.add_argument("--out", help="the wav to write (omit with --print-ids to only sample)")
    p.add_argument("--prompt-audio", help="a wav to continue the voice of")
    p.add_argument("--prompt-text", help="the transcript of --prompt-audio")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--any-token", action="store_true",
                   help="sample from the whole vocabulary (default: speech tokens and SPEECH_GENERATION_END only)")
    p.add_argument("--codec", help="codec name (default: the one recorded in training)")
    p.add_argument("--codec-path", help="the codec's weights directory (default: the training dataset, for the "
                                        "demo codec)")
    p.add_argument("--print-ids", action="store_true", help="print the sampled speech codes, one line")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    quiet()
    args = parser().parse_args(argv)
    from megatron_tts.generate.audio import AudioError, synthesize

    if not args.out and not args.print_ids:
        print("error: give --out WAV (and/or --print-ids)", file=sys.stderr)
        return 3
    if bool(args.prompt_audio) != bool(args.prompt_text):
        print("error: --prompt-audio and --prompt-text go together", file=sys.stderr)
        return 3
    try:
        r = synthesize(args)
    except (AudioError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if args.print_ids:
        print(" ".join(str(int(c)) for c in r["codes"].reshape(-1)))
    if args.out:
        print(f"wrote {args.out}: {r['seconds']:.2f} s of audio, {r['frames']} frames ({r['stop']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
