"""The exit-code contract between training, torchrun agents, supervisors and slurm/pretrain.sh.

0   DONE     training reached train.steps; do not requeue.
1   CRASH    an unexpected failure (a bug, a lost peer); a supervisor may retry a bounded
             number of times (torchrun --max-restarts does).
3   FATAL    retrying cannot help (bad config, bad data paths, exhausted rollback budget,
             checkpoints committed but none verifies, a checkpoint holding pickled code):
             never requeue.
75  REQUEUE  stopped on purpose: requeue and resume from the newest committed checkpoint. A stop
             signal (SIGTERM/SIGINT/SIGUSR1) first saves one at the current step; a hang
             detected by the watchdog cannot save (a rank is stuck), so the run resumes from
             the last periodic one. 75 is sysexits' EX_TEMPFAIL.

Under torchrun the agent's own code is 1 whenever a worker exits non-zero or the agent itself
was signalled, so every training process also writes its code to RUN_DIR/exit/rank_XXXXX.json
(`record_exit`); supervisors that launch through torchrun read those. A process removes its old
record as soon as its config has loaded; one that fails before that (an unreadable recipe)
leaves none, so a supervisor trusts only records whose `time` is after its own launch.
"""

from __future__ import annotations

import json
import os
import socket
import time

EXIT_DONE = 0
EXIT_CRASH = 1
EXIT_FATAL = 3
EXIT_REQUEUE = 75

REASONS = {EXIT_DONE: "done", EXIT_CRASH: "crash", EXIT_FATAL: "fatal", EXIT_REQUEUE: "requeue"}


def exit_record_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "exit", f"rank_{rank:05d}.json")


def record_exit(run_dir: str, rank: int, code: int, **info) -> None:
    """Write RUN_DIR/exit/rank_XXXXX.json = {rank, host, pid, code, reason, time, **info}; never raises
    (it runs on the way out, possibly on a full disk)."""
    rec = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "code": code,
           "reason": REASONS.get(code, "unknown"), "time": time.time(), **info}
    try:
        path = exit_record_path(run_dir, rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    except Exception:
        pass


def clear_exit_record(run_dir: str, rank: int) -> None:
    """Remove this rank's record from a previous incarnation (at start-up, once run_dir is known)."""
    try:
        os.remove(exit_record_path(run_dir, rank))
    except OSError:
        pass


def read_exit_records(run_dir: str) -> dict[int, dict]:
    """rank -> its last exit record."""
    out = {}
    d = os.path.join(run_dir, "exit")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.startswith("rank_") and name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                rec = json.load(f)
            out[rec["rank"]] = rec
    return out
