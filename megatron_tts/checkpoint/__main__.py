"""python -m megatron_tts.checkpoint verify PATH: check a checkpoint, or every checkpoint under a
root, without loading it (marker, manifest, sizes, sha256). Exit 0 when all verify, 1 otherwise."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from megatron_tts.checkpoint.format import COMMITTED, MANIFEST, list_checkpoints, verify


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_tts.checkpoint",
                                     description="Verify checkpoints without loading them.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check a checkpoint directory, or every checkpoint under a root")
    v.add_argument("path")
    args = parser.parse_args(argv)
    path = args.path
    targets = [path] if os.path.exists(os.path.join(path, COMMITTED)) or os.path.exists(
        os.path.join(path, MANIFEST)) else [i.path for i in list_checkpoints(path)]
    if not targets:
        print(f"{path}: no checkpoints", file=sys.stderr)
        return 1
    bad = 0
    for t in targets:
        reason = verify(t)
        print(f"{t}: {'OK' if reason is None else 'FAILED: ' + reason}")
        bad += reason is not None
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
