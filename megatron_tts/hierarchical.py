"""Hierarchical data parallelism (parallel.hierarchical): local SGD / DiLoCo over nodes.

DP is split into *inner* groups (consecutive DP ranks: the ranks of one node) and *outer* groups
(the same inner index on every node). Gradients are reduced over the inner group every step by
megatron's DDP (it is given the inner group); parameters drift apart between nodes and are
brought together every ``outer_interval`` applied steps by OuterSync:

    delta   = mean over nodes of (anchor - params)          (the pseudo-gradient, fp32)
    average: params = anchor - lr * delta                    (lr = 1: plain parameter averaging)
    sgd:     m = mu m + delta;  params = anchor - lr * m
    nesterov m = mu m + delta;  params = anchor - lr * (delta + mu m)   (DiLoCo)
    anchor  = params

Each rank handles its own TP/PP shard of the parameters, so TP and PP are untouched. The inner
ranks of a node hold identical parameters, so each reduces only its 1/inner slice of the delta
across nodes and the slices are gathered back within the node: the inter-node volume per GPU is
2 (nodes - 1) / nodes x 4 bytes x parameters / inner every outer_interval steps.

Gradients are scaled as plain DP scales them: megatron divides by the global token count (its
all-reduce spans the full DP group) and OuterSync's ``finalize`` multiplies by the node count,
so the mean over nodes of the node gradients is the plain-DP gradient. With a linear inner
update (SGD), outer_interval=1 and kind=average, lr=1 the run is plain DP up to float rounding.

Checkpoints (``sharded_state_dict`` / ``after_load``, a Checkpointer extension): the anchor and
momentum are saved sharded like the parameters they shadow (identical on every DP rank: DP rank
0 writes them); the model and optimizer state of nodes > 0, which differ from node 0's between
syncs, are saved under ``hierarchical.node<N>/`` keys written by each node's inner rank 0, so a
resume under the same layout continues exactly. Under another layout (world size, TP, PP, node
count or inner size) every node starts from node 0's state and the anchor is reset to it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("megatron_tts")

KEY_PREFIX = "hierarchical"


# ------------------------------------------------------------------------------ groups


def split_dp_group(dp_ranks: list[int], inner: int) -> tuple[list[list[int]], list[list[int]]]:
    """One DP group's global ranks (in DP-rank order) -> its inner groups (consecutive runs of
    ``inner`` ranks) and outer groups (the i-th rank of every inner group)."""
    if inner < 1 or len(dp_ranks) % inner:
        raise ValueError(f"an inner group of {inner} DP ranks does not divide a DP group of {len(dp_ranks)}")
    inner_groups = [dp_ranks[i:i + inner] for i in range(0, len(dp_ranks), inner)]
    outer_groups = [dp_ranks[j::inner] for j in range(inner)]
    return inner_groups, outer_groups


def nodes_straddled(inner_groups: list[list[int]], ranks_per_node: int) -> list[list[int]]:
    """The inner groups whose ranks sit on more than one node (ranks r // ranks_per_node)."""
    return [g for g in inner_groups if len({r // ranks_per_node for r in g}) > 1]


@dataclass(frozen=True)
class Hierarchy:
    """This rank's place in the split of its DP group."""

    inner_size: int  # DP ranks per inner group
    nodes: int  # inner groups per DP group
    inner_rank: int  # index within the inner group
    node: int  # index of the inner group
    inner_group: Any
    outer_group: Any


def build_hierarchy(cfg, dp_group, ranks_per_node: Optional[int] = None) -> Hierarchy:
    """Create the inner and outer groups of every DP group (collective: all ranks, same order)."""
    from megatron_tts.config.derived import hierarchical_inner_size

    world, rank = dist.get_world_size(), dist.get_rank()
    ranks_per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    inner = hierarchical_inner_size(cfg, ranks_per_node)
    mine = dist.get_process_group_ranks(dp_group)
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    found = None
    for dp_ranks in sorted({tuple(g) for g in every}):
        inner_groups, outer_groups = split_dp_group(list(dp_ranks), inner)
        if cfg.parallel.hierarchical.inner == "node":
            bad = nodes_straddled(inner_groups, ranks_per_node)
            if bad:
                raise RuntimeError(f"parallel.hierarchical.inner=node: the DP ranks {bad[0]} of one inner group sit on "
                                   f"different nodes ({ranks_per_node} ranks per node); give inner as a DP group size")
        made_inner = [dist.new_group(g) for g in inner_groups]
        made_outer = [dist.new_group(g) for g in outer_groups]
        if rank in dp_ranks:
            pos = list(dp_ranks).index(rank)
            found = Hierarchy(inner_size=inner, nodes=len(inner_groups), inner_rank=pos % inner, node=pos // inner,
                              inner_group=made_inner[pos // inner], outer_group=made_outer[pos % inner])
    assert found is not None, "this rank is in no DP group"
    return found


def ddp_process_groups(h: Hierarchy):
    """megatron DDP's process groups with the inner group as its data-parallel group."""
    from megatron_tts.compat.mcore import ProcessGroupCollection, parallel_state as ps

    return ProcessGroupCollection(dp=h.inner_group, dp_cp=h.inner_group, expt_dp=ps.get_expert_data_parallel_group(),
                                  tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                                  ep=ps.get_expert_model_parallel_group())


# ------------------------------------------------------------------------------ the outer step


@torch.no_grad()
def outer_update(anchor: torch.Tensor, delta: torch.Tensor, momentum: Optional[torch.Tensor], kind: str,
                 lr: float, mu: float) -> None:
    """Apply one outer step to ``anchor`` in place (it becomes the new parameters)."""
    if kind == "average":
        step = delta
    else:
        momentum.mul_(mu).add_(delta)
        step = delta + mu * momentum if kind == "nesterov" else momentum
    anchor.sub_(step if lr == 1.0 else lr * step)


def _leaves(x, path: str = ""):
    """(path, value) of every leaf of a nested dict/list."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}/{k}" if path else str(k))
    elif isinstance(x, list):
        for k, v in enumerate(x):
            yield from _leaves(v, f"{path}/{k}")
    else:
        yield path, x


def _where(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape)


class OuterSync:
    """The outer synchronisation of one rank's parameter shard, its state, and its checkpoint
    extension. ``after_step`` is called once per step on every rank (train.hooks.OuterSyncHook)."""

    name = KEY_PREFIX

    def __init__(self, cfg, h: Hierarchy, optimizer, layout) -> None:
        from megatron_tts.compat.optimizer import main_model_params

        self.hcfg = cfg.parallel.hierarchical
        self.h = h
        self.optimizer = optimizer
        self.layout = layout
        self.pairs = main_model_params(optimizer)
        self.anchor = [main.detach().float().clone() for _, main in self.pairs]
        nesterov_or_sgd = self.hcfg.outer_optimizer.kind != "average"
        self.momentum = [torch.zeros_like(a) for a in self.anchor] if nesterov_or_sgd else None
        self.inner_steps = 0  # applied steps since the last outer sync
        self.outer_steps = 0
        self.sync_s = 0.0  # seconds in outer syncs since the last metrics record
        self._keys: dict[str, int] = {}  # checkpoint key -> index of the tensor it shadows
        self._same_layout = False  # the checkpoint being loaded was written under this layout

    @torch.no_grad()
    def reset_anchor(self) -> None:
        """The current parameters become the anchor (a new start, or another layout's resume)."""
        for a, (_, main) in zip(self.anchor, self.pairs):
            a.copy_(main.float())

    # ---- per step ----
    def finalize(self, finalize_model_grads):
        """Wrap megatron's finalize_model_grads: it divides by the global token count, the DDP sum
        spans one node; times the node count, the mean of the node gradients is the DP gradient."""
        nodes = float(self.h.nodes)

        def finalize_hierarchical(model, *args, **kwargs):
            finalize_model_grads(model, *args, **kwargs)
            for chunk in model:
                chunk.scale_gradients(nodes)

        return finalize_hierarchical

    def after_step(self, applied: bool) -> bool:
        """Count an applied step (``applied``: the guard's verdict, the same on every rank);
        synchronise when outer_interval of them have passed. True when it synchronised."""
        if not applied:
            return False
        self.inner_steps += 1
        if self.inner_steps < self.hcfg.outer_interval:
            return False
        t0 = time.perf_counter()
        self.sync()
        self.sync_s += time.perf_counter() - t0
        return True

    @torch.no_grad()
    def sync(self) -> None:
        from megatron_tts.compat.optimizer import copy_main_to_model

        o = self.hcfg.outer_optimizer
        for bucket in self._buckets():
            flat = self.mean_over_nodes(torch.cat([(self.anchor[i] - self.pairs[i][1].float()).flatten()
                                                   for i in bucket]))
            offset = 0
            for i in bucket:
                a, main = self.anchor[i], self.pairs[i][1]
                delta = flat[offset:offset + a.numel()].view_as(a)
                offset += a.numel()
                outer_update(a, delta, None if self.momentum is None else self.momentum[i], o.kind, o.lr,
                             o.momentum)
                main.copy_(a)
        copy_main_to_model(self.optimizer)
        self.inner_steps = 0
        self.outer_steps += 1

    def _buckets(self, limit: int = 1 << 26):
        """Indices of the parameters, in runs of at most ``limit`` elements (one larger parameter
        alone): the sync's transient fp32 copies stay a few x 256 MB, not a few x the shard."""
        bucket, size = [], 0
        for i, a in enumerate(self.anchor):
            if bucket and size + a.numel() > limit:
                yield bucket
                bucket, size = [], 0
            bucket.append(i)
            size += a.numel()
        if bucket:
            yield bucket

    def mean_over_nodes(self, flat: torch.Tensor) -> torch.Tensor:
        """The mean of ``flat`` over the nodes. The inner ranks hold the same ``flat``: each reduces
        its 1/inner slice across nodes, then the slices are gathered within the node."""
        h = self.h
        n = flat.numel()
        per = -(-n // h.inner_size)
        padded = torch.nn.functional.pad(flat, (0, per * h.inner_size - n))
        mine = padded[h.inner_rank * per:(h.inner_rank + 1) * per].clone()
        dist.all_reduce(mine, group=h.outer_group)  # (gloo has no AVG)
        mine.div_(h.nodes)
        if h.inner_size == 1:
            return mine[:n]
        parts = [torch.empty_like(mine) for _ in range(h.inner_size)]
        dist.all_gather(parts, mine, group=h.inner_group)
        return torch.cat(parts)[:n]

    def metrics(self) -> dict:
        out = {"outer_sync_s": round(self.sync_s, 6), "outer_steps": self.outer_steps}
        self.sync_s = 0.0
        return out

    # ---- checkpoint: a Checkpointer component (JSON) and extension (sharded tensors) ----
    def _layout(self) -> dict:
        lay = self.layout
        return {"world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                "nodes": self.h.nodes, "inner_size": self.h.inner_size}

    def state_dict(self) -> dict:
        return {"inner_steps": self.inner_steps, "outer_steps": self.outer_steps, "layout": self._layout(),
                "kind": self.hcfg.outer_optimizer.kind}

    def load_state_dict(self, state: dict) -> None:
        self.outer_steps = int(state.get("outer_steps", 0))
        # the nodes' own state comes back only under the same layout; otherwise a fresh interval
        self.inner_steps = int(state.get("inner_steps", 0)) if self._same_layout else 0

    def _saved(self, trainer_state: Optional[dict]) -> Optional[dict]:
        return ((trainer_state or {}).get("components") or {}).get(self.name)

    def sharded_state_dict(self, sd: dict, is_loading: bool, trainer_state: Optional[dict]) -> dict:
        """``sd`` (the model* and optimizer entries) extended with the outer state; on nodes > 0
        with their own model/optimizer state under node keys (loaded instead of node 0's when the
        checkpoint was written under this layout)."""
        from megatron_tts.compat.mcore import (
            ShardedTensor,
            ShardedTensorFactory,
            dict_list_map_outplace,
            make_sharded_optimizer_tensor,
        )

        saved = self._saved(trainer_state) if is_loading else None
        if is_loading:
            self._same_layout = False
        if is_loading and saved is None:
            return sd  # a checkpoint without hierarchical state: after_load starts from its weights
        # megatron's entries hold detached views of the parameters: matched by storage and shape
        index = {_where(model): i for i, (model, _) in enumerate(self.pairs)}
        ext, self._keys = {}, {}
        # (megatron stacks the layers: one storage key, one entry per layer; the entry's path in
        # the nested dict is unique)
        for path, sh in _leaves({k: v for k, v in sd.items() if k.startswith("model")}):
            if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)) or _where(sh.data) not in index:
                continue
            i = index[_where(sh.data)]
            self._keys[path] = i
            ext[f"anchor/{path}"] = make_sharded_optimizer_tensor(sh, self.anchor[i], f"{KEY_PREFIX}.anchor")
            if self.momentum is not None and (not is_loading or saved.get("kind") != "average"):
                ext[f"momentum/{path}"] = make_sharded_optimizer_tensor(sh, self.momentum[i],
                                                                        f"{KEY_PREFIX}.momentum")
        missing = len(self.pairs) - len(set(self._keys.values()))
        if missing:
            raise RuntimeError(f"parallel.hierarchical: {missing} parameter(s) have no sharded checkpoint entry; "
                               "their outer state could not be saved")
        out = dict(sd)
        out[KEY_PREFIX] = ext
        if is_loading:
            self._same_layout = saved.get("layout") == self._layout()
        if self.h.node > 0:
            node_sd = dict_list_map_outplace(self._node_local, {k: v for k, v in sd.items()})
            if not is_loading:
                out[f"{KEY_PREFIX}_node"] = node_sd
            elif self._same_layout:
                out.update(node_sd)  # same nesting, other storage keys: this node's own state
        return out

    def _node_local(self, x):
        """A sharded entry of this node's model/optimizer state under its node key; replicas are
        the node's inner ranks (megatron's replica_id ends with the DP rank)."""
        from megatron_tts.compat.mcore import ShardedBase, parallel_state as ps

        if not isinstance(x, ShardedBase):
            return x
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        rid = x.replica_id
        if isinstance(rid, tuple) and rid and rid[-1] == dp_rank:
            rid = rid[:-1] + (self.h.inner_rank,)
        elif isinstance(rid, int) and rid == dp_rank:
            rid = self.h.inner_rank
        else:
            raise RuntimeError(f"parallel.hierarchical: checkpoint entry {x.key} has replica_id {x.replica_id!r}, "
                               f"not ending with the DP rank {dp_rank}: cannot tell this node's replicas apart")
        return replace(x, key=f"{KEY_PREFIX}.node{self.h.node}/{x.key}", replica_id=rid)

    @torch.no_grad()
    def after_load(self, loaded: Optional[dict], trainer_state: dict) -> None:
        """After the model and optimizer were loaded: the outer state back, or (another layout, or
        a checkpoint without it) the anchor reset to the loaded weights."""
        saved = self._saved(trainer_state)
        if saved is not None and loaded:
            for key, i in self._keys.items():
                self.anchor[i].copy_(loaded[f"anchor/{key}"])
                if self.momentum is not None:
                    m = loaded.get(f"momentum/{key}")
                    self.momentum[i].copy_(m) if m is not None else self.momentum[i].zero_()
        if not self._same_layout:
            # Node 0's parameters are what every node loaded: they become the anchor, so that no
            # node's pending local progress is counted twice.
            self.reset_anchor()
            if self.layout.rank == 0:
                why = "has no hierarchical state" if saved is None else \
                    f"was written under {saved.get('layout')}, now {self._layout()}"
                log.warning("parallel.hierarchical: the checkpoint %s: every node starts from node 0's weights and "
                            "optimizer state, the outer anchor is reset to them (momentum %s)", why,
                            "kept" if saved is not None else "zero")
