"""What the loader hands the trainer: packed rows (tokens, labels, loss mask, document and source
ids, positions that restart per document) collated into micro-batches with a block-diagonal
causal mask, so that packed documents never attend to each other."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .layouts import Encoded


@dataclass
class Batch:
    """One micro-batch of packed rows (all CPU tensors).

    Attributes:
        tokens: int64 [B, S].
        labels: int64 [B, S]; labels[:, i] = tokens[:, i + 1] within a document, pad_id elsewhere.
        loss_mask: float32 [B, S]; 1 where labels[:, i] is a training target.
        position_ids: int64 [B, S]; restart at 0 for every document (0 on padding).
        document_ids: int32 [B, S]; 0, 1, ... per row, -1 on padding.
        segment: int8 [B, S]; layout segment (index into layouts.SEGMENTS) of the label token, -1 where
            there is no label (document ends, padding).
        attention_mask: bool [B, 1, S, S]; True = masked (see build_attention_mask).
        sample_keys: per row, "shard_basename:key" of each document in row order.
        n_tokens: real (non-pad) tokens in the micro-batch.
        n_targets: tokens with loss_mask 1.
        pack_ids: global pack index (cursor position) of each row.
        epochs: epoch of each row's pack.
        source: int16 [B, S]; index into PackedLoader.sources (the data.paths entry) of each token's
            document, -1 on padding.
        audio_seconds: seconds of audio of the documents in the micro-batch (codec frames / frame rate).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    segment: torch.Tensor
    attention_mask: torch.Tensor
    sample_keys: list[list[str]]
    n_tokens: int
    n_targets: int
    pack_ids: list[int]
    epochs: list[int]
    source: torch.Tensor | None = None
    audio_seconds: float = 0.0

    _TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "segment", "attention_mask")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor moved to ``device``."""
        moved = {n: getattr(self, n).to(device, non_blocking=non_blocking) for n in self._TENSORS}
        source = None if self.source is None else self.source.to(device, non_blocking=non_blocking)
        return Batch(**moved, sample_keys=self.sample_keys, n_tokens=self.n_tokens, n_targets=self.n_targets,
                     pack_ids=self.pack_ids, epochs=self.epochs, source=source, audio_seconds=self.audio_seconds)


def build_attention_mask(document_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Block-diagonal causal mask from per-token document ids [B, S] (-1 = padding).

    Returns bool [B, 1, S, S] where True means MASKED: token i may attend to token j
    iff both belong to the same document and j <= i. A padding token attends to
    itself only, so no softmax row is entirely masked.
    """
    # numpy, not torch: torch's intra-op thread pool stalls badly when the host is
    # oversubscribed (trainer + loader threads), and this runs on loader threads.
    doc = document_ids.cpu().numpy() if isinstance(document_ids, torch.Tensor) else np.asarray(document_ids)
    if doc.ndim != 2:
        raise ValueError(f"document_ids must be [B, S], got shape {tuple(doc.shape)}")
    b, s = doc.shape
    out = np.empty((b, 1, s, s), dtype=bool)
    out.fill(True)  # a memset; then each document's causal block is cleared (a few % of the area)
    tri = _upper_triangle(s)
    for r in range(b):
        row, m = doc[r], out[r, 0]
        valid = row >= 0
        change = np.flatnonzero(row[1:] != row[:-1]) + 1
        starts, ends = np.concatenate([[0], change]), np.concatenate([change, [s]])
        docs = row[starts] >= 0
        starts, ends = starts[docs], ends[docs]
        if len(starts) == len(np.unique(row[valid])):
            # each document is one contiguous run (always so for packed rows): its causal block
            for a, e in zip(starts.tolist(), ends.tolist()):
                m[a:e, a:e] = tri[: e - a, : e - a]
        else:
            pos = np.arange(s)
            m[:] = ~((row[:, None] == row[None, :]) & (pos[None, :] <= pos[:, None]))
            m[~valid, :] = True
        pad = np.flatnonzero(~valid)
        m[pad, pad] = False  # a padding token attends to itself
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=4)
def _upper_triangle(s: int) -> np.ndarray:
    t = ~np.tri(s, dtype=bool)
    t.flags.writeable = False
    return t


@dataclass
class PackRow:
    """One packed row as numpy arrays (the per-row slice of a Batch, same dtypes)."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray
    segment: np.ndarray
    n_tokens: int
    source: np.ndarray | None = None
    audio_seconds: float = 0.0


def build_pack_row(docs: Sequence[Encoded], seq_len: int, pad_id: int = 0, sources: Sequence[int] | None = None,
                   audio_seconds: float = 0.0) -> PackRow:
    """Lay documents out left to right in one row of ``seq_len`` and derive the
    next-token targets (never across a document boundary). ``sources``: each document's source
    index (the row's ``source`` array, -1 on padding)."""
    tokens = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_len, dtype=np.float32)
    position_ids = np.zeros(seq_len, dtype=np.int64)
    document_ids = np.full(seq_len, -1, dtype=np.int32)
    segment = np.full(seq_len, -1, dtype=np.int8)
    source = np.full(seq_len, -1, dtype=np.int16) if sources is not None else None
    p = 0
    for d, enc in enumerate(docs):
        n = len(enc)
        if p + n > seq_len:
            raise ValueError(f"documents total more than seq_len={seq_len} tokens")
        tokens[p : p + n] = enc.ids
        labels[p : p + n - 1] = enc.ids[1:]
        loss_mask[p : p + n - 1] = enc.target_mask[1:]
        segment[p : p + n - 1] = enc.segment[1:]
        position_ids[p : p + n] = np.arange(n)
        document_ids[p : p + n] = d
        if source is not None:
            source[p : p + n] = sources[d]
        p += n
    return PackRow(tokens, labels, loss_mask, position_ids, document_ids, segment, p, source, audio_seconds)


def _collate(rows: Sequence[PackRow], keys: list[list[str]], pack_ids: list[int], epochs: list[int]) -> Batch:
    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(r, name) for r in rows]))

    document_ids = stack("document_ids")
    loss_mask = stack("loss_mask")
    n_targets = int(np.count_nonzero(loss_mask.numpy()))
    return Batch(
        tokens=stack("tokens"),
        labels=stack("labels"),
        loss_mask=loss_mask,
        position_ids=stack("position_ids"),
        document_ids=document_ids,
        segment=stack("segment"),
        attention_mask=build_attention_mask(document_ids),
        sample_keys=keys,
        n_tokens=sum(r.n_tokens for r in rows),
        n_targets=n_targets,
        pack_ids=pack_ids,
        epochs=epochs,
        source=stack("source") if all(r.source is not None for r in rows) else None,
        audio_seconds=sum(r.audio_seconds for r in rows),
    )
