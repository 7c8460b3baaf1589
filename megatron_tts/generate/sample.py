"""Sampling speech tokens with a KV cache: greedy, or temperature / top-k / top-p, seeded; stops at
SPEECH_GENERATION_END or after max_tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_tts.generate.model import SpeechLM


@dataclass
class Sampling:
    greedy: bool = False
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_tokens: int = 2000
    seed: int = 0
    speech_only: bool = True  # sample among speech ids and SPEECH_GENERATION_END only


def _allowed(lm: SpeechLM, vocab_rows: int) -> torch.Tensor:
    lo, hi = lm.vocab.speech_range
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    mask[lo:hi] = True
    mask[lm.special("<|SPEECH_GENERATION_END|>")] = True
    return mask


def pick(logits: torch.Tensor, s: Sampling, g: torch.Generator) -> int:
    """One token from a logits row [V]."""
    if s.greedy:
        return int(torch.argmax(logits))
    logits = logits / max(s.temperature, 1e-6)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=0) - sorted_p < s.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=g))


def generate(lm: SpeechLM, prompt: list[int], s: Sampling) -> tuple[list[int], str]:
    """The sampled ids after the prompt (SPEECH_GENERATION_END excluded) and why it stopped."""
    g = torch.Generator().manual_seed(s.seed)
    end = lm.special("<|SPEECH_GENERATION_END|>")
    logits, cache = lm.model(torch.tensor([prompt]))
    allowed = _allowed(lm, logits.shape[-1]) if s.speech_only else None
    out: list[int] = []
    for _ in range(s.max_tokens):
        row = logits[0, -1]
        if allowed is not None:
            row = row.masked_fill(~allowed, float("-inf"))
        tok = pick(row, s, g)
        if tok == end:
            return out, "end"
        out.append(tok)
        logits, cache = lm.model(torch.tensor([[tok]]), cache)
    return out, "max_tokens"
