"""Fault injection on real torchrun agents (CPU, gloo): kill -9 of workers under
--max-restarts, and elastic resize with two agents and a store apart from them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from megatron_tts.exit_codes import EXIT_REQUEUE
from tests.helpers import REPO, SMALL, env, pretrain
from tests.ledger import check_exactly_once

GBS = 8


def metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_step(run_dir: str) -> int:
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    return steps[-1] if steps else 0


def resumes(run_dir: str) -> int:
    return sum(1 for r in metrics(run_dir) if r.get("event") == "resume")


def workers_of(agent: subprocess.Popen) -> list[psutil.Process]:
    try:
        kids = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in kids if "launch.pretrain" in " ".join(p.cmdline())]


def wait_for(cond, timeout: float, what: str, procs=()):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited early with {p.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def final_weights(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(run_dir, f"final_{step}.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"), out)
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and k.startswith(("embedding", "decoder"))}


def test_plain_torchrun_kill9_restarts_are_bitwise_invisible(tmp_path):
    steps = 16
    args = SMALL + [f"train.steps={steps}", "checkpoint.interval=2", "checkpoint.keep_last=20",
                    "logging.console=false"]
    ref = pretrain(str(tmp_path / "ref"), args, nproc=2)
    assert ref.returncode == 0, ref.output[-3000:]

    run_dir = str(tmp_path / "killed")
    # Plain torchrun, as users type it, with no special environment: its agent shares its
    # rendezvous store with the workers across restarts (megatron_tts.compat.elastic).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "3", "--monitor-interval", "0.5", "--log-dir", os.path.join(run_dir, "torchrun"),
           "-m", "launch.pretrain", "--config", "configs/tiny.yaml", f"train.run_dir={run_dir}", *args]
    clean = {k: v for k, v in env().items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    agent = subprocess.Popen(cmd, cwd=REPO, env=clean, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    rng = random.Random(1234)
    restart_s = []
    try:
        # two kills: the second restart is the one that met the first round's stale peer addresses
        targets = sorted(rng.sample(range(3, steps - 8), 2))
        for kill, target in enumerate(targets):
            wait_for(lambda: resumes(run_dir) >= kill and last_step(run_dir) >= target
                     or last_step(run_dir) >= steps - 1, 180, f"kill {kill} at step {target}", [agent])
            if last_step(run_dir) >= steps - 1:
                pytest.fail("the run outpaced the kills; lower the step time or raise steps")
            victim = rng.choice(workers_of(agent))
            t_kill = time.time()
            victim.send_signal(signal.SIGKILL)
            n = len([r for r in metrics(run_dir) if "loss" in r])
            wait_for(lambda: resumes(run_dir) > kill and len([r for r in metrics(run_dir) if "loss" in r]) > n,
                     180, f"the first step after restart {kill + 1}", [agent])
            restart_s.append(time.time() - t_kill)
        assert agent.wait(timeout=240) == 0
    finally:
        if agent.poll() is None:
            kill_tree(agent)
    print(f"restart time kill -> first step: {[round(x, 1) for x in restart_s]} s")
    want = {r["step"]: r for r in ref.metrics() if "loss" in r}
    got = {r["step"]: r for r in metrics(run_dir) if "loss" in r}  # the last execution of each step
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s]["loss"] == want[s]["loss"] and got[s]["grad_norm"] == want[s]["grad_norm"], s
    a, b = final_weights(ref.run_dir, steps), final_weights(run_dir, steps)
    assert a and all(torch.equal(a[k], b[k]) for k in a)


def start_agent(run_dir: str, port: int, name: str, steps: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.elastic", "--nnodes", "1:2", "--nproc-per-node", "1",
           "--store-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic-test", "--max-restarts", "20",
           "--log-dir", os.path.join(run_dir, f"torchrun_{name}_{time.time():.0f}"), "--",
           "--config", "configs/tiny.yaml", f"train.run_dir={run_dir}", *SMALL, f"train.steps={steps}",
           "checkpoint.interval=2", "logging.ledger=true", "logging.console=false", "checkpoint.keep_last=50"]
    log = open(os.path.join(run_dir, f"agent_{name}.log"), "a")
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(agent: subprocess.Popen) -> None:
    # torchrun puts workers in sessions of their own: killing the agent's group misses them
    procs = [psutil.Process(agent.pid)] + psutil.Process(agent.pid).children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    agent.wait()


def dp_now(run_dir: str) -> tuple[int, int]:
    """(dp_size, step) of the newest ledger record."""
    best = (0, 0, 0.0)
    d = os.path.join(run_dir, "ledger")
    for name in os.listdir(d) if os.path.isdir(d) else []:
        with open(os.path.join(d, name)) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    t = float(r["incarnation"]) * 1e6 + r["step"]
                    if t > best[2]:
                        best = (r["dp_size"], r["step"], t)
    return best[0], best[1]


@pytest.mark.timeout(420)
def test_elastic_resize_loses_and_repeats_nothing(tmp_path):
    run_dir = str(tmp_path / "elastic")
    os.makedirs(run_dir)
    ready = os.path.join(run_dir, "store.port")
    store = subprocess.Popen([sys.executable, "-m", "launch.rdzv_store", "--host", "127.0.0.1", "--port", "0",
                              "--ready-file", ready], cwd=REPO, env=env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = 400
    agents: dict[str, subprocess.Popen] = {}
    try:
        wait_for(lambda: os.path.exists(ready) and open(ready).read().strip(), 30, "the store")
        port = int(open(ready).read())
        agents["a"] = start_agent(run_dir, port, "a", steps)
        time.sleep(1.0)
        agents["b"] = start_agent(run_dir, port, "b", steps)
        wait_for(lambda: dp_now(run_dir)[0] == 2 and dp_now(run_dir)[1] >= 4, 120, "DP=2 training")
        for victim in ("a",):  # the agent that started first: no agent is special
            kill_tree(agents[victim])  # a lost node: its agent and its workers, all at once
            step = dp_now(run_dir)[1]
            wait_for(lambda: dp_now(run_dir)[0] == 1 and dp_now(run_dir)[1] >= step + 2, 120,
                     f"DP=1 after losing agent {victim}")
            agents[victim] = start_agent(run_dir, port, victim, steps)
            step = dp_now(run_dir)[1]
            wait_for(lambda: dp_now(run_dir)[0] == 2 and dp_now(run_dir)[1] >= step + 2, 120,
                     f"DP=2 after agent {victim} returned")
        assert dp_now(run_dir)[1] < steps, "the run finished before the resizes were done; raise steps"
        # Stop as Slurm would: SIGTERM to the agents, which forward it to the workers; they
        # commit a checkpoint at the same step boundary and exit "requeue".
        for agent in agents.values():
            agent.send_signal(signal.SIGTERM)
        for agent in agents.values():
            agent.wait(timeout=120)
    finally:
        for p in list(agents.values()) + [store]:
            if p.poll() is None:
                kill_tree(p)
    codes = {}
    for name in os.listdir(os.path.join(run_dir, "exit")):
        with open(os.path.join(run_dir, "exit", name)) as f:
            codes[name] = json.load(f)["code"]
    assert codes and set(codes.values()) == {EXIT_REQUEUE}, codes
    committed = sorted(int(d.split("_")[1]) for d in os.listdir(os.path.join(run_dir, "checkpoints"))
                       if d.startswith("step_") and os.path.exists(os.path.join(run_dir, "checkpoints", d, "COMMITTED")))
    stop = committed[-1]
    assert stop == max(r["step"] for r in metrics(run_dir) if "loss" in r), "the stop step was not committed"
    facts = check_exactly_once(run_dir, stop, GBS)
    assert 1 in facts["dp_sizes"] and 2 in facts["dp_sizes"]
