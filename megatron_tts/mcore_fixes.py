"""Workarounds for megatron-core 0.19.2 bugs that silently break a distributed-optimizer resume
when megatron falls back to torch's AdamW (no transformer-engine/apex: CPU, or a GPU without
them). Each is pinned to the version and proven by tests/distributed/test_resume.py, which
compares a resumed run with an uninterrupted one bit for bit.
"""

from __future__ import annotations

import importlib.metadata

import torch

PINNED = "0.19.2"
_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    if importlib.metadata.version("megatron-core") != PINNED:
        raise RuntimeError(f"megatron_tts.mcore_fixes targets megatron-core {PINNED}; re-check the "
                           "bugs below against the installed version and update the pin")
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        # fully_reshardable loads skip torch AdamW's per-param "step" (it is restored from the
        # param groups), yet distrib_optimizer.py:1223 indexes every destination state key:
        # KeyError 'step'. A None entry is the function's own "nothing to copy" marker.
        tensors = dict(tensors)
        tensors.setdefault("step", None)
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _applied = True


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam `step` tensor after a distributed-optimizer load.

    distrib_optimizer.py:1028-1032 assigns one shared `step` tensor to all params; torch AdamW
    then increments it once per param per step, skewing bias correction after every resume.
    """
    for inner in _torch_optimizers(optimizer):
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()


def _torch_optimizers(optimizer):
    chained = getattr(optimizer, "chained_optimizers", None)
    for o in chained if chained is not None else [optimizer]:
        inner = getattr(o, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            yield inner
