"""Deterministic global sample order and window-wise sequence packing.

Everything here is a pure function of the dataset's shard sizes, the seed and a
per-sample token length; nothing depends on the data-parallel size, the number
of workers or the wall clock. That is what makes resumes exact and lets the DP
size change between save and load.

Global order (per epoch ``e``):
  * the shard list is permuted with a PCG64 generator seeded from ``(seed, e)``;
  * the samples of shard ``s`` are permuted with a generator seeded from
    ``(seed, e, s)`` (``s`` is the shard's ordinal in the loader's shard list);
  * the epoch's sample stream is the concatenation in permuted shard order.

Packing: the stream is cut into windows of ``pack_window`` samples; each window
is packed independently with minimal bin slack into bins of ``seq_len``
tokens; bins are emitted in a seeded permutation (so consecutive packs are not
sorted by length). The concatenation of the windows' packs is the epoch's pack
sequence; epochs follow each other forever.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# Domain tags keep the seed sequences of the different random streams disjoint.
_TAG_SHARDS = 0
_TAG_SAMPLES = 1
_TAG_BINS = 2


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class GlobalOrder:
    """Maps (epoch, stream position) to (shard ordinal, sample index) without
    materialising the whole epoch: only the shards overlapping a requested
    slice have their sample permutation computed (and a few are cached)."""

    def __init__(self, shard_sizes: Sequence[int], seed: int, cache_shards: int = 64) -> None:
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        if self.shard_sizes.ndim != 1 or (self.shard_sizes < 0).any():
            raise ValueError("shard_sizes must be a 1-D sequence of non-negative counts")
        self.seed = int(seed)
        self.epoch_size = int(self.shard_sizes.sum())
        self._epoch: int | None = None
        self._shard_perm = np.empty(0, dtype=np.int64)
        self._starts = np.empty(0, dtype=np.int64)
        self._sample_perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_shards = cache_shards

    def shard_permutation(self, epoch: int) -> np.ndarray:
        """Shard ordinals in the order the epoch visits them."""
        return _rng(self.seed, epoch, _TAG_SHARDS).permutation(len(self.shard_sizes))

    def sample_permutation(self, epoch: int, shard: int) -> np.ndarray:
        """Sample indices of ``shard`` in the order the epoch visits them."""
        key = (epoch, shard)
        perm = self._sample_perms.get(key)
        if perm is None:
            perm = _rng(self.seed, epoch, _TAG_SAMPLES, shard).permutation(int(self.shard_sizes[shard]))
            self._sample_perms[key] = perm
            while len(self._sample_perms) > self._cache_shards:
                self._sample_perms.popitem(last=False)
        else:
            self._sample_perms.move_to_end(key)
        return perm

    def _set_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            self._shard_perm = self.shard_permutation(epoch)
            sizes = self.shard_sizes[self._shard_perm]
            self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._epoch = epoch

    def slice(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ordinals, sample indices) of stream positions [start, stop) of ``epoch``."""
        start, stop = max(0, start), min(stop, self.epoch_size)
        if stop <= start:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        self._set_epoch(epoch)
        shards: list[np.ndarray] = []
        samples: list[np.ndarray] = []
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo, hi = int(self._starts[k]), int(self._starts[k + 1])
            if hi > pos:
                shard = int(self._shard_perm[k])
                take_hi = min(hi, stop)
                perm = self.sample_permutation(epoch, shard)
                samples.append(perm[pos - lo : take_hi - lo])
                shards.append(np.full(take_hi - pos, shard, dtype=np.int64))
                pos = take_hi
            k += 1
        return np.concatenate(shards), np.concatenate(samples).astype(np.int64)


def minimal_bin_slack(lengths: Sequence[int], capacity: int, budget: int = 64) -> list[list[int]]:
    """Pack items into bins of ``capacity``; returns bins as lists of item indices.

    Minimal Bin Slack (Gupta & Ho): each new bin takes the longest remaining item, then the
    subset of the remaining items that leaves the least slack, found by a depth-first search
    over items longest first that stops at zero slack or after ``budget`` nodes. On speech
    data (2-12 utterances per sequence) it packs 97-99.7% full where best-fit-decreasing
    reaches 93-99.4% (docs/benchmarks.md). Deterministic: ties go to the lower index.
    Every length must be in [1, capacity].
    """
    for i, n in enumerate(lengths):
        if n <= 0 or n > capacity:
            raise ValueError(f"item {i} has length {int(n)}, outside [1, {capacity}]")
    alive = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    while alive:
        first, rest = alive[0], alive[1:]
        neg = [-int(lengths[i]) for i in rest]  # ascending, for bisect
        best: list[int] = []
        best_room = capacity - int(lengths[first])
        chosen: list[int] = []
        nodes = 0

        def search(start: int, room: int) -> bool:
            """True once a zero-slack subset is found or the budget is spent."""
            nonlocal best, best_room, nodes
            if room < best_room:
                best, best_room = list(chosen), room
            if room == 0:
                return True
            k = bisect.bisect_left(neg, -room, lo=start)  # first item that fits
            last = None
            while k < len(rest):
                n = -neg[k]
                if n != last:  # equal lengths lead to equal subtrees
                    last = n
                    nodes += 1
                    chosen.append(k)
                    done = search(k + 1, room - n)
                    chosen.pop()
                    if done or nodes >= budget:
                        return True
                k += 1
            return False

        search(0, best_room)
        picked = set(best)
        bins.append([first] + [rest[k] for k in best])
        alive = [i for k, i in enumerate(rest) if k not in picked]
    return bins


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity``; returns bins as lists of item indices.

    Items are placed longest first (ties: lower index first) into the bin with the
    least remaining room that still fits (ties: lowest bin index), else a new bin.
    Every length must be in [1, capacity].
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (remaining, bin index), kept sorted
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        if n <= 0 or n > capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, b = free.pop(k)
            bins[b].append(i)
            remaining -= n
        else:
            b = len(bins)
            bins.append([i])
            remaining = capacity - n
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


