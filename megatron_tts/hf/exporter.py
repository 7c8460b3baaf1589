"""``python -m megatron_tts.hf export RUN_DIR|CHECKPOINT --out HF_DIR``: a Hugging Face
LlamaForCausalLM from a checkpoint of any TP/PP/DP layout (distributed optimizer included), on
one CPU process, without a GPU or a process group.

Only the model's tensors are read from the checkpoint (torch DCP reads the keys it is asked for;
the optimizer state stays on disk), each as the full global tensor. The padding rows of the
vocabulary are dropped (193,800 rows for LLaSA, not 194,560). Written: safetensors (sharded above
``--max-shard-gb``, 5 GB by default, with its index), config.json, generation_config.json,
speech_lm.json (how the vocabulary, framing and codec were laid out in training), and the
extended tokenizer (megatron_tts.hf.tokenizer).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_tts.checkpoint import format as fmt
from megatron_tts.compat.dist_ckpt import AllowListUnpickler, metadata_allowed, safe_unpickling
from megatron_tts.config import Config, load_config, real_vocab_size, vocab_layout
from megatron_tts.hf import mapping as M
from megatron_tts.hf.tokenizer import export_tokenizer

MAX_SHARD_BYTES = 5 * 10 ** 9
M_WEIGHTS = "model.safetensors"
LLAMA3_MAX_POSITIONS = 131072  # Llama-3.1/3.2 with llama3 rope scaling


class ExportError(ValueError):
    pass


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory: as given, or the newest verified one of a run dir / checkpoint root."""
    path = path.rstrip("/")
    if os.path.exists(os.path.join(path, fmt.COMMITTED)):
        problem = fmt.verify(path)
        if problem:
            raise ExportError(f"checkpoint {path} does not verify: {problem}")
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        for info in reversed(fmt.list_checkpoints(root)):
            if info.committed and fmt.verify(info.path) is None:
                return info.path
    raise ExportError(f"{path}: no committed checkpoint that verifies (give a run directory, its checkpoints/ or "
                      "one checkpoint directory)")


def checkpoint_config(ckpt: str, config: Optional[str] = None) -> Config:
    """The recipe a checkpoint was trained with: its own config.yaml, else its run's."""
    candidates = [config] if config else [os.path.join(ckpt, "config.yaml"),
                                          os.path.join(os.path.dirname(os.path.dirname(ckpt)), "config.yaml")]
    for c in candidates:
        if c and os.path.exists(c):
            return load_config(c)
    raise ExportError(f"no config.yaml in {ckpt} or its run directory; pass --config RECIPE with the run's settings")


def model_tensors(ckpt: str) -> dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint as one full tensor (layer axis first), read with torch
    DCP on one process; nothing else is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        md = AllowListUnpickler(f, metadata_allowed(), ".metadata").load()
    wanted = {}
    for key, item in md.state_dict_metadata.items():
        if key.startswith("optimizer") or not isinstance(item, TensorStorageMetadata) or "_extra_state" in key:
            continue
        wanted[key] = torch.empty(item.size, dtype=item.properties.dtype)
    with safe_unpickling():
        dcp.load(wanted, checkpoint_id=ckpt, no_dist=True)
    return wanted


def hf_config(cfg: Config, dtype: str, specials: dict[str, int]) -> dict:
    t, m = cfg.model.transformer, cfg.model
    kv_ch = t.kv_channels or t.hidden_size // t.num_attention_heads
    rope = None
    if m.rope_scaling:
        rope = {"rope_type": "llama3", "factor": float(m.rope_scaling_factor), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    end = specials.get("<|SPEECH_GENERATION_END|>")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": real_vocab_size(cfg),
        "hidden_size": t.hidden_size, "intermediate_size": t.ffn_hidden_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_query_groups or t.num_attention_heads, "head_dim": kv_ch,
        "hidden_act": "silu", "rms_norm_eps": t.layernorm_epsilon, "tie_word_embeddings": m.share_embeddings,
        "rope_theta": float(m.rotary_base), "rope_scaling": rope,
        "max_position_embeddings": LLAMA3_MAX_POSITIONS if m.rope_scaling else cfg.data.seq_len,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": t.init_method_std,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32", "use_cache": True,
        "eos_token_id": end, "bos_token_id": None, "pad_token_id": None,
    }


def save_safetensors(tensors: dict[str, torch.Tensor], out: str, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, M_WEIGHTS), metadata=meta)
        return [M_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out, name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return names


def export(path: str, out: str, config: Optional[str] = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt, config)
    vl = vocab_layout(cfg)
    t = cfg.model.transformer
    heads = M.Heads(t.num_attention_heads, t.num_query_groups or t.num_attention_heads,
                    t.kv_channels or t.hidden_size // t.num_attention_heads)
    full = model_tensors(ckpt)
    missing = [k for k in (M.EMBEDDING, M.FINAL_NORM) + M.PER_LAYER if k not in full]
    if not cfg.model.share_embeddings and M.OUTPUT not in full:
        missing.append(M.OUTPUT)
    if missing:
        raise ExportError(f"checkpoint {ckpt} lacks model tensors {missing} (not a checkpoint of this model?)")
    tensors = M.hf_state_dict(full, heads, real_vocab_size(cfg), cfg.model.share_embeddings)
    os.makedirs(out, exist_ok=True)
    files = save_safetensors(tensors, out, max_shard_bytes)
    source = cfg.data.tokenizer.path if cfg.data.tokenizer.kind == "hf" else None
    specials = export_tokenizer(out, vl, source)
    dtype = "bf16" if full[M.EMBEDDING].dtype == torch.bfloat16 else "fp32"  # the weights as they were trained
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype, specials), f, indent=1)
    end = specials.get("<|SPEECH_GENERATION_END|>")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": end, "do_sample": True, "temperature": 0.8, "top_p": 1.0,
                   "max_length": cfg.data.seq_len}, f, indent=1)
    trainer_state = json.load(open(os.path.join(ckpt, fmt.STATE_FILE)))
    speech_lm = {"vocab": vl.to_dict(), "special_tokens": list(vl.special_tokens), "layout": cfg.model.layout,
                 "framing": cfg.model.framing, "chat_date": cfg.model.chat_date,
                 "codec": (trainer_state.get("fingerprint") or {}).get("codec", {}),
                 "checkpoint": ckpt, "step": trainer_state["step"]}
    with open(os.path.join(out, "speech_lm.json"), "w") as f:
        json.dump(speech_lm, f, indent=1)
    return {"checkpoint": ckpt, "step": trainer_state["step"], "out": out, "files": files,
            "tensors": len(tensors), "vocab_size": real_vocab_size(cfg)}
