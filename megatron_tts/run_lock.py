"""One job per run directory: ``RUN_DIR/.lock``, held by the job's rank 0 for its whole life.

Two jobs writing one run directory damage each other (each save clears the other's partial
saves, both append to metrics.jsonl, checkpoints of the same step collide). The lock file holds
who owns it (host, pid, job id, start) and a lease that rank 0 renews every ``lease_s / 4`` s.
A job that finds it held by another job exits 3 naming the holder, before writing anything.

A lock is taken over when it is the same job's (torchrun restarting its workers, Slurm
requeueing it: same job id) or stale: its process is gone (same host) or its lease ran out
(any host; a hung or partitioned holder stops renewing). The takeover is guarded by an
exclusive ``.lock.takeover`` file, so two contenders never both win. A holder whose lock was
taken over (it stalled longer than the lease) learns so at its next renewal and stops.

Shared filesystems: the lock relies on O_EXCL create and rename being atomic, which holds on
local disks, NFSv3+, Lustre and GPFS.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_TAKEOVER_STALE_S = 60.0  # a takeover guard older than this belongs to a contender that died


class RunDirLocked(RuntimeError):
    """Another job holds the run directory (a user error: exit 3, nothing written)."""


class RunDirError(ValueError):
    """The run directory cannot be used: a file, read-only, not creatable (a user error: exit 3)."""


def check_usable(path: str, what: str = "train.run_dir") -> None:
    """Create ``path`` if needed and prove it writable with a probe file; RunDirError otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"{what}={path} is a file, not a directory; choose a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe.{socket.gethostname()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        reason = {13: "permission denied", 30: "read-only file system", 28: "no space left on the device",
                  20: "a parent is a file"}.get(e.errno, e.strerror or str(e))
        raise RunDirError(f"{what}={path} is not writable ({reason}); choose a directory this job can write "
                          f"to") from None


@dataclass
class Holder:
    host: str
    pid: int
    job: str  # the job's identity: restarts of the same job share it
    started: float
    renewed: float
    lease_s: float
    token: str  # unique per acquisition: tells our lock from a successor's

    def describe(self, now: float) -> str:
        return (f"job {self.job} (host {self.host}, pid {self.pid}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, lease renewed "
                f"{now - self.renewed:.0f} s ago)")


def job_identity() -> str:
    """Slurm's job id (kept across requeues), else torchrun's run id (kept across its restarts;
    --rdzv-id on every node of an elastic job), else this process."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _read(path: str) -> Optional[Holder]:
    try:
        with open(path) as f:
            return Holder(**json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None  # torn or foreign content: treated as stale (its writer died mid-write)


def _write_atomic(path: str, holder: Holder) -> None:
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _alive(holder: Holder) -> bool:
    """Whether the holder may still be running: on this host, its pid exists; elsewhere, we
    cannot tell (the lease decides)."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by_another_job(run_dir: str) -> Optional[str]:
    """Who holds run_dir's lock, when it is another live job (else None): a process that failed
    before taking the lock must not write its exit record over that job's."""
    holder = _read(os.path.join(run_dir, LOCK_NAME))
    if holder is None or holder.job == job_identity() or not _alive(holder) or \
            time.time() - holder.renewed > holder.lease_s:
        return None
    return holder.describe(time.time())


class RunLock:
    def __init__(self, run_dir: str, lease_s: float = 300.0) -> None:
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.lease_s = lease_s
        self.me: Optional[Holder] = None
        self.lost: Optional[str] = None  # set when another job took the lock from us
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- acquire ----
    def acquire(self) -> str:
        """Take the lock or raise RunDirLocked. Returns how it was taken (for the log)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), job_identity(), now, now, self.lease_s,
                         uuid.uuid4().hex)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over()
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
            f.flush()
            os.fsync(f.fileno())
        self._start_renewing()
        return "acquired"

    def _take_over(self) -> str:
        guard = self.path + ".takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                fresh = time.time() - os.path.getmtime(guard) < _TAKEOVER_STALE_S
            except FileNotFoundError:
                return self._take_over()  # it just finished
            if fresh:
                raise RunDirLocked(f"run directory {os.path.dirname(self.path)} is being taken over by another "
                                   "job right now; use another train.run_dir or retry in a minute") from None
            try:
                os.unlink(guard)  # its contender died mid-takeover
            except FileNotFoundError:
                pass
            return self._take_over()
        os.close(fd)
        try:
            holder = _read(self.path)
            now = time.time()
            if holder is None:
                why = "an unreadable lock file (its writer died mid-write)"
            elif holder.job == self.me.job:
                why = f"the same job's earlier incarnation ({holder.describe(now)})"
            elif not _alive(holder):
                why = f"a dead job's lock ({holder.describe(now)}: no such process)"
            elif now - holder.renewed > holder.lease_s:
                why = f"a stale lock ({holder.describe(now)}: lease of {holder.lease_s:.0f} s expired)"
            else:
                raise RunDirLocked(
                    f"run directory {os.path.dirname(self.path)} is in use by {holder.describe(now)}. Two jobs "
                    f"on one run directory would damage each other's checkpoints and metrics: wait for it to "
                    f"end, or use another train.run_dir. If that job is gone, its lock is taken over "
                    f"automatically {holder.lease_s:.0f} s after its last renewal (or remove {self.path}).")
            _write_atomic(self.path, self.me)
        finally:
            os.unlink(guard)
        log.warning("run directory lock %s: took over %s", self.path, why)
        self._start_renewing()
        return f"took over {why}"

    # ---- renew / release ----
    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="run-lock", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            self.renew()

    def renew(self) -> None:
        # Under the takeover guard, so that a renewal never overwrites a takeover between its
        # read and its write; if a takeover holds the guard right now, the next renewal sees it.
        guard = self.path + ".takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return
        except OSError as e:  # a full disk: the lease still holds until it expires
            log.warning("could not renew the run directory lock %s: %s", self.path, e)
            return
        os.close(fd)
        try:
            holder = _read(self.path)
            if holder is None or holder.token != self.me.token:
                if self.lost is None:
                    self.lost = (f"the run directory lock {self.path} now belongs to "
                                 f"{holder.describe(time.time()) if holder else 'nobody (it was removed)'}")
                    log.error("ALERT %s: another job took over this run directory; stopping without saving",
                              self.lost)
                return
            self.me.renewed = time.time()
            _write_atomic(self.path, self.me)
        except OSError as e:
            log.warning("could not renew the run directory lock %s: %s", self.path, e)
        finally:
            try:
                os.unlink(guard)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _read(self.path)
        if self.me is not None and holder is not None and holder.token == self.me.token:
            try:
                os.unlink(self.path)
            except OSError:
                pass
