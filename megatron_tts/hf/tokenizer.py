"""The exported tokenizer: the run's text tokenizer with LLaSA's special tokens and one added token
per codec code (``<|s_0|>`` ...), so that an exported model is used exactly as a LLaSA release is.

The added ids equal the training layout's (text vocab, then the specials in order, then speech
ids); a tokenizer whose ids would land elsewhere is refused. The byte tokenizer of the demo gets a
byte-level ``tokenizer.json`` whose ids are the raw byte values, as in training.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from data_pipeline.layouts import VocabLayout


class TokenizerExportError(ValueError):
    pass


def speech_token(code: int, codebook: int = 0, n_codebooks: int = 1) -> str:
    """LLaSA's names for one codebook; a book prefix when there are several."""
    return f"<|s_{code}|>" if n_codebooks == 1 else f"<|s{codebook}_{code}|>"


def byte_tokenizer():
    """A tokenizers.Tokenizer mapping every byte to its value (ByteTokenizer's ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte-level BPE
    table = _bytes_to_unicode()
    assert sorted(table.values()) == sorted(alphabet)
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenisation emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def export_tokenizer(out_dir: str, vocab: VocabLayout, source: Optional[str]) -> dict:
    """Write tokenizer.json (+ tokenizer_config.json) into out_dir. ``source``: the run's HF
    tokenizer file or directory, None for the byte tokenizer. Returns the special-token ids."""
    from tokenizers import AddedToken, Tokenizer

    config: dict = {}
    if source is None:
        tok = byte_tokenizer()
    else:
        file = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else source
        tok = Tokenizer.from_file(file)
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                config = json.load(f)
    have = tok.get_vocab_size(with_added_tokens=True)
    if have != vocab.text_vocab_size:
        raise TokenizerExportError(f"the text tokenizer has {have} ids but the model's text vocab is "
                                   f"{vocab.text_vocab_size}: the added ids would not match the embedding rows")
    new = list(vocab.special_tokens) + [speech_token(c, k, vocab.n_codebooks)
                                        for k in range(vocab.n_codebooks) for c in range(vocab.codebook_size)]
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False) for t in new])
    for i, t in enumerate(new):
        if tok.token_to_id(t) != vocab.text_vocab_size + i:
            raise TokenizerExportError(f"added token {t} got id {tok.token_to_id(t)}, not "
                                       f"{vocab.text_vocab_size + i}: is it already in the text vocabulary?")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    decoder = {str(vocab.text_vocab_size + i): {"content": t, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": False}
               for i, t in enumerate(new)}
    config = {**config, "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
              "added_tokens_decoder": {**config.get("added_tokens_decoder", {}), **decoder}}
    config.setdefault("model_max_length", 1 << 30)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    if source is not None:
        for extra in ("special_tokens_map.json",):
            src = os.path.join(os.path.dirname(file), extra)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, extra))
    return {t: vocab.text_vocab_size + i for i, t in enumerate(vocab.special_tokens)}
