"""LLaSA's chat framing, golden against transformers: the ids and the label mask our layout builds
equal what `apply_chat_template` plus LLaSA's official recipe (its training code's TTSDataset)
produce, on a locally built Llama-3-style tokenizer with the Llama-3.2 chat template."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_pipeline.chat import ChatTemplateError, llasa_chat_frame
from data_pipeline.layouts import CHAT_LOSS_SEGMENTS, LLASA_SPECIAL_TOKENS, VocabLayout, build_layout
from tests.hf_models import llama3_style_tokenizer

pytest.importorskip("transformers")

TEXTS = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
         "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
         "Rice is often served in round bowls.", "The juice of lemons makes fine punch."] * 20
DATE = "26 Jul 2024"
CODEBOOK = 64


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama3_tok"))
    llama3_style_tokenizer(d, TEXTS, vocab_size=400)
    return d


def llasa_reference(tok_dir: str, text: str, codes: list[int]) -> tuple[list[int], list[int]]:
    """LLaSA's recipe, step by step as its training code does it, with transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_tokens(LLASA_SPECIAL_TOKENS + [f"<|s_{i}|>" for i in range(CODEBOOK)])  # as train_tts.py
    tok.pad_token = tok.eos_token
    ids_of = tok.convert_tokens_to_ids
    text_seq = [ids_of("<|TEXT_UNDERSTANDING_START|>")] + tok.encode(text, add_special_tokens=False) + \
        [ids_of("<|TEXT_UNDERSTANDING_END|>")]
    speech_seq = [ids_of("<|SPEECH_GENERATION_START|>")] + [ids_of(f"<|s_{c}|>") for c in codes] + \
        [ids_of("<|SPEECH_GENERATION_END|>")]
    chat = [{"role": "user", "content": "Convert the text to speech:<|TEXT_UNDERSTANDING_START|>"},
            {"role": "assistant", "content": "<|SPEECH_GENERATION_START|>"}]
    ids = tok.apply_chat_template(chat, tokenize=True, date_string=DATE)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding

    def replace(seq, target, new):
        i = seq.index(target)
        return seq[:i] + list(new) + seq[i + 1:]

    ids = replace(ids, ids_of("<|TEXT_UNDERSTANDING_START|>"), text_seq)
    ids = replace(ids, ids_of("<|SPEECH_GENERATION_START|>"), speech_seq)
    start = ids.index(ids_of("<|SPEECH_GENERATION_START|>"))
    labels = [-100] * start + ids[start:]
    labels = [-100 if i == tok.pad_token_id else lab for i, lab in zip(ids, labels)]
    return ids, labels


@pytest.mark.parametrize("i", range(4))
def test_llasa_chat_sequences_equal_the_official_recipe(tok_dir, i):
    from tokenizers import Tokenizer

    rng = np.random.default_rng(i)
    text = TEXTS[i] if i < 3 else "  spaced   text, with a trailing space "
    codes = rng.integers(0, CODEBOOK, size=17 + 5 * i)
    want_ids, want_labels = llasa_reference(tok_dir, text, codes.tolist())
    base = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    vocab = VocabLayout(400, list(LLASA_SPECIAL_TOKENS), 1, CODEBOOK)
    frame = llasa_chat_frame(os.path.join(tok_dir, "tokenizer.json"), DATE)
    layout = build_layout("llasa", vocab, CHAT_LOSS_SEGMENTS, framing=frame)
    enc = layout.encode(base.encode(text, add_special_tokens=False).ids, codes[None, :])
    assert enc.ids.tolist() == want_ids
    assert [int(x) if m else -100 for x, m in zip(enc.ids, enc.target_mask)] == want_labels
    assert layout.length(len(base.encode(text, add_special_tokens=False).ids), len(codes), 1) == len(want_ids)


def test_a_tokenizer_without_a_chat_template_is_named(tmp_path, tok_dir):
    import json
    import shutil

    shutil.copytree(tok_dir, tmp_path / "t")
    cfg = json.load(open(tmp_path / "t" / "tokenizer_config.json"))
    del cfg["chat_template"]
    json.dump(cfg, open(tmp_path / "t" / "tokenizer_config.json", "w"))
    with pytest.raises(ChatTemplateError, match="holds no chat_template"):
        llasa_chat_frame(str(tmp_path / "t" / "tokenizer.json"), DATE)
    os.remove(tmp_path / "t" / "tokenizer_config.json")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json is missing"):
        llasa_chat_frame(str(tmp_path / "t" / "tokenizer.json"), DATE)
