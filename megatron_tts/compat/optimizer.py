"""Workarounds for megatron-core 0.19.2 bugs that silently break a distributed-optimizer resume
when megatron falls back to torch's AdamW (no transformer-engine/apex: CPU, or a GPU without
them). Rows of megatron_tts.compat.WORKAROUNDS; proven by tests/distributed/test_resume.py,
which compares a resumed run with an uninterrupted one bit for bit.
"""

from __future__ import annotations

import torch

from megatron_tts.compat.mcore import DistributedOptimizer

_applied = False


def apply() -> None:
    """Patch DistributedOptimizer once per process (version-checked by megatron_tts.compat)."""
    global _applied
    if _applied:
        return
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


def init_optimizer_states(optimizer) -> None:
    """A fresh distributed optimizer has no Adam states until its first step; loading needs them
    (distrib_optimizer.py:839 asserts, :1223 KeyError 'step')."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(o, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()


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


def _megatron_optimizers(optimizer):
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def main_model_params(optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model parameter, the optimizer's main copy of it) for every parameter this rank updates:
    the fp32 master copy of a 16-bit parameter (Float16OptimizerWithFloat16Params), the parameter
    itself otherwise (FP32Optimizer, fp32 parameters). Not the distributed optimizer (its main
    copies are DP shards)."""
    pairs = []
    for o in _megatron_optimizers(optimizer):
        if isinstance(o, DistributedOptimizer):
            raise TypeError("main_model_params: the distributed optimizer keeps DP shards of the main params")
        if hasattr(o, "float16_groups"):
            for model_group, main_group in zip(o.float16_groups, o.fp32_from_float16_groups):
                pairs += list(zip(model_group, main_group))
            pairs += [(p, p) for group in o.fp32_from_fp32_groups for p in group]
        else:
            pairs += [(p, p) for group in o.optimizer.param_groups for p in group["params"]]
    return pairs


def copy_main_to_model(optimizer) -> None:
    """After the main (fp32) params were changed outside optimizer.step(): the model's 16-bit
    params follow (megatron does this at the end of every step)."""
    for o in _megatron_optimizers(optimizer):
        if hasattr(o, "float16_groups"):
            o._copy_main_params_to_model_params()
