"""Facts derived from the config tree that several layers need (no state of their own)."""

from __future__ import annotations

import math

import torch

from data_pipeline.layouts import LLASA_SPECIAL_TOKENS, VocabLayout
from megatron_tts.config.schema import Config


def resolve_backend(cfg: Config) -> str:
    """parallel.backend, with auto = nccl on CUDA machines, gloo elsewhere."""
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_dtype(cfg: Config) -> str:
    """train.dtype, with auto = bf16 on CUDA machines, fp32 elsewhere."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bf16" if torch.cuda.is_available() else "fp32"


def vocab_layout(cfg: Config) -> VocabLayout:
    v = cfg.model.vocab
    return VocabLayout(text_vocab_size=v.text_vocab_size,
                       special_tokens=list(v.special_tokens if v.special_tokens is not None else LLASA_SPECIAL_TOKENS),
                       n_codebooks=v.n_codebooks, codebook_size=v.codebook_size)


def real_vocab_size(cfg: Config) -> int:
    v = cfg.model.vocab
    specials = v.special_tokens if v.special_tokens is not None else LLASA_SPECIAL_TOKENS
    return v.text_vocab_size + len(specials) + v.n_codebooks * v.codebook_size


def vocab_padding_multiple(tp: int) -> int:
    """Embedding rows are padded to a multiple of 128 x lcm(tp, 8): split evenly over TP, and the
    same padded size under every power-of-two TP <= 8, so checkpoints reshard across them."""
    return 128 * math.lcm(max(tp, 1), 8)


def padded_vocab_size(cfg: Config) -> int:
    """model.vocab.padded_size, or the real vocabulary rounded up to vocab_padding_multiple(tp)."""
    v = cfg.model.vocab
    if v.padded_size is not None:
        return v.padded_size
    multiple = vocab_padding_multiple(cfg.parallel.tp)
    return math.ceil(real_vocab_size(cfg) / multiple) * multiple


def check_padded_vocab(cfg: Config) -> list[str]:
    """An explicit model.vocab.padded_size must hold the vocabulary and split evenly over TP."""
    v, tp = cfg.model.vocab, cfg.parallel.tp
    if v.padded_size is None or not isinstance(tp, int) or tp < 1:
        return []
    vocab = real_vocab_size(cfg)
    multiple = 128 * tp
    if v.padded_size < vocab:
        return [f"model.vocab.padded_size={v.padded_size} is smaller than the vocab ({vocab}); "
                f"use {math.ceil(vocab / multiple) * multiple}"]
    if v.padded_size % multiple:
        return [f"model.vocab.padded_size={v.padded_size} is not a multiple of 128 x tp = {multiple} (megatron splits "
                f"the embedding rows evenly over TP); use {math.ceil(v.padded_size / multiple) * multiple} or omit it"]
    return []


def parameter_count(cfg: Config) -> int:
    """The model's parameters from its shape (embedding, layers, final norm, untied LM head), as
    megatron builds them with the local or TE layer spec (tests/unit/test_config.py checks it
    against a built model)."""
    t = cfg.model.transformer
    h, f, layers = t.hidden_size, t.ffn_hidden_size, t.num_layers
    kv_ch = t.kv_channels or h // t.num_attention_heads
    q, kv = t.num_attention_heads * kv_ch, (t.num_query_groups or t.num_attention_heads) * kv_ch
    fc1 = 2 * f if t.gated_linear_unit else f
    per_layer = 2 * h + h * (q + 2 * kv) + q * h + h * fc1 + f * h
    if t.add_bias_linear:
        per_layer += (q + 2 * kv) + h + fc1 + h
    vocab = padded_vocab_size(cfg)
    return vocab * h * (1 if cfg.model.share_embeddings else 2) + layers * per_layer + h


def checkpoint_bytes(cfg: Config) -> int:
    """One checkpoint's size: the weights in their training dtype, plus Adam's fp32 moments and,
    with bf16, the fp32 main copy: 12 bytes a parameter in fp32, 14 in bf16."""
    per_param = 4 + 8 if resolve_dtype(cfg) == "fp32" else 2 + 4 + 8
    return parameter_count(cfg) * per_param


def checkpoint_space_bytes(cfg: Config) -> tuple[int, str]:
    """Free space a run needs for its checkpoints: checkpoint.keep_last kept plus the one being
    written, with the save's own margin (x1.2). Returns (bytes, how it was derived)."""
    one = checkpoint_bytes(cfg)
    n = cfg.checkpoint.keep_last + 1
    need = int(one * n * 1.2)
    why = (f"{parameter_count(cfg) / 1e6:,.1f}M params x {one / parameter_count(cfg):.0f} B "
           f"({resolve_dtype(cfg)} weights + Adam state) = {one / 1e9:.3f} GB per checkpoint, x {n} "
           f"(checkpoint.keep_last={cfg.checkpoint.keep_last} + the one in flight), x 1.2 margin")
    if cfg.checkpoint.keep_every:
        why += f"; checkpoint.keep_every={cfg.checkpoint.keep_every} keeps more over time"
    return need, why


def hierarchical_inner_size(cfg: Config, ranks_per_node: int) -> int:
    """DP ranks per inner group of parallel.hierarchical: an int as given, or 'node' = the DP ranks
    that share a node (megatron orders ranks TP-fastest, then DP: ranks_per_node / tp of them)."""
    inner = cfg.parallel.hierarchical.inner
    if inner == "node":
        return max(1, ranks_per_node // cfg.parallel.tp)
    return int(inner)
