"""Misuse a user hits, provoked on real processes: two jobs on one run directory, a resume under a
changed vocabulary or codebook, deleted checkpoints, a new data stage, train.resume pointing at
the wrong thing, a read-only run directory, and preflight's free-space floor. Each checks the
exit code, the message, and that no committed checkpoint or metrics line was lost or rewritten."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from megatron_tts.checkpoint import format as fmt
from megatron_tts.exit_codes import read_exit_records
from tests.helpers import REPO, SMALL, env, finish, kill_tree, pretrain, start_pretrain, wait_for_step, workers
from tests.integration.test_bad_input import assert_fatal, cli, clis

pytestmark = pytest.mark.slow

BASE = SMALL + ["logging.console=false", "checkpoint.keep_last=100"]


def snapshot(run_dir: str) -> dict[str, str]:
    """sha256 of every file a later run must not touch (checkpoints, metrics, config, records)."""
    out = {}
    for dirpath, _dirs, files in os.walk(run_dir):
        if "torchrun" in dirpath or os.sep + "exit" in dirpath:
            continue
        for name in files:
            if name == ".lock":
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def committed_markers(run_dir: str) -> dict[int, bytes]:
    root = os.path.join(run_dir, "checkpoints")
    return {i.step: open(os.path.join(i.path, fmt.COMMITTED), "rb").read()
            for i in fmt.list_checkpoints(root) if i.committed}


def step_records(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if '"loss"' in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4, to resume wrongly (copied per test)."""
    r = pretrain(str(tmp_path_factory.mktemp("trained") / "run"), BASE + ["train.steps=4", "checkpoint.interval=2"])
    assert r.returncode == 0, r.output[-3000:]
    return r.run_dir


def copy_of(trained, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("torchrun"))
    return dst


# --------------------------------------------------------------------- two jobs, one run dir


def test_a_second_job_on_a_busy_run_dir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    run_dir = str(tmp_path / "run")
    args = BASE + ["train.steps=100000", "checkpoint.interval=5"]  # A runs until it is killed
    a = start_pretrain(run_dir, args, nproc=2)
    try:
        wait_for_step(run_dir, 6, a, timeout=180)
        before = committed_markers(run_dir)
        b_dir = str(tmp_path / "b_logs")
        os.makedirs(b_dir)
        b = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "--log-dir", b_dir, "-m", "launch.pretrain", "--config", "configs/tiny.yaml",
                            f"train.run_dir={run_dir}", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=180)
        assert b.returncode != 0
        refusals = [line for line in b.stderr.splitlines() if "error: run directory" in line]
        assert len(refusals) == 2, b.stderr[-3000:]  # each rank says it, in one line
        assert "is in use by job torchrun:" in refusals[0] and f"pid {workers(a, 2)[0].pid}" in refusals[0]
        # (torchrun's agent prints its own ChildFailedError traceback; the workers print none)
        assert not [line for line in b.stderr.splitlines() if "File " in line and ("megatron_tts" in line or
                                                                                   "launch/pretrain" in line)]
        assert a.poll() is None  # the holder goes on
        # the refused job touched nothing: A's checkpoints, metrics and exit records are A's alone
        after = committed_markers(run_dir)  # (A itself prunes the oldest ones meanwhile)
        assert all(after[s] == before[s] for s in before if s in after) and set(before) & set(after)
        assert not os.path.exists(os.path.join(run_dir, "exit")) or not read_exit_records(run_dir)
        steps = step_records(run_dir)
        assert steps == list(range(1, len(steps) + 1))

        # kill -9 of the holder: its lock stays behind, names a dead process, and is taken over
        wait_for_step(run_dir, 12, a, timeout=180)
        kill_tree(a.pid)
        a.wait()
        assert os.path.exists(os.path.join(run_dir, ".lock"))
        committed = committed_markers(run_dir)
        c = start_pretrain(run_dir, args + ["train.resume=auto", f"train.steps={max(committed) + 3}"], nproc=2)
        rc = finish(c, run_dir, timeout=240)
        assert rc.returncode == 0, rc.output[-3000:]
        assert "took over a dead job's lock" in rc.output
        final = committed_markers(run_dir)
        assert all(final[s] == committed[s] for s in committed if s in final)  # never replaced
        assert not os.path.exists(os.path.join(run_dir, ".lock"))  # released at the end
        assert {r["code"] for r in read_exit_records(run_dir).values()} == {0}
    finally:
        kill_tree(a.pid)


