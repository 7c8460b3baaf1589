"""Checkpoints: model and optimizer through megatron-core dist_checkpointing (torch_dist),
everything else (scheduler, loader, train state, RNG) beside them.

Layout of one checkpoint::

    RUN_DIR/checkpoints/step_00000100/
        <dist_checkpointing files>     model + optimizer, sharded, reshardable across TP/PP/DP
        trainer_state.json             step, consumed counts, scheduler, loader (JSON: no pickle)
        rng/rank_00000.pt ...          per-rank RNG states (tensors only, loaded weights_only)
        COMMITTED                      written last; a directory without it is never loaded

A save writes into ``.tmp.step_XXXXXXXX`` and is renamed into place by rank 0 only after every
rank finished, so a crash mid-save leaves the previous checkpoint as the newest committed one.

Every stateful component follows one convention: ``state_dict() -> dict`` and
``load_state_dict(dict)``; the JSON-able ones are listed in ``Checkpointer.components``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_tts.parallel import Layout

log = logging.getLogger(__name__)

COMMITTED = "COMMITTED"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def committed_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of committed checkpoints, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, COMMITTED)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, torch.Tensor]:
    import random

    import numpy as np

    state = {"torch_cpu": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state(np.random.get_state())).encode(), dtype=np.uint8).copy()),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    for name, s in get_cuda_rng_tracker().get_states().items():
        if isinstance(s, torch.Tensor):
            state[f"tracker/{name}"] = s.clone()
    return state


def _np_state(s: tuple) -> list:
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch_cpu"])
    ns = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), ns[2], ns[3], ns[4]))
    ps = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((ps[0], tuple(ps[1]), ps[2]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracked = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracked:
        tracker.set_states(tracked)


@dataclass
class LoadedCheckpoint:
    step: int
    path: str
    trainer_state: dict


class Checkpointer:
    """Saves and restores the model chunks, the optimizer and the named JSON-able components."""

    def __init__(self, root: str, layout: Layout, model: list, optimizer, components: dict[str, Stateful],
                 distributed_optimizer: bool = False, keep_last: int = 3) -> None:
        self.root = root
        self.layout = layout
        self.model = model
        self.optimizer = optimizer
        self.components = components
        self.distributed_optimizer = distributed_optimizer
        self.keep_last = keep_last
        self.last_save_blocking_s = 0.0

    # ---- sharded state ----
    def _model_sharded(self) -> dict:
        from megatron.core.distributed import DistributedDataParallel

        def inner(m):
            return m.module if isinstance(m, DistributedDataParallel) else m

        if len(self.model) == 1:
            return {"model": inner(self.model[0]).sharded_state_dict()}
        return {f"model{i}": inner(m).sharded_state_dict() for i, m in enumerate(self.model)}

    def _sharded(self, is_loading: bool) -> dict:
        model_sd = self._model_sharded()
        kwargs = {}
        if self.distributed_optimizer:
            # fully_reshardable stores optimizer state in model space: loadable under any
            # TP/PP/DP layout (dp_reshardable only across DP).
            kwargs["metadata"] = {"distrib_optim_sharding_type": "fully_reshardable"}
        sd = dict(model_sd)
        sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, **kwargs)
        return sd

    # ---- save ----
    def save(self, step: int, extra: Optional[dict] = None) -> str:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

        t0 = time.perf_counter()
        final = os.path.join(self.root, step_dir_name(step))
        tmp = os.path.join(self.root, ".tmp." + step_dir_name(step))
        if self.layout.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)  # empty: megatron warns about "incomplete" checkpoints otherwise
        _barrier()
        dist_checkpointing.save(self._sharded(is_loading=False), tmp,
                                sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        rng_path = os.path.join(tmp, "rng", f"rank_{self.layout.rank:05d}.pt")
        torch.save(rng_state(), rng_path)
        with open(rng_path, "rb+") as f:
            os.fsync(f.fileno())
        _barrier()
        if self.layout.rank == 0:
            state = {"step": step, "world_size": self.layout.world_size,
                     "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp},
                     "components": {name: c.state_dict() for name, c in self.components.items()},
                     **(extra or {})}
            _write_durable(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1).encode())
            for dirpath, _dirs, files in os.walk(tmp):
                for name in files:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        os.fsync(f.fileno())
                _fsync_dir(dirpath)
            if os.path.exists(final):  # a re-save of the same step (e.g. after a rollback)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            _write_durable(os.path.join(final, COMMITTED), json.dumps({"step": step, "time": time.time()}).encode())
            _fsync_dir(final)
            self._prune()
        _barrier()
        self.last_save_blocking_s = time.perf_counter() - t0
        return final

    def _prune(self) -> None:
        ckpts = committed_checkpoints(self.root)
        for _step, path in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- load ----
    def latest(self) -> Optional[tuple[int, str]]:
        ckpts = committed_checkpoints(self.root)
        return ckpts[-1] if ckpts else None

    def load(self, path: str) -> LoadedCheckpoint:
        from megatron.core import dist_checkpointing

        if not os.path.isfile(os.path.join(path, COMMITTED)):
            raise RuntimeError(f"checkpoint {path} has no {COMMITTED} marker: it was never finished; "
                               "pick a committed one or resume=auto")
        with open(os.path.join(path, STATE_FILE)) as f:
            trainer_state = json.load(f)
        if self.distributed_optimizer:
            _init_optimizer_states(self.optimizer)
        sharded = self._sharded(is_loading=True)
        loaded = dist_checkpointing.load(sharded, path)
        from megatron.core.distributed import DistributedDataParallel

        for i, m in enumerate(self.model):
            inner = m.module if isinstance(m, DistributedDataParallel) else m
            inner.load_state_dict(loaded["model"] if len(self.model) == 1 else loaded[f"model{i}"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        if self.distributed_optimizer:
            from megatron_tts.mcore_fixes import unshare_adam_steps

            unshare_adam_steps(self.optimizer)
        for name, comp in self.components.items():
            if name in trainer_state["components"]:
                comp.load_state_dict(trainer_state["components"][name])
        self._load_rng(path, trainer_state)
        return LoadedCheckpoint(step=trainer_state["step"], path=path, trainer_state=trainer_state)

    def _load_rng(self, path: str, trainer_state: dict) -> None:
        rng_path = os.path.join(path, "rng", f"rank_{self.layout.rank:05d}.pt")
        if trainer_state.get("world_size") == self.layout.world_size and os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
        else:
            # Another layout: per-rank RNG streams do not map onto new ranks; reseed
            # deterministically from (seed, step) instead. No dropout in our recipes, so the
            # loss curve does not depend on it.
            log.warning("checkpoint %s was written by %s ranks; reseeding RNG for %s ranks",
                        path, trainer_state.get("world_size"), self.layout.world_size)


def _init_optimizer_states(optimizer) -> None:
    """A fresh distributed optimizer has no Adam states until its first step; loading needs them
    (megatron-core 0.19.2 distrib_optimizer.py:839 asserts, :1223 KeyError 'step')."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(o, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
