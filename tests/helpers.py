"""Launch real training processes (torchrun + gloo) from tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# A small model and short sequences so that a multi-process run takes seconds on 2 cores.
SMALL = [
    "model.transformer.num_layers=4", "model.transformer.hidden_size=64",
    "model.transformer.ffn_hidden_size=192", "model.transformer.num_attention_heads=4",
    "model.transformer.num_query_groups=2", "data.seq_len=320", "train.micro_batch_size=1",
    "train.global_batch_size=8", "logging.interval=1", "optim.schedule.warmup_steps=2",
    "data.num_workers=1",
]


# The 6-step run shared by the layout-equivalence and the resume tests (tests/reference_runs.py):
# a checkpoint at step 3 to resume from, which changes nothing in the numerics.
LAYOUT_STEPS, LAYOUT_STOP = 6, 3
LAYOUT_BASE = SMALL + [f"train.steps={LAYOUT_STEPS}", f"checkpoint.interval={LAYOUT_STOP}", "checkpoint.keep_last=5"]


@dataclass
class RunResult:
    returncode: int
    output: str
    run_dir: str

    def metrics(self) -> list[dict]:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def losses(self) -> dict[int, float]:
        """Per-step loss; a resumed run's later records replace the earlier ones."""
        return {r["step"]: r["loss"] for r in self.metrics() if "loss" in r}


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.setdefault("PYTHONUNBUFFERED", "1")
    return e


def pretrain_cmd(run_dir: str, overrides: list[str], nproc: int = 1, config: str = "configs/tiny.yaml",
                 torchrun: bool = True, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    args = ["-m", "launch.pretrain", "--config", config, f"train.run_dir={run_dir}", *overrides]
    if not torchrun:  # a plain single process, as `python -m launch.pretrain`
        return [sys.executable, *args]
    # --standalone: the rendezvous store binds a free port, so parallel test workers never collide
    # on torchrun's default 29500.
    rdzv = [] if any(a.startswith(("--rdzv", "--master", "--standalone")) for a in torchrun_args) else ["--standalone"]
    return TORCHRUN + [*rdzv, "--nproc-per-node", str(nproc), "--log-dir", os.path.join(run_dir, "torchrun"),
                       *torchrun_args, *args]


def pretrain(run_dir: str, overrides: list[str], nproc: int = 1, config: str = "configs/tiny.yaml",
             timeout: float = 240, extra_env: dict | None = None) -> RunResult:
    e = env()
    e.update(extra_env or {})
    p = subprocess.run(pretrain_cmd(run_dir, overrides, nproc, config), cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=timeout)
    return RunResult(p.returncode, p.stdout + p.stderr, run_dir)


def start_pretrain(run_dir: str, overrides: list[str], nproc: int = 1, config: str = "configs/tiny.yaml",
                   extra_env: dict | None = None, torchrun: bool = True,
                   torchrun_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a run without waiting (to signal it); its output goes to RUN_DIR/output.log.
    `finish(proc, run_dir)` waits and returns the RunResult. torchrun=False starts a plain
    `python -m launch.pretrain` (one process)."""
    e = env()
    e.update(extra_env or {})
    os.makedirs(run_dir, exist_ok=True)
    out = open(os.path.join(run_dir, "output.log"), "ab")
    try:
        return subprocess.Popen(pretrain_cmd(run_dir, overrides, nproc, config, torchrun, torchrun_args), cwd=REPO, env=e,
                                stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()  # the child holds its own copy


def finish(proc: subprocess.Popen, run_dir: str, timeout: float = 240) -> RunResult:
    """Wait for a started run (killing its whole tree if it overruns) and collect its result."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
    with open(os.path.join(run_dir, "output.log"), errors="replace") as f:
        return RunResult(proc.returncode, f.read(), run_dir)


def workers(proc: subprocess.Popen, nproc: int, timeout: float = 60) -> dict[int, "object"]:
    """rank -> psutil.Process of a torchrun agent's worker processes (its children with RANK set)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(proc.pid).children():
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found[int(rank)] = child
        if len(found) == nproc:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"torchrun agent {proc.pid} did not show {nproc} workers")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (test clean-up only; by pid, never by name)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> int:
    """Poll RUN_DIR/metrics.jsonl until a step record >= `step` appears; returns the newest step."""
    import time

    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            steps = []
            with open(path) as f:
                for line in f:
                    try:  # a line being written right now may be incomplete
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if "loss" in r:
                        steps.append(r["step"])
            if steps and max(steps) >= step:
                return max(steps)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the run exited ({proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {path} after {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def world_of_one(cfg):
    """This process as a gloo world of one with megatron's groups for ``cfg`` (in-process tests of
    the model, the checkpointer, HF import/export); the environment is restored afterwards."""
    from megatron_tts.parallel import destroy_distributed, init_distributed

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield init_distributed(cfg)
    finally:
        destroy_distributed()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
