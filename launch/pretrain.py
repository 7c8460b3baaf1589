"""The one training entry point, on CPU or GPU.

    torchrun --nproc-per-node N -m launch.pretrain --config configs/<recipe>.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from megatron_tts.exit_codes import EXIT_FATAL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)

    from megatron_tts.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL

    from megatron_tts.train import run_training

    try:
        return run_training(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
