"""Tests for data_pipeline.tokenizer (byte tokenizer and local HF tokenizer.json loading)."""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import pytest

from data_pipeline.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TextTokenizer,
    TokenizerError,
    build_tokenizer,
)

try:
    import tokenizers  # noqa: F401

    HAVE_TOKENIZERS = True
except ImportError:
    HAVE_TOKENIZERS = False

needs_tokenizers = pytest.mark.skipif(
    not HAVE_TOKENIZERS,
    reason="HF `tokenizers` is not installed (pip install tokenizers); HF tokenizer tests skipped",
)

CORPUS = [
    "hello world",
    "hello speech world",
    "the quick brown fox jumps over the lazy dog",
    "speech tokens and text tokens",
    "world of speech",
]


# ---------------------------------------------------------------------------------------------
# ByteTokenizer


def test_byte_tokenizer_basics() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, TextTokenizer)
    assert (tok.name, tok.vocab_size, tok.fingerprint) == ("byte", 256, "byte-v1")
    assert tok.encode("hi") == [104, 105]
    assert tok.encode("") == []
    assert tok.encode("é€") == [0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"


def test_build_byte_tokenizer() -> None:
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert build_tokenizer("byte", expected_vocab_size=256).vocab_size == 256
    with pytest.raises(TokenizerError) as ei:
        build_tokenizer("byte", expected_vocab_size=128256)
    assert "256" in str(ei.value) and "128256" in str(ei.value)


def test_unknown_kind() -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'.*byte, hf"):
        build_tokenizer("sentencepiece")


def test_hf_requires_path() -> None:
    with pytest.raises(TokenizerError, match="needs a path"):
        build_tokenizer("hf")


def test_hf_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TokenizerError, match="does not exist") as ei:
        build_tokenizer("hf", str(missing))
    assert str(missing) in str(ei.value)


def test_hf_directory_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="has no tokenizer.json") as ei:
        build_tokenizer("hf", tmp_path)
    assert str(tmp_path) in str(ei.value)


def test_hf_rejects_urls_and_hub_ids(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="only local paths"):
        build_tokenizer("hf", "s3://bucket/tokenizer.json")
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer("hf", "meta-llama/Llama-3.2-1B")


def test_missing_tokenizers_package_is_actionable(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(TokenizerError, match="pip install tokenizers") as ei:
        build_tokenizer("hf", f)
    assert str(f) in str(ei.value)


# ---------------------------------------------------------------------------------------------
# HFTokenizer (tiny BPE trained locally)


@pytest.fixture
def hf_tokenizer_file(tmp_path: Path) -> tuple[Path, object]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<bos>"])
    tok.train_from_iterator(CORPUS, trainer)
    # A BOS-adding post-processor, as Llama-3's tokenizer.json has: encode() must bypass it.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    tok.add_tokens(["<|added_one|>", "<|added_two|>"])
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path, tok


@needs_tokenizers
def test_hf_tokenizer_loads_from_file_and_dir(hf_tokenizer_file) -> None:
    path, ref = hf_tokenizer_file
    from_file = build_tokenizer("hf", str(path))
    from_dir = build_tokenizer("hf", path.parent)
    for tok in (from_file, from_dir):
        assert isinstance(tok, HFTokenizer)
        assert isinstance(tok, TextTokenizer)
        assert tok.name == "hf"
        assert tok.path == str(path)
        assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
        assert tok.vocab_size > ref.get_vocab_size(with_added_tokens=False)
        assert tok.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


@needs_tokenizers
def test_hf_encode_adds_no_special_tokens(hf_tokenizer_file) -> None:
    path, ref = hf_tokenizer_file
    tok = build_tokenizer("hf", path)
    text = "hello speech world"
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    bos = ref.token_to_id("<bos>")
    assert ref.encode(text).ids[0] == bos  # the file's post-processor would add BOS ...
    assert bos not in ids  # ... but the pipeline tokenizer does not
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.encode("") == []
    assert tok.encode_batch([text, "world"]) == [ids, tok.encode("world")]
    assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")


@needs_tokenizers
def test_hf_vocab_mismatch_error(hf_tokenizer_file) -> None:
    path, ref = hf_tokenizer_file
    actual = ref.get_vocab_size(with_added_tokens=True)
    assert build_tokenizer("hf", path, expected_vocab_size=actual).vocab_size == actual
    with pytest.raises(TokenizerError) as ei:
        build_tokenizer("hf", path, expected_vocab_size=128256)
    msg = str(ei.value)
    assert str(path) in msg
    assert f"vocab_size {actual}" in msg
    assert "128256" in msg


@needs_tokenizers
def test_hf_fingerprint_tracks_file_content(hf_tokenizer_file, tmp_path: Path) -> None:
    path, ref = hf_tokenizer_file
    ref.add_tokens(["<|added_three|>"])
    other = tmp_path / "other.json"
    ref.save(str(other))
    a, b = build_tokenizer("hf", path), build_tokenizer("hf", other)
    assert a.fingerprint != b.fingerprint
    assert b.vocab_size == a.vocab_size + 1


@needs_tokenizers
def test_hf_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="could not parse") as ei:
        build_tokenizer("hf", bad)
    assert str(bad) in str(ei.value)


@needs_tokenizers
def test_hf_tokenizer_pickles(hf_tokenizer_file) -> None:
    # DataLoader workers receive the tokenizer by pickling.
    path, _ = hf_tokenizer_file
    tok = build_tokenizer("hf", path)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("hello world") == tok.encode("hello world")
    assert (clone.vocab_size, clone.fingerprint) == (tok.vocab_size, tok.fingerprint)
