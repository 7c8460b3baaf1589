"""Launch real training processes (torchrun + gloo) from tests."""

from __future__ import annotations

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


def pretrain(run_dir: str, overrides: list[str], nproc: int = 1, config: str = "configs/tiny.yaml",
             timeout: float = 240, extra_env: dict | None = None) -> RunResult:
    cmd = TORCHRUN + ["--nproc-per-node", str(nproc), "--log-dir", os.path.join(run_dir, "torchrun"),
                      "-m", "launch.pretrain", "--config", config, f"train.run_dir={run_dir}", *overrides]
    e = env()
    e.update(extra_env or {})
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    return RunResult(p.returncode, p.stdout + p.stderr, run_dir)
