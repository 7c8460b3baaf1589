"""The loader's checkpointable state: where every stream is, and what a resume may change.

What needs a new data stage (``train.reset_data=true``: the stream restarts) and what does not:
  * seq_len, pack_window, seed, tokenizer, layout, a dataset of data.paths, switching between
    data.paths and data.sources, a source removed or its shards changed: refused (the planned
    sequence would not be the one the checkpoint consumed a part of);
  * weights changed, a source added, data.sample_order changed: a new mixture. The window in
    progress is finished as it was planned, then the new mixture starts with every source where
    it was (each its own epoch and place; an added one at its start) and, when the weights
    changed, the blend's token clocks at 0: shares from there on follow the new weights. Logged.

Version 1 (one stream, packed by minimal bin slack) is read as a data.paths stream: its resume
continues exactly, with that packer.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .mixing import Carry, Position, StreamState
from .packing import PACKER_MBS, PACKERS
from .sources import DataConfigError

logger = logging.getLogger("data_pipeline.loader")

STATE_VERSION = 2

# what changes the planned sequence -> the config setting to name
_FIELDS = (("seq_len", "data.seq_len"), ("pack_window", "data.pack_window"), ("seed", "train.seed (the data order)"),
           ("tokenizer", "the text tokenizer"), ("layout", "model.layout"))


class StateMixin:
    """state_dict / load_state_dict / resume_differences of PackedLoader."""

    def _window_mixture(self) -> tuple[list[float], str]:
        """Weights and sample order of the window in progress."""
        c = self._carry
        if c is not None and c.start == self._position.streams:
            return list(c.weights), c.sample_order
        return [s.weight for s in self._src.streams], self.sample_order

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the consumed steps (prefetched steps are not included)."""
        weights, order = self._window_mixture()
        streams = [{"name": s.name, "fingerprint": fp, "weight": w, "epoch": st.epoch, "pos": st.pos,
                    "tokens": st.tokens}
                   for s, fp, w, st in zip(self._src.streams, self._src.stream_fingerprints, weights,
                                           self._position.streams)]
        by = self._by_source
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "pack_window": self.pack_window,
            "layout": self.layout.name,
            "tokenizer": self.tokenizer.fingerprint,
            "dataset": self._dataset_fingerprint,
            "mixing": self._src.mixing,
            "packer": self._packer,
            "sample_order": order,
            "streams": streams,
            "position": {"epoch": self._epoch, "offset": self._position.offset},
            "consumed_packs": self._cursor,
            "consumed_docs": self._consumed_docs,
            "consumed_tokens": self._consumed_tokens,
            "by_source": {n: {"tokens": int(by[i, 0]), "docs": int(by[i, 1]), "audio_s": float(by[i, 2])}
                          for i, n in enumerate(self.sources)},
            "global_batch_size": self.global_batch_size,
            "dp_size": self.dp_size,
        }

    def _upgrade(self, state: dict[str, Any]) -> dict[str, Any]:
        v = state.get("version")
        if v == STATE_VERSION:
            return state
        if v != 1:
            raise DataConfigError(f"loader state version {v!r} is not supported (this loader reads 1 and "
                                  f"{STATE_VERSION}); start the data stream afresh (train.reset_data=true)")
        pos = state["position"]
        name = self._src.streams[0].name if self._src.mixing == "paths" else "data.paths"
        return {**state, "version": STATE_VERSION, "mixing": "paths", "packer": PACKER_MBS, "sample_order": "shuffle",
                "streams": [{"name": name, "fingerprint": state.get("dataset"), "weight": 1.0,
                             "epoch": int(pos["epoch"]), "pos": int(pos["window"]) * int(state["pack_window"]),
                             "tokens": 0}],
                "position": {"epoch": int(pos["epoch"]), "offset": int(pos["offset"])}, "by_source": {}}

    def resume_differences(self, state: dict[str, Any]) -> list[str]:
        """Why ``state`` cannot continue with this loader (each 'what: checkpoint X, now Y'); empty
        when it can (a changed mixture is not a difference: see the module docstring)."""
        st = self._upgrade(state)
        mine = self.state_dict()
        out = [f"{what}: checkpoint {st.get(key)!r}, now {mine[key]!r}" for key, what in _FIELDS
               if st.get(key) != mine[key]]
        if st.get("mixing") != mine["mixing"]:
            out.append(f"the form of the data (data.paths or data.sources): checkpoint data.{st.get('mixing')}, "
                       f"now data.{mine['mixing']}")
        elif mine["mixing"] == "paths":
            if st.get("dataset") != mine["dataset"]:
                out.append(f"the datasets (data.paths: shard list, sizes, checksums): checkpoint {st.get('dataset')!r}, "
                           f"now {mine['dataset']!r}")
        else:
            now = {s["name"]: s["fingerprint"] for s in mine["streams"]}
            for s in st["streams"]:
                if s["name"] not in now:
                    out.append(f"data.sources: source {s['name']!r} was removed (checkpoint {s['fingerprint']!r}, now "
                               "absent)")
                elif now[s["name"]] != s["fingerprint"]:
                    out.append(f"data.sources: the datasets of source {s['name']!r} (shard list, sizes, checksums): "
                               f"checkpoint {s['fingerprint']!r}, now {now[s['name']]!r}")
        if st.get("packer") not in PACKERS:
            out.append(f"the packer: checkpoint {st.get('packer')!r}, this loader knows {list(PACKERS)}")
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (possibly saved with a different dp_rank/dp_size, worker count,
        global batch size, weights or sample order)."""
        diffs = self.resume_differences(state)
        if diffs:
            raise DataConfigError(
                "cannot resume data loader: " + "; ".join(diffs) + ". The packed sample order would not match the "
                "checkpoint. Restore the original setting or start the data stream afresh (no load_state_dict)")
        st = self._upgrade(state)
        if st["global_batch_size"] != self.global_batch_size:
            logger.warning(
                "resuming with global_batch_size %d (checkpoint %d): the pack sequence continues exactly, "
                "step boundaries move", self.global_batch_size, st["global_batch_size"],
            )
        self._reset()
        if st["packer"] != self._packer:
            self._packer = st["packer"]
            self._planner = self._make_planner()
        saved = {s["name"]: s for s in st["streams"]}
        states = tuple(StreamState(int(saved[s.name]["epoch"]), int(saved[s.name]["pos"]), int(saved[s.name]["tokens"]))
                       if s.name in saved else StreamState() for s in self._src.streams)
        offset = int(st["position"]["offset"])
        old_w = [float(saved[s.name]["weight"]) if s.name in saved else 0.0 for s in self._src.streams]
        new_w = [s.weight for s in self._src.streams]
        mixture_changed = old_w != new_w
        order_changed = st["sample_order"] != self.sample_order
        self._carry = None
        if mixture_changed or order_changed:
            if offset > 0:
                self._carry = Carry(states, tuple(old_w), st["sample_order"], reset_tokens=mixture_changed)
            elif mixture_changed:
                states = tuple(StreamState(x.epoch, x.pos, 0) for x in states)
            logger.warning(
                "data mixture changed on resume: a new stage%s%s; every source continues where it was (%s)%s",
                ": weights " + ", ".join(f"{s.name} {a:g} -> {b:g}" for s, a, b in zip(self._src.streams, old_w, new_w)
                                         if a != b) if mixture_changed else "",
                f"; sample_order {st['sample_order']} -> {self.sample_order}" if order_changed else "",
                ", ".join(f"{s.name} epoch {x.epoch} at {x.pos}" for s, x in zip(self._src.streams, states)),
                f"; the window in progress finishes under the old mixture ({offset} of its packs were consumed)"
                if offset > 0 else "")
        self._position = Position(states, offset)
        self._cursor = int(st["consumed_packs"])
        self._consumed_docs = int(st["consumed_docs"])
        self._consumed_tokens = int(st["consumed_tokens"])
        self._by_source = np.zeros((len(self.sources), 3))
        for i, n in enumerate(self.sources):
            b = st.get("by_source", {}).get(n)
            if b:
                self._by_source[i] = (b["tokens"], b["docs"], b["audio_s"])
        logger.info("data loader resumed at %s, pack offset %d (consumed packs %d, dp %d/%d)",
                    ", ".join(f"{s.name} epoch {x.epoch} sample {x.pos}" for s, x in zip(self._src.streams, states)),
                    offset, self._cursor, self.dp_rank, self.dp_size)
