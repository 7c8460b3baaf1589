"""The global pack sequence: windows of a weighted blend of streams, each packed into sequences.

A *stream* is one mixing component: the shards of one ``data.sources`` entry, or of all of
``data.paths`` (the unweighted form: one stream). Each stream has its own order
(:class:`~data_pipeline.packing.GlobalOrder`) and its own epochs: a source that runs out starts
its next epoch on its own, the others go on where they are.

A window takes ``pack_window`` samples from the streams by weighted fair queueing on tokens:
each candidate (the next samples of each stream's epoch) gets the virtual time
``(tokens drawn from its stream so far + tokens of the samples before it) / weight`` and the
window takes the ``pack_window`` smallest. Over a run each stream's share of tokens tracks its
weight to within a sample or so per stream (not only in expectation), and it is deterministic.
A window never crosses a stream's epoch boundary, so each pack belongs to one epoch of each
stream and a sample never repeats within its stream's epoch.

The window is packed (:func:`~data_pipeline.packing.pack_bins`) and its packs emitted in a
seeded permutation (``sample_order='shuffle'``) or by increasing utterance duration
(``'duration'``, a curriculum within the window, as VALL-E's ``sample_order=duration``).

Everything is a pure function of the stream states at the window's start (epoch, position,
tokens drawn in the current mixture stage), the weights and the seed: a resume re-plans the one
window it lands in. Nothing depends on the data-parallel size or the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .packing import _TAG_BINS, PACKER_HYBRID, TAG_MIX_BINS, GlobalOrder, pack_bins, rng

SAMPLE_ORDERS = ("shuffle", "duration")


class NoPacks(ValueError):
    """Not one sample of an epoch fits a sequence (all too long, or none can be laid out)."""


@dataclass(frozen=True)
class StreamState:
    """Where a stream is: ``pos`` samples of epoch ``epoch``'s order are drawn; ``tokens``: the
    packable tokens drawn in the current mixture stage (the blend's clock)."""

    epoch: int = 0
    pos: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Position:
    """Position in the infinite pack sequence: the window that starts at ``streams``, of which
    ``offset`` packs were emitted."""

    streams: tuple[StreamState, ...]
    offset: int = 0


@dataclass(frozen=True)
class Pack:
    """One packed sequence: documents in row order."""

    shards: tuple[int, ...]  # loader-level shard ordinal per document
    indices: tuple[int, ...]  # sample index within its shard per document
    lengths: tuple[int, ...]  # planned token length per document
    seconds: tuple[float, ...] = ()  # audio seconds per document

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

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
    start: tuple[StreamState, ...]
    end: tuple[StreamState, ...]
    n_samples: int  # samples in the window (including skipped ones)
    taken: tuple[int, ...]  # samples drawn from each stream
    packs: list[Pack]
    too_long: list[TooLong] = field(default_factory=list)
    epoch: int = 0  # Planner.epoch_of(start)

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self.packs)

    def efficiency(self, seq_len: int) -> float:
        return self.n_tokens / (len(self.packs) * seq_len) if self.packs else 0.0


@dataclass
class Stream:
    """One mixing component."""

    name: str
    weight: float
    shards: np.ndarray  # loader-level shard ordinals, in the stream's order
    order: GlobalOrder  # over ``shards`` (its ordinals index into it)
    legacy: bool = False  # data.paths: the bin permutation seeds of loader state version 1

    @property
    def epoch_size(self) -> int:
        return self.order.epoch_size


