"""kill -9 during checkpoint saves: after every kill, a fresh loader must pick a checkpoint that
verifies and load exactly the tensors that were saved at its step.

    .venv/bin/python bench/ckpt_kill_trials.py [--trials 200] [--mode sync|async|mixed] [--seed 0]

A host process forks, per trial, a *saver* (a world of one: torch.distributed, the small test
model, megatron's optimizer, our Checkpointer with keep_last=2 in one checkpoint root shared by
all trials) that saves step after step; before each save it stamps every weight and Adam moment
with values derived from the step. The host SIGKILLs the saver's process group (the async writer
included) at a time drawn uniformly over that save's measured duration, then forks a fresh
*loader* that runs Checkpointer.latest() and load() for real and compares every tensor with the
stamp of the step it loaded.

A corrupt load is: the load fails, nothing is picked although a commit was reported, a tensor
differs from its stamp, the trainer state names another step, or the step picked is older than
the newest save the saver reported as committed (a committed checkpoint lost). Prints one
summary line ('corrupt loads: N') and exits 1 if N > 0.

Children are forked from a host that has imported everything but never initialised
torch.distributed, so each starts in ~0.3 s instead of ~6 s for a new interpreter.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SMALL = ["model.transformer.num_layers=4", "model.transformer.hidden_size=64",
         "model.transformer.ffn_hidden_size=192", "model.transformer.num_attention_heads=4",
         "model.transformer.num_query_groups=2", "data.seq_len=320", "train.micro_batch_size=1",
         "train.global_batch_size=8", "data.num_workers=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: str, async_save: bool):
    from megatron_tts.config import load_config

    return load_config(os.path.join(REPO, "configs/tiny.yaml"),
                       SMALL + [f"checkpoint.dir={root}", f"train.run_dir={root}/run", "checkpoint.keep_last=2",
                                f"checkpoint.async_save={str(async_save).lower()}", "watchdog.enabled=false"])


def _build(root: str, async_save: bool, on_event=None):
    """A world of one with the model, optimizer (with Adam states) and a Checkpointer."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))

    from megatron_tts.checkpoint.checkpointer import Checkpointer
    from megatron_tts.parallel import init_distributed
    from megatron_tts.train.build import TrainState, build_model_and_optimizer

    cfg = _config(root, async_save)
    layout = init_distributed(cfg)
    model, optimizer, _ = build_model_and_optimizer(cfg, seed=0)
    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()  # creates the Adam moments (loading needs them)
    state = TrainState()
    ck = Checkpointer(root, layout, model, optimizer, {"train": state}, config=cfg.checkpoint,
                      distributed_optimizer=False, seed=0, on_event=on_event)
    return model, optimizer, state, ck


def _tensors(model, optimizer):
    """(name, tensor, offset) for every weight and Adam moment, in a fixed order."""
    out = []
    params = [p for m in model for p in m.parameters()]
    for i, p in enumerate(params):
        out.append((f"param{i}", p, i * 1e-3))
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = o.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                idx = next(i for i, q in enumerate(params) if q is p)
                out.append((f"exp_avg{idx}", st["exp_avg"], 0.5 + idx * 1e-3))
                out.append((f"exp_avg_sq{idx}", st["exp_avg_sq"], 0.25 + idx * 1e-3))
    return out


def _stamp(model, optimizer, state, step: int) -> None:
    import torch

    with torch.no_grad():
        for _name, t, off in _tensors(model, optimizer):
            t.fill_(float(step) + off)
    state.step = step


def saver(root: str, async_save: bool, base: int, conn) -> None:
    os.setpgid(0, 0)  # the host kills the whole group: this process and an async writer
    events = []
    model, optimizer, state, ck = _build(root, async_save, on_event=events.append)
    conn.send(("ready", base))
    step = base
    while True:
        step += 1
        _stamp(model, optimizer, state, step)
        conn.send(("start", step, time.perf_counter()))
        ck.save(step)
        if async_save:
            ck.wait(step)
        for e in events:
            if e.get("event") == "checkpoint":
                conn.send(("committed", e["step"], e["total_s"]))
            elif e.get("event") == "checkpoint_failed":
                conn.send(("failed", e["step"], e["error"]))
        events.clear()


def loader(root: str, conn) -> None:
    import torch

    from megatron_tts.checkpoint import CheckpointError

    try:
        model, optimizer, state, ck = _build(root, False)
        _stamp(model, optimizer, state, -1)  # anything not overwritten by the load shows
        try:
            latest = ck.latest()
        except CheckpointError as e:
            conn.send({"picked": None, "error": f"latest(): {e}"})
            return
        if latest is None:
            conn.send({"picked": None})
            return
        loaded = ck.load(latest[1])
        bad = []
        for name, t, off in _tensors(model, optimizer):
            want = torch.full_like(t, float(loaded.step) + off)
            if not torch.isfinite(t).all() or not torch.equal(t, want):
                bad.append(name)
        if state.step != loaded.step:
            bad.append(f"trainer_state step {state.step}")
        conn.send({"picked": loaded.step, "path": loaded.path, "bad": bad[:5], "n_bad": len(bad)})
    except Exception as e:  # noqa: BLE001 - reported as a corrupt load
        conn.send({"picked": None, "error": f"{type(e).__name__}: {e}"})


def _drain(conn) -> list:
    out = []
    while conn.poll():
        try:
            out.append(conn.recv())
        except (EOFError, OSError):
            break
    return out


def _run_saver(ctx, root, async_save, base):
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=saver, args=(root, async_save, base, child))
    p.start()
    child.close()
    return p, parent


def _kill(p) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.join(timeout=30)


def _recv(conn, timeout: float):
    if not conn.poll(timeout):
        raise TimeoutError(f"no message from the child in {timeout} s")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError("the child process died (see its traceback above)") from None


