"""``train.init_from=hf:DIR``: a pretrained Llama's weights into this rank's model chunks, under any
TP/PP/VPP layout, in the training process group.

Each rank walks its own chunks' sharded state (the same view dist_checkpointing uses) and reads
from the safetensors only the tensors of its layers, one at a time, copying the slice it holds:
no rank materialises the whole model. A base text model (vocab = the recipe's text vocab) gets
the special and codec rows appended, initialised as transformers' ``resize_token_embeddings``
does by default: the mean of the old rows plus noise with 1e-9 x their covariance, seeded by
``train.seed`` so every rank (and a rerun) draws the same rows. An already extended checkpoint (a
released LLaSA model, vocab 193,800) is copied as is.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Optional

import torch

from megatron_tts.compat.mcore import ShardedTensor, ShardedTensorFactory
from megatron_tts.config import Config, padded_vocab_size, real_vocab_size, vocab_layout
from megatron_tts.hf import mapping as M
from megatron_tts.hf.checkpoint import HFCheckpoint, HFCheckpointError, LlamaShape

log = logging.getLogger("megatron_tts")

# megatron-core's llama3 RoPE scaling (rotary_pos_embedding.py _apply_scaling) fixes these.
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def recipe_problems(cfg: Config, s: LlamaShape, where: str) -> list[str]:
    """Every way the HF config disagrees with the recipe, naming both values."""
    t, m = cfg.model.transformer, cfg.model
    kv_ch = t.kv_channels or t.hidden_size // t.num_attention_heads
    checks = [("num_hidden_layers", s.num_layers, "model.transformer.num_layers", t.num_layers),
              ("hidden_size", s.hidden_size, "model.transformer.hidden_size", t.hidden_size),
              ("intermediate_size", s.ffn_hidden_size, "model.transformer.ffn_hidden_size", t.ffn_hidden_size),
              ("num_attention_heads", s.num_heads, "model.transformer.num_attention_heads", t.num_attention_heads),
              ("num_key_value_heads", s.num_kv_heads, "model.transformer.num_query_groups",
               t.num_query_groups or t.num_attention_heads),
              ("head_dim", s.head_dim, "model.transformer.kv_channels", kv_ch),
              ("tie_word_embeddings", s.tie_embeddings, "model.share_embeddings", m.share_embeddings),
              ("rope_theta", s.rope_theta, "model.rotary_base", float(m.rotary_base)),
              ("attention_bias/mlp_bias", s.attention_bias or s.mlp_bias, "model.transformer.add_bias_linear",
               bool(t.add_bias_linear)),
              ("hidden_act", s.hidden_act, "model.transformer.activation_func (silu, gated)",
               "silu" if t.gated_linear_unit and getattr(t.activation_func, "__name__", "") == "silu" else "other")]
    out = [f"{where}/config.json {a}={va!r} but the recipe's {b}={vb!r}; set {b}={va!r} (or use another "
           "checkpoint)" for a, va, b, vb in checks if va != vb]
    if not math.isclose(s.rms_norm_eps, t.layernorm_epsilon, rel_tol=1e-6):
        out.append(f"{where}/config.json rms_norm_eps={s.rms_norm_eps!r} but the recipe's "
                   f"model.transformer.layernorm_epsilon={t.layernorm_epsilon!r}; set it to {s.rms_norm_eps!r}")
    if s.rope_scaling is None:
        if m.rope_scaling:
            out.append(f"{where}/config.json has no rope scaling but the recipe sets model.rope_scaling=true; "
                       "set it false")
    else:
        kind = s.rope_scaling.get("rope_type", s.rope_scaling.get("type"))
        factor = float(s.rope_scaling.get("factor", 0))
        if kind != "llama3":
            out.append(f"{where}/config.json rope scaling {kind!r} is not supported (llama3 only)")
        elif not m.rope_scaling or not math.isclose(factor, m.rope_scaling_factor):
            out.append(f"{where}/config.json llama3 rope scaling with factor {factor:g} but the recipe's "
                       f"model.rope_scaling={m.rope_scaling} model.rope_scaling_factor={m.rope_scaling_factor:g}; set "
                       f"model.rope_scaling=true model.rope_scaling_factor={factor:g}")
        for k, want in _MEGATRON_LLAMA3.items():
            if k in s.rope_scaling and not math.isclose(float(s.rope_scaling[k]), want):
                out.append(f"{where}/config.json rope scaling {k}={s.rope_scaling[k]} is not what megatron-core's "
                           f"llama3 scaling uses ({want:g})")
    return out


def vocab_kind(cfg: Config, s: LlamaShape, where: str) -> str:
    """'base' (text vocab only: extend it) or 'extended' (already holds specials and codes)."""
    text, real = cfg.model.vocab.text_vocab_size, real_vocab_size(cfg)
    if s.vocab_size == text:
        return "base"
    if s.vocab_size == real:
        return "extended"
    raise HFCheckpointError(f"{where}/config.json vocab_size={s.vocab_size} matches neither the recipe's text "
                            f"vocabulary ({text}: a base model) nor its full vocabulary ({real}: text + specials + "
                            "codec codes, an extended model); check model.vocab.* against the checkpoint", where)


def extend_rows(old: torch.Tensor, n_new: int, seed: int) -> torch.Tensor:
    """n_new rows drawn like transformers' mean resizing: mean + N(0, 1e-9 cov) of the old rows
    (the mean alone when that covariance is not positive definite). Seeded: identical on every rank."""
    x = old.to(torch.float64)
    mean = x.mean(dim=0)
    centered = x - mean
    cov = centered.T @ centered / x.shape[0] * 1e-9
    g = torch.Generator().manual_seed(seed)
    try:
        chol = torch.linalg.cholesky(cov)
    except RuntimeError:
        return mean.expand(n_new, -1).to(old.dtype).clone()
    z = torch.randn(n_new, x.shape[1], generator=g, dtype=torch.float64)
    return (mean + z @ chol.T).to(old.dtype)


def tokenizer_problems(cfg: Config, hf: HFCheckpoint, kind: str) -> list[str]:
    """The checkpoint's tokenizer must agree with the vocabulary the weights have: the text ids of
    a base model; the specials (and codes) at the layout's ids in an extended one."""
    file = hf.file("tokenizer.json")
    if not os.path.exists(file):
        return [f"{hf.path}/tokenizer.json is missing (a Hugging Face model directory holds its tokenizer)"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(file)
    vl = vocab_layout(cfg)
    if kind == "base":
        n = tok.get_vocab_size(with_added_tokens=True)
        return [] if n == vl.text_vocab_size else [
            f"{hf.path}/tokenizer.json has {n} ids but the weights' vocabulary is {vl.text_vocab_size}"]
    wrong = [(t, tok.token_to_id(t), vl.special_id(t)) for t in vl.special_tokens if tok.token_to_id(t) != vl.special_id(t)]
    if wrong:
        t, have, want = wrong[0]
        return [f"{hf.path}/tokenizer.json lacks the special tokens of an extended model at their ids ({t}: "
                f"{have if have is not None else 'absent'}, expected {want}; {len(wrong)} of "
                f"{len(vl.special_tokens)} wrong): not the tokenizer of these weights"]
    return []


class Importer:
    """Full megatron-layout tensors from an HF checkpoint, one key (and layer) at a time."""

    def __init__(self, cfg: Config, hf: HFCheckpoint) -> None:
        self.cfg, self.hf = cfg, hf
        s = hf.shape
        self.heads = M.Heads(s.num_heads, s.num_kv_heads, s.head_dim)
        self.kind = vocab_kind(cfg, s, hf.path)
        self._vocab_cache: dict[str, torch.Tensor] = {}

    def _rows(self, hf_name: str, what: str) -> torch.Tensor:
        """[Vpad, h]: the checkpoint's rows, new rows for a base model, zero padding."""
        if hf_name not in self._vocab_cache:
            old = self.hf.get(hf_name).to(torch.float32)
            real, padded = real_vocab_size(self.cfg), padded_vocab_size(self.cfg)
            full = torch.zeros(padded, old.shape[1], dtype=torch.float32)
            full[: old.shape[0]] = old
            if self.kind == "base":
                seed = int.from_bytes(hashlib.sha256(f"{self.cfg.train.seed}|{what}".encode()).digest()[:4], "little")
                full[old.shape[0]:real] = extend_rows(old, real - old.shape[0], seed)
            self._vocab_cache[hf_name] = full
        return self._vocab_cache[hf_name]

    def tensor(self, key: str, layer: Optional[int]) -> torch.Tensor:
        if key == M.EMBEDDING:
            return self._rows("model.embed_tokens.weight", "embedding")
        if key == M.OUTPUT:
            if self.hf.shape.tie_embeddings:
                return self._rows("model.embed_tokens.weight", "embedding")
            return self._rows("lm_head.weight", "lm_head")
        if key == M.FINAL_NORM:
            return self.hf.get("model.norm.weight")
        return M.megatron_layer_tensor(key, self.hf.get, layer, self.heads)


def _local_shards(chunk) -> list:
    out = []
    for value in chunk.sharded_state_dict().values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            out.extend(built if isinstance(built, list) else list(built.values()) if isinstance(built, dict) else [built])
        elif isinstance(value, ShardedTensor):
            out.append(value)
    return out


@torch.no_grad()
def load_hf(chunks: list, cfg: Config, path: str) -> str:
    """Copy an HF Llama into this rank's chunks (unwrapped GPTModels). Returns a one-line summary."""
    hf = HFCheckpoint(path)
    problems = recipe_problems(cfg, hf.shape, hf.path)
    if problems:
        raise HFCheckpointError(problems, hf.path)
    imp = Importer(cfg, hf)
    problems = tokenizer_problems(cfg, hf, imp.kind)
    if problems:
        raise HFCheckpointError(problems, hf.path)
    copied = 0
    for chunk in chunks:
        for st in _local_shards(chunk):
            if st.data is None or st.flattened_range is not None or not st.data.is_floating_point():
                continue
            n = st.prepend_axis_num
            key = st.key.split("/")[0]
            layer = int(st.global_offset[0]) if n else None
            full = imp.tensor(key, layer)
            want = tuple(st.global_shape[n:])
            if tuple(full.shape) != want:
                raise HFCheckpointError(f"{hf.path}: {key} has shape {tuple(full.shape)} in megatron's layout, "
                                        f"the model expects {want}", hf.path)
            index = tuple(slice(o, o + s) for o, s in zip(st.global_offset[n:], st.local_shape[-len(want):]))
            st.data.copy_(full[index].reshape(st.data.shape).to(dtype=st.data.dtype, device=st.data.device))
            copied += 1
    hf.close()
    return (f"initialised from {hf.path} ({imp.kind} vocabulary {hf.shape.vocab_size}"
            + (f" extended to {real_vocab_size(cfg)}" if imp.kind == "base" else "") + f"; {copied} tensor shards)")
