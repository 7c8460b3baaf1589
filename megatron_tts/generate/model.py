"""What generation needs from a trained model, whatever it came as: a run directory or checkpoint
of this project (converted to HF tensors in memory), a model exported by ``megatron_tts.hf``, or a
LLaSA release (vocab 193,800, LLaSA's framing, xcodec2)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_pipeline.layouts import LLASA_SPECIAL_TOKENS, VocabLayout
from megatron_tts.generate.llama import Llama
from megatron_tts.hf.checkpoint import HFCheckpoint, read_shape


class GenerateError(ValueError):
    pass


@dataclass
class SpeechLM:
    model: Llama
    vocab: VocabLayout
    framing: str  # 'plain' | 'llasa_chat'
    chat_date: str
    codec: dict  # the codec identity recorded in training (name, version, rates, sha256)
    tokenizer: object  # .encode(text) -> text ids (no special tokens)
    tokenizer_file: Optional[str]  # the HF tokenizer.json (llasa_chat renders its chat template)
    data_dir: Optional[str]  # the training dataset (the demo codec's codebook lives there)

    def special(self, name: str) -> int:
        return self.vocab.special_id(name)


class _HFText:
    """Text ids of an exported / released tokenizer (added speech tokens never appear in text)."""

    def __init__(self, file: str) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(file)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)


def _is_hf_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) and (
        os.path.exists(os.path.join(path, "model.safetensors")) or
        os.path.exists(os.path.join(path, "model.safetensors.index.json")))


def load(path: str, device: str = "cpu") -> SpeechLM:
    if _is_hf_dir(path):
        return _from_hf(path, device)
    return _from_checkpoint(path, device)


def _from_hf(path: str, device: str) -> SpeechLM:
    hf = HFCheckpoint(path)
    tensors = {name: hf.get(name) for name in hf.names()}
    tok_file = os.path.join(path, "tokenizer.json")
    meta_file = os.path.join(path, "speech_lm.json")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        v = meta["vocab"]
        vocab = VocabLayout(v["text_vocab_size"], list(meta["special_tokens"]), v["n_codebooks"], v["codebook_size"])
        framing, date, codec = meta["framing"], meta["chat_date"], meta.get("codec", {})
    else:  # a LLaSA release: its layout and framing by construction
        text = hf.shape.vocab_size - len(LLASA_SPECIAL_TOKENS) - 65536
        if text <= 0:
            raise GenerateError(f"{path} has neither speech_lm.json nor LLaSA's vocabulary (text + 8 + 65,536)")
        vocab = VocabLayout(text, list(LLASA_SPECIAL_TOKENS), 1, 65536)
        framing, date, codec = "llasa_chat", "26 Jul 2024", {"name": "xcodec2"}
    if not os.path.exists(tok_file):
        raise GenerateError(f"{path}/tokenizer.json is missing")
    model = Llama(hf.shape, tensors).to(device)
    return SpeechLM(model, vocab, framing, date, codec, _HFText(tok_file), tok_file, None)


def _from_checkpoint(path: str, device: str) -> SpeechLM:
    from data_pipeline.tokenizer import build_tokenizer
    from megatron_tts.config import vocab_layout
    from megatron_tts.hf import mapping as M
    from megatron_tts.hf.exporter import checkpoint_config, hf_config, model_tensors, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    vl = vocab_layout(cfg)
    t = cfg.model.transformer
    heads = M.Heads(t.num_attention_heads, t.num_query_groups or t.num_attention_heads,
                    t.kv_channels or t.hidden_size // t.num_attention_heads)
    tensors = M.hf_state_dict(model_tensors(ckpt), heads, vl.vocab_size, cfg.model.share_embeddings)
    shape = read_shape(hf_config(cfg, "fp32", {}), ckpt)
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        codec = (json.load(f).get("fingerprint") or {}).get("codec", {})
    tok = build_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path)
    return SpeechLM(Llama(shape, tensors).to(device), vl, cfg.model.framing, cfg.model.chat_date, codec, tok,
                    getattr(tok, "path", None), cfg.data.paths[0] if cfg.data.paths else None)


def prompt_ids(lm: SpeechLM, text: str, prompt_codes: Optional[np.ndarray] = None) -> list[int]:
    """The sequence up to SPEECH_GENERATION_START (+ a voice prompt's speech ids), framed as in
    training: LLaSA's chat framing or the plain one."""
    tus, tue = lm.special("<|TEXT_UNDERSTANDING_START|>"), lm.special("<|TEXT_UNDERSTANDING_END|>")
    sgs = lm.special("<|SPEECH_GENERATION_START|>")
    text_part = [tus] + lm.tokenizer.encode(text) + [tue]
    if lm.framing == "llasa_chat":
        from data_pipeline.chat import llasa_chat_frame

        ids = llasa_chat_frame(lm.tokenizer_file, lm.chat_date).prompt(text_part, sgs)
    else:
        ids = text_part + [sgs]
    if prompt_codes is not None:
        ids += speech_ids(lm, prompt_codes)
    return ids


def speech_ids(lm: SpeechLM, codes: np.ndarray) -> list[int]:
    """Codes [n_q, T] -> speech token ids (frame-major across books for a flattened layout)."""
    codes = np.asarray(codes)
    if codes.shape[0] != lm.vocab.n_codebooks:
        raise GenerateError(f"prompt codes have {codes.shape[0]} books, the model {lm.vocab.n_codebooks}")
    offsets = lm.vocab.speech_offset + np.arange(codes.shape[0])[:, None] * lm.vocab.codebook_size
    return (codes + offsets).T.reshape(-1).astype(int).tolist()


def to_codes(lm: SpeechLM, ids: list[int]) -> np.ndarray:
    """Generated speech ids -> codes [n_q, T] (an incomplete last frame is dropped)."""
    n_q = lm.vocab.n_codebooks
    x = np.asarray(ids[: len(ids) // n_q * n_q], dtype=np.int64).reshape(-1, n_q).T
    return (x - lm.vocab.speech_offset - np.arange(n_q)[:, None] * lm.vocab.codebook_size).astype(np.int64)