# (shards, indices) -> per-sample token length (-1: cannot be laid out) or audio seconds
SampleFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Planner:
    """Plans windows of the blend of ``streams`` into packs of ``seq_len`` tokens."""

    def __init__(self, streams: Sequence[Stream], length_fn: SampleFn, seconds_fn: SampleFn, seq_len: int,
                 pack_window: int, seed: int, packer: str = PACKER_HYBRID, sample_order: str = "shuffle") -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if pack_window <= 0:
            raise ValueError(f"pack_window must be positive, got {pack_window}")
        if sample_order not in SAMPLE_ORDERS:
            raise ValueError(f"sample_order {sample_order!r} unknown; use one of {SAMPLE_ORDERS}")
        if not streams or not any(s.weight > 0 for s in streams):
            raise ValueError("at least one stream needs a positive weight")
        if any(s.weight < 0 for s in streams):
            raise ValueError("stream weights must be >= 0")
        if len(streams) > 1 and any(s.legacy for s in streams):
            raise ValueError("a legacy (data.paths) stream cannot be blended")
        self.streams = list(streams)
        self.length_fn = length_fn
        self.seconds_fn = seconds_fn
        self.seq_len = int(seq_len)
        self.pack_window = int(pack_window)
        self.seed = int(seed)
        self.packer = packer
        self.sample_order = sample_order

    def start(self) -> tuple[StreamState, ...]:
        return tuple(StreamState() for _ in self.streams)

    def epoch_of(self, states: tuple[StreamState, ...]) -> int:
        """Full passes made over every (weighted) stream: the smallest of their epochs."""
        weighted = [st.epoch for s, st in zip(self.streams, states) if s.weight > 0]
        return min(weighted or [st.epoch for st in states])

    @property
    def samples_per_pass(self) -> int:
        """Samples of one epoch of every weighted stream."""
        return sum(s.epoch_size for s in self.streams if s.weight > 0)

    def _candidates(self, start: tuple[StreamState, ...], weights: Sequence[float]) -> list[tuple]:
        out = []
        for i, (stream, st) in enumerate(zip(self.streams, start)):
            if weights[i] <= 0 or stream.epoch_size == 0:
                continue
            take = min(self.pack_window, stream.epoch_size - st.pos)
            local, idx = stream.order.slice(st.epoch, st.pos, st.pos + take)
            shards = stream.shards[local]
            lengths = np.asarray(self.length_fn(shards, idx), dtype=np.int64)
            eff = np.where((lengths > 0) & (lengths <= self.seq_len), lengths, 0)
            out.append((i, shards, idx, lengths, eff))
        return out

    def plan(self, start: tuple[StreamState, ...], weights: Optional[Sequence[float]] = None,
             sample_order: Optional[str] = None) -> WindowPlan:
        """The window starting at ``start``; ``weights`` / ``sample_order`` override the planner's
        (a window planned before a change of mixture is finished as it was planned)."""
        if len(start) != len(self.streams):
            raise ValueError(f"{len(start)} stream states for {len(self.streams)} streams")
        weights = [s.weight for s in self.streams] if weights is None else list(weights)
        cands = self._candidates(start, weights)
        taken = [0] * len(self.streams)
        if len(cands) == 1:
            i, shards, idx, lengths, eff = cands[0]
            taken[i] = len(idx)
        else:
            # weighted fair queueing: the pack_window smallest virtual start times; within a stream
            # they are non-decreasing (ties by position), so each stream contributes a prefix
            v = np.concatenate([(start[i].tokens + np.cumsum(e) - e) / weights[i] for i, _, _, _, e in cands])
            src = np.concatenate([np.full(len(c[2]), k) for k, c in enumerate(cands)])
            pos = np.concatenate([np.arange(len(c[2])) for c in cands])
            chosen = np.lexsort((pos, src, v))[: self.pack_window]
            per = np.bincount(src[chosen], minlength=len(cands))
            for k, c in enumerate(cands):
                taken[c[0]] = int(per[k])
            # the window in blend order
            shards = np.concatenate([c[1] for c in cands])[chosen]
            idx = np.concatenate([c[2] for c in cands])[chosen]
            lengths = np.concatenate([c[3] for c in cands])[chosen]
        drawn = {c[0]: int(c[4][: taken[c[0]]].sum()) for c in cands}
        end = []
        for i, (stream, st) in enumerate(zip(self.streams, start)):
            e, p = st.epoch, st.pos + taken[i]
            if p >= stream.epoch_size and stream.epoch_size:
                e, p = e + 1, 0
            end.append(StreamState(e, p, st.tokens + drawn.get(i, 0)))
        return self._pack(tuple(start), tuple(end), tuple(taken), shards, idx, lengths,
                          sample_order or self.sample_order)

    def _pack(self, start, end, taken, shards: np.ndarray, idx: np.ndarray, lengths: np.ndarray,
              sample_order: str) -> WindowPlan:
        fits = (lengths > 0) & (lengths <= self.seq_len)
        too_long = [TooLong(int(shards[i]), int(idx[i]), int(lengths[i]))
                    for i in np.flatnonzero(lengths > self.seq_len)]
        pos = np.flatnonzero(fits)  # window positions of packable samples
        bins = pack_bins(lengths[pos], self.seq_len, self.packer)
        seconds = np.asarray(self.seconds_fn(shards[pos], idx[pos]), dtype=np.float64) if len(pos) else np.empty(0)
        # Emit bins in a seeded permutation: the packers create bins longest-item-first, and
        # leaving them in that order would make consecutive packs length-correlated.
        perm = self._bin_rng(start).permutation(len(bins))
        if sample_order == "duration":
            mean = [float(np.mean(seconds[bins[b]])) for b in perm]
            perm = perm[np.lexsort((np.arange(len(perm)), mean))]
        packs: list[Pack] = []
        sh, ix, ln, at = shards.tolist(), idx.tolist(), lengths.tolist(), pos.tolist()
        sec = seconds.tolist()
        for b in perm.tolist():
            members = sorted(bins[b])  # documents in stream order within a row
            w = [at[m] for m in members]
            packs.append(Pack(tuple([sh[m] for m in w]), tuple([ix[m] for m in w]), tuple([ln[m] for m in w]),
                              tuple([sec[m] for m in members])))
        return WindowPlan(start=start, end=end, n_samples=len(shards), taken=taken, packs=packs, too_long=too_long,
                          epoch=self.epoch_of(start))

    def _bin_rng(self, start: tuple[StreamState, ...]) -> np.random.Generator:
        if len(self.streams) == 1 and self.streams[0].legacy:
            st = start[0]  # the words of loader state version 1: (seed, epoch, tag, window)
            return rng(self.seed, st.epoch, _TAG_BINS, st.pos // self.pack_window)
        return rng(self.seed, TAG_MIX_BINS, *[w for st in start for w in (st.epoch, st.pos)])


@dataclass(frozen=True)
class Carry:
    """A window begun under an earlier mixture (weights, sample order), resumed under a new one:
    it is finished as planned, and the new mixture starts at its end, with every stream's token
    clock at 0 when the weights changed (the new stage's shares count from there)."""

    start: tuple[StreamState, ...]
    weights: tuple[float, ...]
    sample_order: str
    reset_tokens: bool


class PackStream:
    """Iterates the infinite pack sequence from a Position, planning one window at a time (a
    resume re-plans only the window it lands in)."""

    def __init__(self, planner: Planner, position: Optional[Position] = None,
                 on_window: Optional[Callable[[WindowPlan], None]] = None, carry: Optional[Carry] = None) -> None:
        if planner.samples_per_pass == 0:
            raise ValueError("the dataset has no samples")
        self.planner = planner
        self.position = position or Position(planner.start())
        self.on_window = on_window
        self.carry = carry
        self._plan: Optional[WindowPlan] = None

    def current_plan(self) -> WindowPlan:
        pos = self.position
        if self._plan is None or self._plan.start != pos.streams:
            c = self.carry
            if c is not None and c.start == pos.streams:
                self._plan = self.planner.plan(pos.streams, c.weights, c.sample_order)
                if c.reset_tokens:
                    self._plan.end = tuple(StreamState(s.epoch, s.pos, 0) for s in self._plan.end)
            else:
                self._plan = self.planner.plan(pos.streams)
            if self.on_window is not None:
                self.on_window(self._plan)
        return self._plan

    def next_pack(self) -> tuple[Pack, int, Position]:
        """Returns (pack, the epoch of its window, position after it)."""
        scanned = 0
        while True:
            plan = self.current_plan()
            pos = self.position
            if pos.offset < len(plan.packs):
                pack = plan.packs[pos.offset]
                nxt = Position(pos.streams, pos.offset + 1)
                if nxt.offset >= len(plan.packs):
                    nxt = Position(plan.end, 0)
                self.position = nxt
                return pack, plan.epoch, nxt
            self.position = Position(plan.end, 0)
            scanned += plan.n_samples
            if scanned > self.planner.samples_per_pass:
                raise NoPacks(
                    f"a whole epoch produced no packs: every sample is longer than seq_len={self.planner.seq_len} "
                    "or cannot be laid out (raise data.seq_len or split the utterances; see the warnings above)"
                )
