"""Stop signals on real training processes: SIGTERM, SIGUSR1 and repeated SIGTERMs each end in a
committed checkpoint at the stop step and exit code 75 from every worker; the resumed run
continues the uninterrupted one exactly. (torchrun's own code is 1 whenever a worker exits
non-zero or it was signalled itself; the workers' codes come from RUN_DIR/exit/.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

from megatron_tts.checkpoint import COMMITTED
from megatron_tts.exit_codes import EXIT_REQUEUE, read_exit_records
from tests.helpers import SMALL, finish, pretrain, start_pretrain, wait_for_step, workers

pytestmark = pytest.mark.slow

STEPS = 8
# No periodic checkpoint inside the run: the only checkpoint is the one the stop writes.
BASE = SMALL + [f"train.steps={STEPS}", "checkpoint.interval=100", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    r = pretrain(str(tmp_path_factory.mktemp("ref") / "run"), BASE, nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    assert sorted(r.losses()) == list(range(1, STEPS + 1))
    return r


def committed(run_dir: str) -> list[int]:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(int(d[5:]) for d in os.listdir(root)
                  if d.startswith("step_") and os.path.isfile(os.path.join(root, d, COMMITTED)))


def stop_event(r) -> dict:
    stops = [m for m in r.metrics() if m.get("event") == "stop"]
    assert len(stops) == 1, stops
    return stops[0]


def assert_requeue_stop(r, nproc: int, signalled: dict[int, str]) -> int:
    """Every worker exited 75 at the same step, which is committed; returns that step."""
    records = read_exit_records(r.run_dir)
    assert sorted(records) == list(range(nproc)), (records, r.output[-3000:])
    for rank, rec in records.items():
        assert rec["code"] == EXIT_REQUEUE and rec["reason"] == "requeue", (rank, rec, r.output[-3000:])
        assert rec["signal"] == signalled.get(rank), (rank, rec)
    step = stop_event(r)["step"]
    assert {rec["step"] for rec in records.values()} == {step}
    assert 2 <= step < STEPS, step
    assert step in committed(r.run_dir)
    assert not [d for d in os.listdir(os.path.join(r.run_dir, "checkpoints")) if d.startswith(".tmp")]
    assert max(r.losses()) == step  # stopped at the boundary: no step after the checkpoint
    return step


def assert_same_losses(r, reference, steps) -> None:
    got, ref = r.losses(), reference.losses()
    for s in steps:
        assert got[s] == ref[s], f"step {s}: {got[s]!r} != {ref[s]!r}"


def test_sigterm_to_one_worker_stops_all_and_resume_is_exact(reference, tmp_path):
    run_dir = str(tmp_path / "run")
    p = start_pretrain(run_dir, BASE, nproc=2)
    procs = workers(p, 2)
    wait_for_step(run_dir, 2, p)
    t_signal = time.time()
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns it through the step's all-reduce
    r = finish(p, run_dir)
    assert r.returncode == 1, r.output[-3000:]  # torchrun: a worker exited non-zero
    assert "exitcode  : 75" in r.output
    stop = assert_requeue_stop(r, 2, {1: "SIGTERM"})
    assert_same_losses(r, reference, range(1, stop + 1))

    p2 = start_pretrain(run_dir, BASE + ["train.resume=auto"], nproc=2)
    wait_for_step(run_dir, stop + 1, p2)
    restart_s = time.time() - t_signal
    resumed = finish(p2, run_dir)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', f'step_{stop:08d}')}" in resumed.output
    assert sorted(resumed.losses()) == list(range(1, STEPS + 1))  # nothing lost, nothing repeated
    assert_same_losses(resumed, reference, range(1, STEPS + 1))  # bit for bit
    print(f"\nSIGTERM at step >= 2 -> stop at step {stop} -> first step after resume: {restart_s:.1f} s")


def test_sigusr1_to_the_workers(reference, tmp_path):
    run_dir = str(tmp_path / "run")
    p = start_pretrain(run_dir, BASE, nproc=2)
    procs = workers(p, 2)
    wait_for_step(run_dir, 2, p)
    for proc in procs.values():
        proc.send_signal(signal.SIGUSR1)
    r = finish(p, run_dir)
    stop = assert_requeue_stop(r, 2, {0: "SIGUSR1", 1: "SIGUSR1"})
    assert_same_losses(r, reference, range(1, stop + 1))


def test_repeated_sigterm_as_under_slurm(tmp_path):
    """Slurm: slurmstepd and torchrun both deliver SIGTERM to every worker; a third arrives while
    the checkpoint is written. One clean committed checkpoint, 75 everywhere."""
    run_dir = str(tmp_path / "run")
    p = start_pretrain(run_dir, BASE, nproc=2)
    procs = workers(p, 2)
    wait_for_step(run_dir, 2, p)
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to each worker
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)  # slurmstepd's copy
    time.sleep(0.5)
    for proc in procs.values():
        try:
            proc.send_signal(signal.SIGTERM)  # typically lands in the step or the save
        except Exception:  # already gone
            pass
    r = finish(p, run_dir)
    assert r.returncode == 1, r.output[-3000:]  # torchrun was signalled itself
    stop = assert_requeue_stop(r, 2, {0: "SIGTERM", 1: "SIGTERM"})
    assert committed(run_dir) == [stop]  # the stop's checkpoint only, written once
    assert "already stopping; ignored" in r.output


def test_sigterm_to_a_plain_process(tmp_path):
    run_dir = str(tmp_path / "run")
    p = start_pretrain(run_dir, BASE, torchrun=False)
    wait_for_step(run_dir, 2, p)
    p.send_signal(signal.SIGTERM)
    r = finish(p, run_dir)
    assert r.returncode == EXIT_REQUEUE, r.output[-3000:]
    assert_requeue_stop(r, 1, {0: "SIGTERM"})

