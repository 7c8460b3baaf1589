"""The one training entry point, on CPU or GPU.

    torchrun --nproc-per-node N -m launch.pretrain --config configs/<recipe>.yaml [dotted.key=value ...]

Exit codes follow megatron_tts.exit_codes: 0 done, 3 fatal (bad config or data: do not
requeue), 1 any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from megatron_tts.exit_codes import EXIT_FATAL


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the inputs are wrong: reported in one line, never as a traceback."""
    from data_pipeline.layouts import LayoutError
    from data_pipeline.loader import DataConfigError
    from data_pipeline.shards import ShardError
    from data_pipeline.tokenizer import TokenizerError
    from megatron_tts.config import ConfigError

    return ConfigError, DataConfigError, TokenizerError, LayoutError, ShardError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    # megatron-core warns at import about every optional kernel it falls back from (apex, TE,
    # triton, ...); our own startup line states what is in use.
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*(Apex|Transformer Engine|absl).*")
    user_errors = _user_errors()
    try:
        from megatron_tts.config import load_config
        from megatron_tts.train import run_training

        return run_training(load_config(args.config, args.overrides))
    except user_errors as e:
        # Every rank reports: an input error seen by one rank only must not be silent.
        prefix = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
