"""The one training entry point, on CPU or GPU.

    torchrun --nproc-per-node N -m launch.pretrain --config configs/<recipe>.yaml [dotted.key=value ...]

Exit codes follow megatron_tts.exit_codes: 0 done, 3 fatal (bad config or data: do not
requeue), 75 requeue (SIGTERM, SIGINT or SIGUSR1: a committed checkpoint was saved at the next
step boundary; or a hang caught by the watchdog), 1 any other failure. Each process also writes
its code to RUN_DIR/exit/rank_XXXXX.json (torchrun's own code is 1 whenever a worker fails).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from megatron_tts import signals
from megatron_tts.exit_codes import EXIT_CRASH, EXIT_FATAL, exit_record_path, record_exit


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the inputs are wrong: reported in one line, never as a traceback."""
    from data_pipeline.layouts import LayoutError
    from data_pipeline.loader import DataConfigError
    from data_pipeline.shards import ShardError
    from data_pipeline.tokenizer import TokenizerError
    from megatron_tts.autotune import AutotuneError
    from megatron_tts.checkpoint import CheckpointError
    from megatron_tts.config import ConfigError
    from megatron_tts.resume import ResumeError
    from megatron_tts.run_lock import RunDirError, RunDirLocked
    from megatron_tts.train.evaluate import ValidationOverlap

    return (ConfigError, DataConfigError, TokenizerError, LayoutError, ShardError, ResumeError, CheckpointError,
            RunDirLocked, RunDirError, ValidationOverlap, AutotuneError)


def quiet_imports() -> None:
    """megatron-core warns at import about every optional kernel it falls back from (apex, TE,
    triton, ...); our own startup line states what is in use."""
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*(Apex|Transformer Engine|absl).*")


def main(argv: list[str] | None = None) -> int:
    # First: a stop signal during the imports and start-up below must not kill the process
    # (the default action); it is acted on at the first step boundary.
    signals.install()
    parser = argparse.ArgumentParser(prog="python -m launch.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    quiet_imports()
    user_errors = _user_errors()
    run_dir, rank = None, int(os.environ.get("RANK", 0))
    try:
        from megatron_tts.config import load_config
        from megatron_tts.train import run_training

        cfg = load_config(args.config, args.overrides)
        run_dir = cfg.train.run_dir
        # run_training clears this rank's old exit record once it holds the run directory's lock,
        # and writes RUN_DIR/exit/rank_XXXXX.json when it ends.
        return run_training(cfg)
    except user_errors as e:
        # Every rank reports: an input error seen by one rank only must not be silent.
        prefix = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        if _may_record(run_dir):
            record_exit(run_dir, rank, EXIT_FATAL, error=str(e)[:2000])
        return EXIT_FATAL
    except BaseException as e:
        if _may_record(run_dir) and not os.path.exists(exit_record_path(run_dir, rank)):
            record_exit(run_dir, rank, EXIT_CRASH, error=repr(e)[:2000])  # failed during set-up
        raise
    finally:
        signals.ignore_from_now()  # the code is decided: a late signal must not turn it into -15


def _may_record(run_dir: str | None) -> bool:
    """An exit record goes into the run directory unless another live job holds it (a job refused
    by the lock, or one that failed before taking it, must not write over the holder's record)."""
    if run_dir is None or not os.path.isdir(run_dir):
        return run_dir is not None
    from megatron_tts.run_lock import held_by_another_job

    return held_by_another_job(run_dir) is None


def _exit(code: int) -> None:
    """Exit with `code`, whatever helper processes are still around.

    megatron-core's checkpoint writers start multiprocessing helpers, shielded from stop
    signals (megatron_tts.signals); Python's atexit joins such children and can wait forever
    for one that never quits, leaving a finished job hanging with its code unreported.
    Everything of ours was closed in run_training's `finally`."""
    import logging
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # argparse errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = EXIT_CRASH
    _exit(code)
