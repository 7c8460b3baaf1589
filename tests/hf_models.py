"""Local Hugging Face Llama models and tokenizers for tests, built with transformers and
tokenizers (nothing is downloaded): random weights of a Llama-3.2-1B-like shape, scaled down."""

from __future__ import annotations

import json
import os

import torch

from tests.helpers import REPO

CHAT_TEMPLATE = open(os.path.join(REPO, "tests", "fixtures", "llama32_chat_template.jinja")).read()
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama3_style_tokenizer(out_dir: str, texts: list[str], vocab_size: int = 400) -> str:
    """A byte-level BPE with Llama-3's special tokens and the Llama-3.2 chat template, padded with
    reserved tokens to exactly vocab_size ids. Returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(LLAMA3_SPECIALS) - 8, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(vocab_size)]
    tok.add_special_tokens(LLAMA3_SPECIALS)
    tok.add_special_tokens(reserved[: vocab_size - tok.get_vocab_size(with_added_tokens=True)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}, f)
    return path


def llama_config(vocab: int, tied: bool = True, scaled: bool = True, layers: int = 4, hidden: int = 64,
                 heads: int = 4, kv_heads: int = 2, ffn: int = 192):
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192} if scaled else None
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                       rope_theta=500000.0, rope_scaling=rope, rms_norm_eps=1e-5, max_position_embeddings=131072,
                       torch_dtype="float32")


def save_random_llama(out_dir: str, vocab: int, seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """A random LlamaForCausalLM saved as safetensors + config.json; returns its saved tensors."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab, **shape)).float()
    with torch.no_grad():  # norms away from 1 so that a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "model.safetensors"))  # what is on disk (no tied alias)


def recipe_overrides(tied: bool = True, scaled: bool = True, layers: int = 4, hidden: int = 64, heads: int = 4,
                     kv_heads: int = 2, ffn: int = 192) -> list[str]:
    """tiny.yaml overrides of the same shape."""
    return [f"model.transformer.num_layers={layers}", f"model.transformer.hidden_size={hidden}",
            f"model.transformer.ffn_hidden_size={ffn}", f"model.transformer.num_attention_heads={heads}",
            f"model.transformer.num_query_groups={kv_heads}", "model.rotary_base=500000",
            f"model.share_embeddings={str(tied).lower()}", f"model.rope_scaling={str(scaled).lower()}",
            "model.rope_scaling_factor=32"]
