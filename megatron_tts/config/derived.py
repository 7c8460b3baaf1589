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
