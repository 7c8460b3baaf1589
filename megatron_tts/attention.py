"""Core attention through torch's scaled_dot_product_attention, for megatron's local layer spec.

megatron-core's local DotProductAttention materialises [b, heads, s, s] scores in several
copies (baddbmm buffer, masked fill, softmax, dropout): on CPU it spent ~75% of a tiny-model
step there. SDPA fuses those and keeps GQA un-expanded. It takes the same explicit
block-diagonal mask, so packed documents never attend to each other. Drop-in: the same
constructor and forward signature as DotProductAttention, used as `core_attention` in the
local spec (model.core_attention=sdpa).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tts.compat.mcore import AttnMaskType, MegatronModule, ProcessGroupCollection, TransformerConfig, divide


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE layer spec")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("SDPAttention supports vanilla softmax without sliding windows only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        projection = config.kv_channels * config.num_attention_heads
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = divide(projection, config.num_attention_heads)
        self.hidden_per_partition = divide(projection, tp)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attn_mask_type = attn_mask_type

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes an explicit attention mask, not packed_seq_params/bias")
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        causal = False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked; SDPA: True = may attend
        else:
            causal = True
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.groups != self.heads)
        # [b, n, s, d] -> [s, b, n * d]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)