class NoPacks(ValueError):
    """Not one sample of an epoch fits a sequence (all too long, or none can be laid out)."""


@dataclass(frozen=True)
class Pack:
    """One packed sequence: documents in row order."""

    shards: tuple[int, ...]   # shard ordinal per document
    indices: tuple[int, ...]  # sample index within its shard per document
    lengths: tuple[int, ...]  # planned token length per document
    n_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_tokens", sum(self.lengths))

    @property
    def n_docs(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class TooLong:
    shard: int
    index: int
    length: int


@dataclass
class WindowPlan:
    epoch: int
    window: int
    n_samples: int  # stream samples in the window (including skipped ones)
    packs: list[Pack]
    too_long: list[TooLong] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self.packs)

    def efficiency(self, seq_len: int) -> float:
        return self.n_tokens / (len(self.packs) * seq_len) if self.packs else 0.0


LengthFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class PackPlanner:
    """Plans windows of the global stream into packs.

    ``length_fn(shards, indices)`` returns the token length of each sample.
    """

    def __init__(self, order: GlobalOrder, length_fn: LengthFn, seq_len: int, pack_window: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if pack_window <= 0:
            raise ValueError(f"pack_window must be positive, got {pack_window}")
        self.order = order
        self.length_fn = length_fn
        self.seq_len = int(seq_len)
        self.pack_window = int(pack_window)

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.order.epoch_size // self.pack_window)

    def plan(self, epoch: int, window: int) -> WindowPlan:
        start = window * self.pack_window
        shards, indices = self.order.slice(epoch, start, start + self.pack_window)
        lengths = np.asarray(self.length_fn(shards, indices), dtype=np.int64)
        fits = (lengths > 0) & (lengths <= self.seq_len)
        too_long = [
            TooLong(int(shards[i]), int(indices[i]), int(lengths[i])) for i in np.flatnonzero(lengths > self.seq_len)
        ]
        pos = np.flatnonzero(fits)  # stream positions (within the window) of packable samples
        bins = minimal_bin_slack(lengths[pos].tolist(), self.seq_len)
        # Emit bins in a seeded permutation: the packer creates bins longest-item-first, and
        # leaving them in that order would make consecutive packs length-correlated.
        perm = _rng(self.order.seed, epoch, _TAG_BINS, window).permutation(len(bins))
        packs: list[Pack] = []
        for b in perm:
            members = sorted(int(pos[i]) for i in bins[b])  # documents in stream order within a row
            packs.append(
                Pack(
                    shards=tuple(int(shards[m]) for m in members),
                    indices=tuple(int(indices[m]) for m in members),
                    lengths=tuple(int(lengths[m]) for m in members),
                )
            )
        return WindowPlan(epoch=epoch, window=window, n_samples=len(shards), packs=packs, too_long=too_long)


@dataclass(frozen=True)
class Position:
    """Position in the infinite pack stream: the next pack to emit is pack
    ``offset`` of window ``window`` of epoch ``epoch``."""

    epoch: int = 0
    window: int = 0
    offset: int = 0


class PackStream:
    """Iterates the infinite global pack sequence from a Position, planning one
    window at a time (a resume re-plans only the window it lands in)."""

    def __init__(self, planner: PackPlanner, position: Position = Position(),
                 on_window: Callable[[WindowPlan], None] | None = None) -> None:
        if planner.order.epoch_size == 0:
            raise ValueError("the dataset has no samples")
        self.planner = planner
        self.position = position
        self.on_window = on_window
        self._plan: WindowPlan | None = None

    def _current_plan(self) -> WindowPlan:
        pos = self.position
        if self._plan is None or (self._plan.epoch, self._plan.window) != (pos.epoch, pos.window):
            self._plan = self.planner.plan(pos.epoch, pos.window)
            if self.on_window is not None:
                self.on_window(self._plan)
        return self._plan

    def next_pack(self) -> tuple[Pack, Position]:
        """Returns (pack, position after it)."""
        windows = self.planner.windows_per_epoch
        scanned = 0
        while True:
            plan = self._current_plan()
            pos = self.position
            if pos.offset < len(plan.packs):
                pack = plan.packs[pos.offset]
                nxt = Position(pos.epoch, pos.window, pos.offset + 1)
                if nxt.offset >= len(plan.packs):
                    nxt = self._advance_window(nxt)
                self.position = nxt
                return pack, nxt
            self.position = self._advance_window(pos)
            scanned += 1
            if scanned > windows:
                raise NoPacks(
                    f"a whole epoch produced no packs: every sample is longer than seq_len={self.planner.seq_len} "
                    "or cannot be laid out (raise data.seq_len or split the utterances; see the warnings above)"
                )

    def _advance_window(self, pos: Position) -> Position:
        if pos.window + 1 < self.planner.windows_per_epoch:
            return Position(pos.epoch, pos.window + 1, 0)
        return Position(pos.epoch + 1, 0, 0)
