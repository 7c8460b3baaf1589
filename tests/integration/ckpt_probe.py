"""Load checkpoints the way a resuming run does (Checkpointer.latest / load), all in one process.

    python -m tests.integration.ckpt_probe PATH [PATH ...]

PATH is a checkpoint directory or a checkpoint root (the newest that verifies is taken). Prints
one JSON line per PATH: {"path", "ok", "step", "loaded", "finite", "error_type", "error"}. The
model is the small test model (tests/helpers.py SMALL), in a world of one.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))


def main(paths: list[str]) -> int:
    warnings.filterwarnings("ignore")
    import torch

    from ckpt_kill_trials import _build  # noqa: E402 - bench/ is put on sys.path above

    from megatron_tts.checkpoint import COMMITTED, MANIFEST

    model, optimizer, state, ck = _build(os.path.dirname(os.path.abspath(paths[0])), False)
    for path in paths:
        rec = {"path": path, "ok": False}
        try:
            is_ckpt = os.path.exists(os.path.join(path, COMMITTED)) or os.path.exists(os.path.join(path, MANIFEST))
            if not is_ckpt:
                ck.root = path
                latest = ck.latest(quarantine=False)
                if latest is None:
                    raise RuntimeError(f"no checkpoint under {path}")
                path = latest[1]
            loaded = ck.load(path)
            rec.update(ok=True, step=loaded.step, loaded=loaded.path,
                       finite=all(bool(torch.isfinite(p).all()) for m in model for p in m.parameters()))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            rec.update(error_type=type(e).__name__, error=str(e))
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