def calibrate(ctx, root: str, async_save: bool, saves: int = 5) -> list[float]:
    """Durations (start of save() to commit) of the 1st, 2nd, ... save of a fresh saver."""
    p, conn = _run_saver(ctx, root, async_save, base=10_000_000)
    starts, durations = {}, []
    try:
        while len(durations) < saves:
            msg = _recv(conn, 120)
            if msg[0] == "start":
                starts[msg[1]] = msg[2]
            elif msg[0] == "committed":
                durations.append(msg[2])
    finally:
        _kill(p)
    for name in os.listdir(root):  # calibration checkpoints are not part of the trials
        path = os.path.join(root, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    return durations


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--mode", choices=["sync", "async", "mixed"], default="mixed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="checkpoint root (default: a temporary directory)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)

    # Import and patch everything once here; children are forked from this state.
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING if a.verbose else logging.ERROR,
                        format="    [%(process)d] %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "megatron.core", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from megatron_tts import compat

    compat.activate()
    import megatron_tts.checkpoint.checkpointer  # noqa: F401
    import megatron_tts.model  # noqa: F401
    import megatron_tts.train  # noqa: F401
    from megatron_tts.compat import dist_ckpt

    dist_ckpt.results_queue_warmup()  # megatron's writer-results Manager: started once, inherited
    ctx = mp.get_context("fork")
    tmp = None
    root = a.dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="ckpt-kill-")
        root = os.path.join(tmp, "checkpoints")
    os.makedirs(root, exist_ok=True)
    t_start = time.perf_counter()
    modes = {"sync": [False], "async": [True], "mixed": [False, True]}[a.mode]
    durations = {m: calibrate(ctx, root, m) for m in modes}
    print("save durations (s, start of save() to commit) by ordinal: " +
          ", ".join(f"{'async' if m else 'sync'} {[round(d, 3) for d in ds]}" for m, ds in durations.items()),
          flush=True)

    stats = {"trials": 0, "inside": 0, "corrupt": 0, "fresh": 0, "picked_newest_started": 0,
             "picked_previous": 0, "quarantined": 0, "failed_saves": 0}
    base, newest_committed = 0, None
    problems = []
    for t in range(a.trials):
        async_save = modes[t % len(modes)]
        # up to the 5th save of a saver: from the 3rd on, megatron reuses cached save plans
        ordinal = rng.randint(1, len(durations[async_save]))
        delay = rng.uniform(0, durations[async_save][ordinal - 1])
        p, conn = _run_saver(ctx, root, async_save, base)
        target, started, committed_in_trial = base + ordinal, base, set()
        try:
            while True:
                msg = _recv(conn, 120)
                if msg[0] == "start":
                    started = msg[1]
                    if msg[1] == target:
                        break
                elif msg[0] == "committed":
                    committed_in_trial.add(msg[1])
                elif msg[0] == "failed":
                    stats["failed_saves"] += 1
            time.sleep(delay)
        finally:
            _kill(p)
        for msg in _drain(conn):
            if msg[0] == "start":
                started = max(started, msg[1])
            elif msg[0] == "committed":
                committed_in_trial.add(msg[1])
        conn.close()
        if committed_in_trial:
            newest_committed = max(committed_in_trial | ({newest_committed} if newest_committed else set()))
        inside = target not in committed_in_trial
        base = started  # the next saver continues after every step this one started

        lp, lc = ctx.Pipe(duplex=False)
        q = ctx.Process(target=loader, args=(root, lc))
        q.start()
        lc.close()
        try:
            res = _recv(lp, 180)
        except TimeoutError as e:
            res = {"picked": None, "error": str(e)}
        q.join(timeout=30)
        if q.is_alive():
            q.kill()
            q.join()
        lp.close()

        stats["trials"] += 1
        stats["inside"] += inside
        stats["quarantined"] = sum(1 for n in os.listdir(root) if ".corrupt" in n)
        problem = None
        if res.get("error"):
            problem = res["error"]
        elif res["picked"] is None:
            if newest_committed is not None:
                problem = f"nothing picked although step {newest_committed} was committed"
            else:
                stats["fresh"] += 1
        elif res["n_bad"]:
            problem = f"step {res['picked']}: {res['n_bad']} tensor(s) differ from the stamp, e.g. {res['bad']}"
        elif newest_committed is not None and res["picked"] < newest_committed:
            problem = f"picked step {res['picked']} but step {newest_committed} was committed"
        else:
            stats["picked_newest_started" if res["picked"] == started else "picked_previous"] += 1
            newest_committed = res["picked"]  # committed, though its message may have been lost
        if problem:
            stats["corrupt"] += 1
            problems.append(f"trial {t} ({'async' if async_save else 'sync'}): {problem}")
        if a.verbose or problem:
            print(f"trial {t:4d} {'async' if async_save else 'sync '} kill {delay * 1000:6.1f} ms into save "
                  f"#{ordinal} (step {target}, {'inside' if inside else 'after commit'}) -> "
                  f"{problem or 'loaded step ' + str(res['picked'])}", flush=True)

    elapsed = time.perf_counter() - t_start
    print(f"trials: {stats['trials']} ({a.mode}) | kills inside a save: {stats['inside']} | corrupt loads: "
          f"{stats['corrupt']} | loaded the step being saved: {stats['picked_newest_started']} | loaded the "
          f"previous: {stats['picked_previous']} | fresh starts (nothing committed yet): {stats['fresh']} | "
          f"moved aside as *.corrupt: {stats['quarantined']} | {elapsed:.0f} s", flush=True)
    for line in problems[:20]:
        print("  " + line)
    print("RESULT " + json.dumps(stats), flush=True)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if stats["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
