"""python -m megatron_tts.hf export RUN_DIR|CHECKPOINT_DIR --out HF_DIR [--config RECIPE] [--max-shard-gb G]

Writes a Hugging Face LlamaForCausalLM (safetensors, config.json, generation_config.json, the
extended tokenizer, speech_lm.json) from the newest verified checkpoint of a run directory, or from
the checkpoint given, of any TP/PP/DP layout, on one CPU process. Exit 0 on success, 3 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from megatron_tts.generate.quiet import quiet


def main(argv: Optional[list[str]] = None) -> int:
    quiet()
    parser = argparse.ArgumentParser(prog="python -m megatron_tts.hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a Hugging Face model from a checkpoint")
    e.add_argument("path", help="a run directory (its newest verified checkpoint) or a checkpoint directory")
    e.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    e.add_argument("--config", help="the run's recipe, when neither the checkpoint nor its run dir holds config.yaml")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5 GB)")
    args = parser.parse_args(argv)
    from megatron_tts.config import ConfigError
    from megatron_tts.hf.exporter import ExportError, export
    from megatron_tts.hf.tokenizer import TokenizerExportError

    try:
        r = export(args.path, args.out, args.config, int(args.max_shard_gb * 1e9))
    except (ExportError, ConfigError, TokenizerExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(f"exported step {r['step']} of {r['checkpoint']} -> {r['out']}: {r['tensors']} tensors in "
          f"{len(r['files'])} file(s), vocab {r['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
