"""Golden and property tests for data_pipeline.layouts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from data_pipeline.layouts import (
    LAYOUTS,
    LLASA_SPECIAL_TOKENS,
    SEGMENTS,
    Encoded,
    FlattenedLayout,
    LayoutError,
    LlasaLayout,
    VocabLayout,
    build_layout,
    slots_to_snac,
    snac_to_slots,
)
from data_pipeline.tokenizer import ByteTokenizer

F, T = False, True


@pytest.fixture
def llasa_vocab() -> VocabLayout:
    return VocabLayout(text_vocab_size=128256, n_codebooks=1, codebook_size=65536)


# ---------------------------------------------------------------------------------------------
# VocabLayout


def test_llasa_vocab_golden_numbers(llasa_vocab: VocabLayout) -> None:
    assert LLASA_SPECIAL_TOKENS == [
        "<|TEXT_GENERATION_START|>",
        "<|TEXT_GENERATION_END|>",
        "<|TEXT_UNDERSTANDING_START|>",
        "<|TEXT_UNDERSTANDING_END|>",
        "<|SPEECH_GENERATION_START|>",
        "<|SPEECH_GENERATION_END|>",
        "<|SPEECH_UNDERSTANDING_START|>",
        "<|SPEECH_UNDERSTANDING_END|>",
    ]
    assert llasa_vocab.special_tokens == LLASA_SPECIAL_TOKENS
    assert [llasa_vocab.special_id(n) for n in LLASA_SPECIAL_TOKENS] == [
        128256, 128257, 128258, 128259, 128260, 128261, 128262, 128263,
    ]
    assert llasa_vocab.speech_offset == 128264
    assert llasa_vocab.speech_id(0) == 128264
    assert llasa_vocab.speech_id(65535) == 193799
    assert llasa_vocab.vocab_size == 193800
    assert llasa_vocab.speech_range == (128264, 193800)


def test_default_vocab_is_llasa() -> None:
    v = VocabLayout(128256)
    assert v.vocab_size == 193800 and v.n_codebooks == 1 and v.codebook_size == 65536


def test_special_tokens_list_is_copied() -> None:
    names = list(LLASA_SPECIAL_TOKENS)
    v = VocabLayout(100, names, 1, 10)
    names.append("<|EXTRA|>")
    assert len(v.special_tokens) == 8 and v.vocab_size == 100 + 8 + 10


def test_padded_vocab_size(llasa_vocab: VocabLayout) -> None:
    assert llasa_vocab.padded_vocab_size(1) == 193800
    assert llasa_vocab.padded_vocab_size(128) == 193920
    assert llasa_vocab.padded_vocab_size(128 * 8) == 194560
    exact = VocabLayout(120, list(LLASA_SPECIAL_TOKENS), 1, 128)  # 120 + 8 + 128 = 256
    assert exact.padded_vocab_size(128) == 256
    for bad in (0, -128, 1.5):
        with pytest.raises(LayoutError, match="positive int"):
            llasa_vocab.padded_vocab_size(bad)  # type: ignore[arg-type]


def test_multi_codebook_vocab() -> None:
    v = VocabLayout(256, n_codebooks=2, codebook_size=1024)
    assert v.speech_offset == 264
    assert v.speech_id(3, codebook=1) == 264 + 1024 + 3
    assert v.vocab_size == 264 + 2048
    with pytest.raises(LayoutError, match=r"codebook 2 out of range \[0, 2\)"):
        v.speech_id(0, codebook=2)
    with pytest.raises(LayoutError, match=r"code 1024 out of range \[0, 1024\)"):
        v.speech_id(1024)


def test_vocab_validation() -> None:
    with pytest.raises(LayoutError, match="text_vocab_size"):
        VocabLayout(0)
    with pytest.raises(LayoutError, match="codebook_size"):
        VocabLayout(10, codebook_size=0)
    with pytest.raises(LayoutError, match="n_codebooks"):
        VocabLayout(10, n_codebooks=-1)
    with pytest.raises(LayoutError, match="duplicate"):
        VocabLayout(10, ["<a>", "<a>"])
    with pytest.raises(LayoutError, match=re.escape("unknown special token '<|nope|>'")):
        VocabLayout(10).special_id("<|nope|>")


# ---------------------------------------------------------------------------------------------
# LLaSA layout goldens


def test_llasa_golden_sample(llasa_vocab: VocabLayout) -> None:
    text_ids = ByteTokenizer().encode("hi")
    assert text_ids == [104, 105]
    enc = build_layout("llasa", llasa_vocab).encode(text_ids, np.array([[5, 0, 65535]]))
    assert isinstance(enc, Encoded)
    assert enc.ids.tolist() == [128258, 104, 105, 128259, 128260, 128269, 128264, 193799, 128261]
    assert enc.target_mask.tolist() == [F, F, F, F, F, T, T, T, T]
    assert enc.segment.tolist() == [0, 1, 1, 2, 3, 4, 4, 4, 5]
    assert enc.ids.dtype == np.int64
    assert enc.target_mask.dtype == np.bool_
    assert enc.segment.dtype == np.int8
    assert len(enc) == 9


def test_llasa_uint16_codes_do_not_overflow(llasa_vocab: VocabLayout) -> None:
    # Shards store codes as uint16; adding the offset must happen in int64.
    enc = LlasaLayout(llasa_vocab).encode([1], np.array([[65535, 7]], dtype=np.uint16))
    assert enc.ids.tolist() == [128258, 1, 128259, 128260, 193799, 128271, 128261]


def test_llasa_empty_text_and_speech(llasa_vocab: VocabLayout) -> None:
    layout = LlasaLayout(llasa_vocab)
    enc = layout.encode([], np.zeros((1, 0), dtype=np.uint16))
    assert enc.ids.tolist() == [128258, 128259, 128260, 128261]
    assert enc.target_mask.tolist() == [F, F, F, T]
    assert enc.segment.tolist() == [0, 2, 3, 5]
    assert layout.length(0, 0, 1) == 4


def test_text_ids_accept_numpy(llasa_vocab: VocabLayout) -> None:
    layout = LlasaLayout(llasa_vocab)
    a = layout.encode(np.array([104, 105], dtype=np.int32), np.array([[5]]))
    b = layout.encode([104, 105], np.array([[5]]))
    np.testing.assert_array_equal(a.ids, b.ids)


# ---------------------------------------------------------------------------------------------
# Loss segments


@pytest.mark.parametrize(
    ("loss_segments", "expected_mask"),
    [
        (("speech", "speech_end"), [F, F, F, F, F, T, T, T, T]),
        (("speech",), [F, F, F, F, F, T, T, T, F]),
        (("text", "speech", "speech_end"), [F, T, T, F, F, T, T, T, T]),
        (("text_end", "speech_start"), [F, F, F, T, T, F, F, F, F]),
        (SEGMENTS, [T, T, T, T, T, T, T, T, T]),
        ((), [F, F, F, F, F, F, F, F, F]),
        ("speech_end", [F, F, F, F, F, F, F, F, T]),  # a bare string is one segment name
    ],
)
def test_loss_segments(llasa_vocab: VocabLayout, loss_segments, expected_mask) -> None:
    layout = build_layout("llasa", llasa_vocab, loss_segments)
    enc = layout.encode([104, 105], np.array([[5, 0, 65535]]))
    assert enc.target_mask.tolist() == expected_mask
    # the ids and segments do not depend on the loss configuration
    assert enc.segment.tolist() == [0, 1, 1, 2, 3, 4, 4, 4, 5]


def test_loss_segments_deduplicated(llasa_vocab: VocabLayout) -> None:
    assert LlasaLayout(llasa_vocab, ["speech", "speech", "text"]).loss_segments == ("speech", "text")


def test_unknown_loss_segment_lists_valid_names(llasa_vocab: VocabLayout) -> None:
    with pytest.raises(ValueError, match="unknown loss segment") as ei:
        build_layout("llasa", llasa_vocab, ("speech", "audio"))
    msg = str(ei.value)
    assert "'audio'" in msg
    for name in SEGMENTS:
        assert name in msg


# ---------------------------------------------------------------------------------------------
# Flattened layout goldens


def test_flattened_two_slot_golden() -> None:
    vocab = VocabLayout(256, n_codebooks=2, codebook_size=1024)
    layout = build_layout("flattened", vocab)
    assert isinstance(layout, FlattenedLayout)
    enc = layout.encode(ByteTokenizer().encode("a"), np.array([[1, 2], [3, 1023]], dtype=np.uint16))
    # specials: TU_START 258, TU_END 259, SG_START 260, SG_END 261; speech offset 264
    assert enc.ids.tolist() == [258, 97, 259, 260, 265, 1291, 266, 2311, 261]
    assert enc.target_mask.tolist() == [F, F, F, F, T, T, T, T, T]
    assert enc.segment.tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 5]
    assert vocab.vocab_size == 2312
    assert layout.length(1, 2, 2) == 9


def test_snac_to_slots_hand_example() -> None:
    l0 = np.array([10, 11])
    l1 = np.array([20, 21, 22, 23])
    l2 = np.array([30, 31, 32, 33, 34, 35, 36, 37])
    slots = snac_to_slots(l0, l1, l2)
    assert slots.shape == (7, 2)
    assert slots.tolist() == [
        [10, 11],  # L0[f]
        [20, 22],  # L1[2f]
        [30, 34],  # L2[4f]
        [31, 35],  # L2[4f+1]
        [21, 23],  # L1[2f+1]
        [32, 36],  # L2[4f+2]
        [33, 37],  # L2[4f+3]
    ]
    back = slots_to_snac(slots)
    for got, want in zip(back, (l0, l1, l2)):
        np.testing.assert_array_equal(got, want)


def test_snac_to_slots_keeps_dtype_and_validates() -> None:
    s = snac_to_slots(*(np.zeros(n, dtype=np.uint16) for n in (3, 6, 12)))
    assert s.dtype == np.uint16 and s.shape == (7, 3)
    with pytest.raises(LayoutError, match="T0, 2\\*T0, 4\\*T0"):
        snac_to_slots(np.zeros(2), np.zeros(4), np.zeros(7))
    with pytest.raises(LayoutError, match="1-D"):
        snac_to_slots(np.zeros((1, 2)), np.zeros(4), np.zeros(8))
    with pytest.raises(LayoutError, match=r"\[7, T0\]"):
        slots_to_snac(np.zeros((3, 2)))


def _orpheus_reference_ids(l0, l1, l2, base: int) -> list[int]:
    # Written the way Orpheus's data preparation does it, as an independent reference.
    out: list[int] = []
    for i in range(len(l0)):
        out.append(int(l0[i]) + base)
        out.append(int(l1[2 * i]) + base + 4096)
        out.append(int(l2[4 * i]) + base + 2 * 4096)
        out.append(int(l2[4 * i + 1]) + base + 3 * 4096)
        out.append(int(l1[2 * i + 1]) + base + 4 * 4096)
        out.append(int(l2[4 * i + 2]) + base + 5 * 4096)
        out.append(int(l2[4 * i + 3]) + base + 6 * 4096)
    return out


def test_flattened_snac_seven_slot_golden() -> None:
    # 10 special tokens put the speech offset at Orpheus's base, 128266.
    specials = [*LLASA_SPECIAL_TOKENS, "<|EXTRA_0|>", "<|EXTRA_1|>"]
    vocab = VocabLayout(128256, specials, n_codebooks=7, codebook_size=4096)
    assert vocab.speech_offset == 128266
    assert vocab.vocab_size == 156938
    l0 = np.array([10, 11])
    l1 = np.array([20, 21, 22, 23])
    l2 = np.array([30, 31, 32, 33, 34, 35, 36, 37])
    enc = FlattenedLayout(vocab).encode([97], snac_to_slots(l0, l1, l2))
    speech = [
        128276, 132382, 136488, 140585, 144671, 148778, 152875,  # frame 0
        128277, 132384, 136492, 140589, 144673, 148782, 152879,  # frame 1
    ]
    assert enc.ids.tolist() == [128258, 97, 128259, 128260, *speech, 128261]
    assert enc.target_mask.tolist() == [F, F, F, F] + [T] * 14 + [T]
    assert speech == _orpheus_reference_ids(l0, l1, l2, base=128266)


def test_flattened_matches_orpheus_reference_random() -> None:
    rng = np.random.default_rng(7)
    vocab = VocabLayout(128256, [*LLASA_SPECIAL_TOKENS, "<a>", "<b>"], 7, 4096)
    layout = FlattenedLayout(vocab)
    for t0 in (1, 5, 33):
        l0, l1, l2 = (rng.integers(0, 4096, size=n * t0) for n in (1, 2, 4))
        enc = layout.encode([], snac_to_slots(l0, l1, l2))
        assert enc.ids[3:-1].tolist() == _orpheus_reference_ids(l0, l1, l2, base=128266)


# ---------------------------------------------------------------------------------------------
# Errors


def test_code_out_of_range_names_value_and_range(llasa_vocab: VocabLayout) -> None:
    layout = LlasaLayout(llasa_vocab)
    with pytest.raises(LayoutError, match=r"code 65536 at \(codebook 0, frame 1\).*\[0, 65536\)"):
        layout.encode([1], np.array([[3, 65536, 2]], dtype=np.int32))
    with pytest.raises(LayoutError, match=r"code -1 at \(codebook 0, frame 0\).*\[0, 65536\)"):
        layout.encode([1], np.array([[-1, 4]], dtype=np.int32))


def test_flattened_code_out_of_range() -> None:
    layout = FlattenedLayout(VocabLayout(256, n_codebooks=2, codebook_size=1024))
    with pytest.raises(LayoutError, match=r"code 1024 at \(codebook 1, frame 0\).*\[0, 1024\)"):
        layout.encode([], np.array([[0, 1], [1024, 0]]))


def test_text_id_out_of_range(llasa_vocab: VocabLayout) -> None:
    layout = LlasaLayout(llasa_vocab)
    with pytest.raises(LayoutError, match=r"text id 128256 .*\[0, 128256\)"):
        layout.encode([1, 128256], np.array([[0]]))
    with pytest.raises(LayoutError, match=r"text id -3 "):
        layout.encode([-3], np.array([[0]]))
    with pytest.raises(LayoutError, match="1-D sequence of ints"):
        layout.encode([1.5], np.array([[0]]))


def test_llasa_rejects_multi_codebook(llasa_vocab: VocabLayout) -> None:
    layout = LlasaLayout(llasa_vocab)
    with pytest.raises(LayoutError, match="n_q=2.*flattened"):
        layout.encode([1], np.zeros((2, 3), dtype=np.uint16))
    with pytest.raises(LayoutError, match="n_q=2.*flattened"):
        layout.length(1, 3, 2)
    with pytest.raises(LayoutError, match="n_codebooks=2.*flattened"):
        LlasaLayout(VocabLayout(256, n_codebooks=2, codebook_size=16))


def test_flattened_rejects_n_q_mismatch() -> None:
    layout = FlattenedLayout(VocabLayout(256, n_codebooks=7, codebook_size=4096))
    with pytest.raises(LayoutError, match=r"n_q == vocab.n_codebooks \(7 slots\), got n_q=3"):
        layout.encode([], np.zeros((3, 4), dtype=np.uint16))
    with pytest.raises(LayoutError, match="got n_q=3"):
        layout.length(0, 4, 3)


def test_bad_code_arrays(llasa_vocab: VocabLayout) -> None:
    layout = LlasaLayout(llasa_vocab)
    with pytest.raises(LayoutError, match=r"shape \[n_q, T\]"):
        layout.encode([1], np.array([1, 2, 3]))
    with pytest.raises(LayoutError, match="integers"):
        layout.encode([1], np.array([[1.0, 2.0]]))
    with pytest.raises(LayoutError, match="non-negative"):
        layout.length(-1, 3, 1)


def test_missing_framing_tokens() -> None:
    with pytest.raises(LayoutError, match="SPEECH_GENERATION_END"):
        LlasaLayout(VocabLayout(10, ["<|TEXT_UNDERSTANDING_START|>", "<|TEXT_UNDERSTANDING_END|>",
                                     "<|SPEECH_GENERATION_START|>"], 1, 4))


def test_build_layout_unknown_name(llasa_vocab: VocabLayout) -> None:
    with pytest.raises(ValueError, match="unknown layout 'delay'.*llasa, flattened"):
        build_layout("delay", llasa_vocab)
    assert set(LAYOUTS) == {"llasa", "flattened"}
    assert build_layout("LLaSA", llasa_vocab).name == "llasa"


def test_n_streams_is_one(llasa_vocab: VocabLayout) -> None:
    assert LlasaLayout(llasa_vocab).n_streams == 1
    assert FlattenedLayout(VocabLayout(256, n_codebooks=2, codebook_size=8)).n_streams == 1


# ---------------------------------------------------------------------------------------------
# Property: length() == len(encode().ids) and structural invariants


def test_length_matches_encode_random() -> None:
    rng = np.random.default_rng(1234)
    for trial in range(400):
        n_codebooks = int(rng.integers(1, 9))
        codebook_size = int(rng.choice([1, 2, 16, 1024, 4096, 65536]))
        n_specials = int(rng.integers(0, 5))
        specials = [*LLASA_SPECIAL_TOKENS, *(f"<|x{i}|>" for i in range(n_specials))]
        text_vocab = int(rng.integers(1, 200_000))
        name = "llasa" if trial % 2 == 0 else "flattened"
        if name == "llasa":
            n_codebooks = 1
        vocab = VocabLayout(text_vocab, specials, n_codebooks, codebook_size)
        k = int(rng.integers(0, len(SEGMENTS) + 1))
        loss = tuple(rng.choice(SEGMENTS, size=k, replace=False).tolist())
        layout = build_layout(name, vocab, loss)

        n_text = int(rng.integers(0, 60))
        n_frames = int(rng.integers(0, 50))
        dtype = np.uint16 if codebook_size <= 65536 and trial % 3 else np.int32
        codes = rng.integers(0, codebook_size, size=(n_codebooks, n_frames)).astype(dtype)
        text = rng.integers(0, text_vocab, size=n_text).tolist()

        enc = layout.encode(text, codes)
        assert layout.length(n_text, n_frames, n_codebooks) == len(enc.ids), (trial, name)
        assert enc.ids.shape == enc.target_mask.shape == enc.segment.shape
        assert enc.ids.min() >= 0 and enc.ids.max() < vocab.vocab_size
        np.testing.assert_array_equal(
            enc.target_mask, np.isin(enc.segment, [SEGMENTS.index(s) for s in loss])
        )
        seg = enc.segment
        speech = enc.ids[seg == SEGMENTS.index("speech")]
        assert len(speech) == n_codebooks * n_frames
        assert ((speech >= vocab.speech_offset) & (speech < vocab.vocab_size)).all()
        np.testing.assert_array_equal(enc.ids[seg == SEGMENTS.index("text")], text)
        # decode speech ids back to codes: frame-major, slot-minor
        rel = (speech - vocab.speech_offset).reshape(n_frames, n_codebooks)
        slot = np.arange(n_codebooks) * codebook_size
        np.testing.assert_array_equal((rel - slot).T, codes.astype(np.int64))
