"""A small, self-contained Llama for sampling with a KV cache (CPU or one GPU), loaded from Hugging
Face tensors: the exported model, a LLaSA release, or a checkpoint of this project converted in
memory. Independent of megatron and of transformers, so that tests can hold it against both.

Llama-3.x exactly: GQA, RMSNorm, SwiGLU, RoPE (rotate-half, optional llama3 frequency scaling),
tied or untied LM head, no biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tts.hf.checkpoint import LlamaShape


def rope_frequencies(s: LlamaShape) -> torch.Tensor:
    """inv_freq [head_dim / 2], with llama3 scaling when the config asks for it."""
    d = s.head_dim
    inv = 1.0 / (s.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    r = s.rope_scaling
    if not r:
        return inv.float()
    factor, low, high = float(r["factor"]), float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old = float(r.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, kv_heads, T, head_dim]
    v: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.k[0].shape[2] if self.k else 0


class Llama(torch.nn.Module):
    def __init__(self, shape: LlamaShape, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.s = shape
        self.w = {k: v.to(dtype) for k, v in tensors.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]  # tied
        self.register_buffer("inv_freq", rope_frequencies(shape), persistent=False)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: Optional[KVCache] = None) -> tuple[torch.Tensor, KVCache]:
        """Logits [B, T, V] of ids [B, T] continuing ``cache`` (positions follow it)."""
        s, w = self.s, self.w
        b, t = ids.shape
        start = cache.length if cache is not None else 0
        new = KVCache([], [])
        x = F.embedding(ids, w["model.embed_tokens.weight"])
        cos, sin = self._cos_sin(torch.arange(start, start + t), x.dtype)
        groups = s.num_heads // s.num_kv_heads
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            h = _rms(x, w[p + "input_layernorm.weight"], s.rms_norm_eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if cache is not None:
                k, v = torch.cat([cache.k[i], k], dim=2), torch.cat([cache.v[i], v], dim=2)
            new.k.append(k)
            new.v.append(v)
            kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            # causal over the whole cached sequence: query j sits at position start + j
            mask = torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)
            a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            x = x + a.transpose(1, 2).reshape(b, t, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = _rms(x, w[p + "post_attention_layernorm.weight"], s.rms_norm_eps)
            gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        x = _rms(x, w["model.norm.weight"], s.rms_norm_eps)
        return (x @ w["lm_head.weight"].T).float(), new
