"""Tensor names and layouts between Hugging Face Llama and this model's megatron-core checkpoint
keys (the global, layout-independent view that dist_checkpointing stores; per-layer tensors carry
the layer as their first axis there).

    HF model.embed_tokens.weight [V, h]              embedding.word_embeddings.weight [Vpad, h]
    HF layers.i.input_layernorm.weight               decoder.layers.self_attention.linear_qkv.layer_norm_weight
    HF layers.i.self_attn.{q,k,v}_proj.weight        decoder.layers.self_attention.linear_qkv.weight
       fused per KV group: the group's q heads, then its k head, then its v head
    HF layers.i.self_attn.o_proj.weight              decoder.layers.self_attention.linear_proj.weight
    HF layers.i.post_attention_layernorm.weight      decoder.layers.mlp.linear_fc1.layer_norm_weight
    HF layers.i.mlp.{gate,up}_proj.weight            decoder.layers.mlp.linear_fc1.weight  ([gate; up])
    HF layers.i.mlp.down_proj.weight                 decoder.layers.mlp.linear_fc2.weight
    HF model.norm.weight                             decoder.final_layernorm.weight
    HF lm_head.weight (untied only)                  output_layer.weight

RoPE needs no permutation (both apply the rotate-half convention). Vocabulary rows past the real
vocabulary are padding: zero here, masked out of the logits in training and dropped on export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
LAYER = "decoder.layers."
QKV = LAYER + "self_attention.linear_qkv.weight"
QKV_NORM = LAYER + "self_attention.linear_qkv.layer_norm_weight"
PROJ = LAYER + "self_attention.linear_proj.weight"
FC1 = LAYER + "mlp.linear_fc1.weight"
FC1_NORM = LAYER + "mlp.linear_fc1.layer_norm_weight"
FC2 = LAYER + "mlp.linear_fc2.weight"
# the same norms under megatron's local-spec names (the keys its sharded state uses are above)
LOCAL_NORMS = {LAYER + "input_layernorm.weight": QKV_NORM, LAYER + "pre_mlp_layernorm.weight": FC1_NORM}
PER_LAYER = (QKV, QKV_NORM, PROJ, FC1, FC1_NORM, FC2)


@dataclass(frozen=True)
class Heads:
    heads: int
    groups: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.groups


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: Heads) -> torch.Tensor:
    hidden = q.shape[-1]
    q = q.reshape(h.groups, h.per_group * h.head_dim, hidden)
    k = k.reshape(h.groups, h.head_dim, hidden)
    v = v.reshape(h.groups, h.head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(w: torch.Tensor, h: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = w.shape[-1]
    w = w.reshape(h.groups, h.per_group + 2, h.head_dim, hidden)
    q = w[:, : h.per_group].reshape(h.heads * h.head_dim, hidden)
    return q, w[:, h.per_group].reshape(-1, hidden), w[:, h.per_group + 1].reshape(-1, hidden)


def hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight", "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.o_proj.weight", "in_norm": p + "input_layernorm.weight",
            "post_norm": p + "post_attention_layernorm.weight", "gate": p + "mlp.gate_proj.weight",
            "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight"}


def megatron_layer_tensor(key: str, get, i: int, h: Heads) -> torch.Tensor:
    """Layer i's tensor for a per-layer megatron key, from HF tensors (``get(name)``)."""
    n = hf_layer_names(i)
    key = LOCAL_NORMS.get(key, key)
    if key == QKV:
        return fuse_qkv(get(n["q"]), get(n["k"]), get(n["v"]), h)
    if key == FC1:
        return torch.cat([get(n["gate"]), get(n["up"])], dim=0)
    simple = {QKV_NORM: "in_norm", PROJ: "o", FC1_NORM: "post_norm", FC2: "down"}
    if key not in simple:
        raise KeyError(f"no Hugging Face counterpart for {key} (biases and MoE are not mapped)")
    return get(n[simple[key]])


def hf_state_dict(full: dict[str, torch.Tensor], h: Heads, real_vocab: int, tied: bool) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors from full megatron tensors (the layer axis first)."""
    out = {"model.embed_tokens.weight": full[EMBEDDING][:real_vocab].contiguous(),
           "model.norm.weight": full[FINAL_NORM]}
    for i in range(full[QKV].shape[0]):
        n = hf_layer_names(i)
        q, k, v = split_qkv(full[QKV][i], h)
        gate, up = full[FC1][i].chunk(2, dim=0)
        out.update({n["q"]: q, n["k"]: k, n["v"]: v, n["o"]: full[PROJ][i], n["in_norm"]: full[QKV_NORM][i],
                    n["post_norm"]: full[FC1_NORM][i], n["gate"]: gate, n["up"]: up, n["down"]: full[FC2][i]})
    if not tied:
        out["lm_head.weight"] = full[OUTPUT][:real_vocab].contiguous()
    return {k: v.contiguous() for k, v in out.items()}