# ------------------------------------------------------------- resume compatibility, stages


CHANGES = {
    "one_special_token_more": (
        ["model.vocab.special_tokens=[<|TEXT_GENERATION_START|>,<|TEXT_GENERATION_END|>,<|TEXT_UNDERSTANDING_START|>,"
         "<|TEXT_UNDERSTANDING_END|>,<|SPEECH_GENERATION_START|>,<|SPEECH_GENERATION_END|>,"
         "<|SPEECH_UNDERSTANDING_START|>,<|SPEECH_UNDERSTANDING_END|>,<|EXTRA|>]"],
        ["vocab.special_tokens: checkpoint '8 entries', now '9 entries'", "vocab.speech_offset: checkpoint 264, now 265",
         "vocab.real: checkpoint 520, now 521"]),
    "larger_codebook": (["model.vocab.codebook_size=512"], ["vocab.codebook_size: checkpoint 256, now 512",
                                                             "vocab.real: checkpoint 520, now 776"]),
    "other_ffn": (["model.transformer.ffn_hidden_size=256"], ["model.ffn_hidden_size: checkpoint 192, now 256"]),
}


@pytest.fixture(scope="module")
def other_models(trained, tmp_path_factory):
    """Each change of CHANGES resumed on its own copy of `trained`: (result, run_dir, snapshot before)."""
    dirs = {name: copy_of(trained, tmp_path_factory.mktemp(name)) for name in CHANGES}
    before = {name: snapshot(d) for name, d in dirs.items()}
    results = clis(*[(dirs[name], BASE + ["train.steps=6"] + change) for name, (change, _) in CHANGES.items()])
    return {name: (r, dirs[name], before[name]) for name, r in zip(CHANGES, results)}


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_resume_into_another_model_is_refused_before_anything_is_written(other_models, name):
    r, run_dir, before = other_models[name]
    msg = assert_fatal(r, "cannot resume from", "does not match this recipe", *CHANGES[name][1],
                       "another train.run_dir, or train.resume=never")
    assert "step_00000004" in msg
    assert snapshot(run_dir) == before  # config.yaml, metrics, checkpoints: byte for byte


