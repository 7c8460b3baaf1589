"""Per-rank RNG state (torch CPU/CUDA, numpy, python, megatron's model-parallel tracker) as
tensors only, so that it loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import torch

from megatron_tts.compat.mcore import get_cuda_rng_tracker, model_parallel_cuda_manual_seed


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state(),
             "numpy": _bytes_tensor(json.dumps(_np_state(np.random.get_state()))),
             "python": _bytes_tensor(json.dumps(random.getstate()))}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    for name, s in get_cuda_rng_tracker().get_states().items():
        if isinstance(s, torch.Tensor):
            state[f"tracker/{name}"] = s.clone()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    ns = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), ns[2], ns[3], ns[4]))
    ps = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((ps[0], tuple(ps[1]), ps[2]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    tracked = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracked:
        get_cuda_rng_tracker().set_states(tracked)


def reseed(seed: int, step: int, rank: int) -> int:
    """Deterministic fresh RNG streams for a resume under another layout, where the saved per-rank
    streams do not map onto the new ranks: a function of (seed, step, rank) for the host
    generators, and megatron's own model_parallel_cuda_manual_seed of (seed, step) for the CUDA
    generator and the model-parallel tracker (forked per TP rank, shared across DP as at start).
    Returns the per-rank seed used."""
    base = int.from_bytes(hashlib.sha256(f"{seed}|{step}|{rank}".encode()).digest()[:4], "little")
    shared = int.from_bytes(hashlib.sha256(f"{seed}|{step}".encode()).digest()[:4], "little") % (1 << 30)
    torch.manual_seed(base)
    np.random.seed(base)
    random.seed(base)
    model_parallel_cuda_manual_seed(shared)
    return base


def _np_state(s: tuple) -> list:
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)
