"""RMSNorm for megatron's local layer spec that also works under sequence parallelism.

megatron-core's WrappedTorchNorm asserts when sequence_parallel is on (torch_norm.py:50), yet a
plain torch RMSNorm is correct there as long as its weight is tagged ``sequence_parallel``:
finalize_model_grads then all-reduces that weight's gradient over the TP group, since each TP
rank saw only its slice of the sequence. (transformer-engine and apex norms do the same.)
"""

from __future__ import annotations

import torch


class LocalRMSNorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        if config.normalization != "RMSNorm":
            raise ValueError(f"LocalRMSNorm builds RMSNorm only, config asks for {config.normalization}")
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = bool(config.sequence_parallel)
        return norm
