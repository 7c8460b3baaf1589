"""The run directory lock: one holder, a clear refusal naming it, safe takeover of a stale or a
same-job lock, exactly one winner among concurrent contenders, loss detected on renewal."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time

import pytest

from megatron_tts import run_lock
from megatron_tts.run_lock import RunDirError, RunDirLocked, RunLock, check_usable, held_by_another_job


def plant(run_dir, **fields) -> str:
    """A lock file as another job would have left it."""
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": "slurm:other", "started": now - 100,
              "renewed": now, "lease_s": 300.0, "token": "theirs", **fields}
    path = os.path.join(run_dir, run_lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def test_acquire_then_release(tmp_path):
    lock = RunLock(str(tmp_path), lease_s=60)
    assert lock.acquire() == "acquired"
    held = json.load(open(lock.path))
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    lock.release()
    assert not os.path.exists(lock.path)


def test_a_live_other_job_is_refused_by_name(tmp_path):
    plant(str(tmp_path))  # this very process stands in for the live holder
    with pytest.raises(RunDirLocked) as info:
        RunLock(str(tmp_path)).acquire()
    msg = str(info.value)
    assert "in use by job slurm:other" in msg and f"pid {os.getpid()}" in msg and "another train.run_dir" in msg
    assert held_by_another_job(str(tmp_path)) is not None


@pytest.mark.parametrize("case,fields,why", [
    ("dead process", {"pid": 2 ** 22 + 12345}, "no such process"),
    ("expired lease elsewhere", {"host": "node-b", "renewed": time.time() - 1000}, "lease of 300 s expired"),
    ("same job", {"job": run_lock.job_identity()}, "the same job's earlier incarnation"),
])
def test_stale_or_own_locks_are_taken_over(tmp_path, case, fields, why):
    plant(str(tmp_path), **fields)
    lock = RunLock(str(tmp_path), lease_s=60)
    assert why in lock.acquire()
    assert json.load(open(lock.path))["token"] == lock.me.token
    lock.release()


def test_a_fresh_lease_on_another_host_is_respected(tmp_path):
    plant(str(tmp_path), host="node-b", pid=1)
    with pytest.raises(RunDirLocked, match="host node-b"):
        RunLock(str(tmp_path)).acquire()


def test_a_torn_lock_file_is_taken_over(tmp_path):
    with open(tmp_path / run_lock.LOCK_NAME, "w") as f:
        f.write('{"host": "x", "pi')
    lock = RunLock(str(tmp_path), lease_s=60)
    assert "unreadable" in lock.acquire()
    lock.release()


def _contend(run_dir: str, job: str, start: float, q) -> None:
    os.environ["SLURM_JOB_ID"] = job
    while time.time() < start:
        pass
    try:
        RunLock(run_dir, lease_s=60).acquire()
        q.put(("won", job))
        time.sleep(1.0)  # hold it while the others finish trying
    except RunDirLocked as e:
        q.put(("lost", str(e)[:80]))


def test_concurrent_contenders_for_a_stale_lock_have_one_winner(tmp_path):
    plant(str(tmp_path), pid=2 ** 22 + 777)  # dead: everybody may take it over
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), f"job{i}", start, q)) for i in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [r[0] for r in results].count("won") == 1, results


def test_renewal_notices_a_lock_taken_by_another_job(tmp_path):
    lock = RunLock(str(tmp_path), lease_s=60)
    lock.acquire()
    lock.renew()
    assert lock.lost is None
    plant(str(tmp_path), host="node-b")  # another job took it over (this one stalled past the lease)
    lock.renew()
    assert lock.lost and "node-b" in lock.lost
    lock.release()
    assert os.path.exists(lock.path)  # release never removes another job's lock


def test_unusable_run_dirs_are_named(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        check_usable(str(f))
    with pytest.raises(RunDirError, match="not writable"):
        check_usable(str(f / "below"))
    check_usable(str(tmp_path / "new" / "dir"))
    assert os.path.isdir(tmp_path / "new" / "dir") and os.listdir(tmp_path / "new" / "dir") == []
