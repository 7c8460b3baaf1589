"""Process groups: torch.distributed plus megatron-core's model-parallel state."""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tts import compat
from megatron_tts.compat.elastic import worker_store
from megatron_tts.compat.mcore import parallel_state as ps
from megatron_tts.config import Config, resolve_backend, validate_world


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes metrics: last pipeline stage (it has the loss), TP 0, DP 0."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.pp_rank == self.pp - 1


def init_distributed(cfg: Config) -> Layout:
    """Join the torchrun world (or a world of one) and build megatron's groups."""
    compat.activate()  # the CPU layer where CUDA is absent, the optimizer fixes
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    validate_world(cfg, world)
    backend = resolve_backend(cfg)
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend=nccl needs CUDA; use parallel.backend=gloo (or auto) on CPU")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain `python -m launch.pretrain`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        timeout = datetime.timedelta(seconds=cfg.collective_timeout_s)
        # Under torchrun: a namespace of its shared store per rendezvous round (compat.elastic),
        # so that a restarted worker never reads the dead round's peer addresses.
        store = worker_store(world, timeout)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, store=store)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=cfg.parallel.pp,
        virtual_pipeline_model_parallel_size=cfg.parallel.vpp,
        # rounded up: megatron's groups must not time out before the watchdog (config.py)
        distributed_timeout_minutes=max(1, math.ceil(cfg.collective_timeout_s / 60)),
    )
    return Layout(
        rank=rank, world_size=world, local_rank=local_rank,
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), device=device,
    )


def destroy_distributed() -> None:
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
