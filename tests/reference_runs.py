"""Reference runs that several tests compare against, computed once per test session and shared
across pytest-xdist workers (a file lock per run; the others wait and reuse it). A shared run is
read-only: tests copy it or resume from its checkpoints into their own run directories."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os

from tests.helpers import RunResult, pretrain


def shared_root(tmp_path_factory) -> str:
    """A directory common to every xdist worker of this session (their basetemps' parent)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = os.path.join(str(root), "shared-reference-runs")
    os.makedirs(path, exist_ok=True)
    return path


def reference_run(tmp_path_factory, overrides: list[str], nproc: int, config: str = "configs/tiny.yaml",
                  timeout: float = 300) -> RunResult:
    """The run of (config, overrides, nproc), made by the first test that asks for it."""
    key = hashlib.sha256(json.dumps([config, sorted(overrides), nproc]).encode()).hexdigest()[:16]
    root = shared_root(tmp_path_factory)
    run_dir = os.path.join(root, key)
    with open(os.path.join(root, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = os.path.join(root, f"{key}.done")
        if os.path.exists(done):
            with open(done) as f:
                saved = json.load(f)
            return RunResult(saved["returncode"], saved["output"], run_dir)
        r = pretrain(run_dir, overrides, nproc=nproc, config=config, timeout=timeout)
        with open(done, "w") as f:
            json.dump({"returncode": r.returncode, "output": r.output[-20000:]}, f)
        return r
