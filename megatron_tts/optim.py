"""AdamW through megatron-core's optimizer, and the warmup + cosine / WSD schedule."""

from __future__ import annotations

import logging

import torch

from megatron_tts.compat.mcore import HAVE_APEX_OR_TE, OptimizerParamScheduler, get_megatron_optimizer
from megatron_tts.config import Config

log = logging.getLogger(__name__)


def fused_adam_available() -> bool:
    """What megatron-core's optimizer will use: fused Adam from transformer-engine or NVIDIA apex
    (detected by import only: PyPI's `apex` is an unrelated project), else torch AdamW."""
    return bool(HAVE_APEX_OR_TE)


def build_optimizer(cfg: Config, model_chunks: list[torch.nn.Module]):
    """megatron-core picks fused Adam from TE or apex when present, torch AdamW otherwise
    (its distributed-optimizer fixes are applied by megatron_tts.compat.activate)."""
    return get_megatron_optimizer(cfg.optim.optimizer, model_chunks)


def build_scheduler(cfg: Config, optimizer):
    o, s = cfg.optim.optimizer, cfg.optim.schedule
    decay_steps = s.decay_steps or cfg.train.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr if o.min_lr is not None else 0.0,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=max(decay_steps, s.warmup_steps + 1),
        lr_decay_style=s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(cfg.train.steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=s.wsd_decay_steps,
        lr_wsd_decay_style=s.wsd_decay_style if s.decay_style == "WSD" else None,
    )