def test_a_new_data_stage_needs_reset_data_and_keeps_the_weights(trained, tmp_path):
    run_dir = copy_of(trained, tmp_path)
    before = snapshot(run_dir)
    r = cli(run_dir, BASE + ["train.steps=6", "data.seq_len=256"])
    assert_fatal(r, "cannot resume the data stream", "data.seq_len: checkpoint 320, now 256", "train.reset_data=true")
    assert snapshot(run_dir) == before
    r = cli(run_dir, BASE + ["train.steps=6", "data.seq_len=256", "train.reset_data=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the data stream restarts from the beginning (data.seq_len: checkpoint 320, now 256)" in r.stderr
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    resume = [x for x in recs if x.get("event") == "resume"][-1]
    assert resume["step"] == 4 and resume["reset_data"] is True
    new = [x for x in recs if "loss" in x][-2:]
    assert [x["step"] for x in new] == [5, 6]
    assert new[0]["consumed_samples"] == 5 * 8  # the counters continue
    first = [x for x in recs if "loss" in x][0]
    assert new[0]["loss"] < first["loss"] - 0.05  # the trained weights came along, not a fresh init
    # left on for a requeue, reset_data does not restart the stream again
    r = cli(run_dir, BASE + ["train.steps=7", "data.seq_len=256", "train.reset_data=true"])
    assert r.returncode == 0 and "train.reset_data=true ignored" in r.stderr


def test_deleted_checkpoints_stop_the_run_instead_of_restarting_from_step_one(trained, tmp_path):
    run_dir = copy_of(trained, tmp_path)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    before = snapshot(run_dir)
    r = cli(run_dir, BASE + ["train.steps=6"])
    assert_fatal(r, "records checkpoints committed up to step 4", "is gone", "train.resume=never")
    assert snapshot(run_dir) == before  # metrics still end at step 4, nothing appended
    # starting over is explicit, and archives the old history instead of writing over it
    r = cli(run_dir, BASE + ["train.steps=2", "train.resume=never"])
    assert r.returncode == 0, r.stderr[-3000:]
    archived = [n for n in os.listdir(run_dir) if ".archived-" in n]
    assert sorted(n.split(".archived-")[0] for n in archived) == ["checkpoint_commits", "metrics"]
    old = next(n for n in archived if n.startswith("metrics"))
    assert step_records(run_dir) == [1, 2] and [json.loads(x)["step"] for x in open(os.path.join(run_dir, old))
                                                if '"loss"' in x] == [1, 2, 3, 4]


def test_resume_paths_that_are_not_checkpoints_are_named(trained, tmp_path):
    run_dir = str(tmp_path / "new")
    missing = str(tmp_path / "nope")
    r1, r2, r = clis((run_dir, BASE + ["train.steps=6", f"train.resume={missing}"]),
                     (run_dir, BASE + ["train.steps=6", f"train.resume={trained}"]),
                     (run_dir, BASE + ["train.steps=3", f"train.resume={trained}/checkpoints"]))
    assert_fatal(r1, f"train.resume={missing} does not exist")
    assert_fatal(r2, f"train.resume={trained} is a run directory, not a checkpoint",
                 os.path.join(trained, "checkpoints"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is at step 4 >= train.steps=3: nothing to train; raise train.steps to continue" in r.stderr


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A real tmpfs mounted at path (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


def test_a_read_only_run_dir_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        r = cli(str(mnt / "run"), BASE + ["train.steps=2"])
        assert_fatal(r, f"train.run_dir={mnt}/run is not writable (read-only file system)")


# ----------------------------------------------------------------- preflight's disk floor


def test_preflight_sizes_the_free_space_floor_from_the_recipe(tmp_path):
    with tmpfs(tmp_path / "ckpt", "size=200m") as mnt:
        _preflight_floors(mnt, tmp_path)


def _preflight_floors(mnt, tmp_path) -> None:
    base = [sys.executable, "-m", "launch.preflight", "--ckpt-dir", str(mnt), "--write-mb", "4",
            "--min-write-mbps", "1", "--gemm-n", "128", "--allreduce-mb", "1", "--timeout-s", "60"]
    e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}

    def preflight(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(base + list(args), cwd=REPO, env=e, capture_output=True, text=True, timeout=180)

    tiny = preflight("--config", "configs/tiny.yaml")
    assert tiny.returncode == 0, tiny.stdout + tiny.stderr  # ~0.05 GB needed on a 0.2 GB disk
    llasa = ["--config", "configs/llasa-1b.yaml", "--set", "data.paths=[data/demo]",
             "--set", "data.tokenizer.path=/models/llama3/tokenizer.json"]
    big = preflight(*llasa, "--json", str(tmp_path / "p.json"))
    assert big.returncode == 2, big.stdout + big.stderr
    free = json.load(open(tmp_path / "p.json"))
    check = next(c for n in free["nodes"] for c in n["checks"] if c["name"] == "ckpt.free")
    assert "1,371.6M params" in check["detail"] and "checkpoint.keep_last=3 + the one in flight" in check["detail"]
    over = preflight(*llasa, "--min-free-gb", "0.1")
    assert over.returncode == 0, over.stdout + over.stderr  # an explicit floor still wins


def test_run_lock_waits_are_not_needed_between_sequential_jobs(trained, tmp_path):
    """A finished job leaves no lock: the next one starts at once."""
    run_dir = copy_of(trained, tmp_path)
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
    t0 = time.monotonic()
    r = cli(run_dir, BASE + ["train.steps=5"])
    assert r.returncode == 0 and "took over" not in r.stderr and time.monotonic() - t0 < 120
