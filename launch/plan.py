"""Layout dry-run: what one rank of a TP x PP x DP (x virtual pipeline) job holds, on a machine
without GPUs, in seconds.

    python -m launch.plan --config configs/llasa-8b.yaml --gpus 1024 parallel.tp=8 parallel.pp=4 \\
        [--ranks 0,1023] [--gpu-mem-gb 80] [--json PATH|-]

For each chosen rank (default: the first rank of the first and of the last pipeline stage) it
initialises megatron-core's parallel state in a fake process group of the full world size
(torch's "fake" backend: no communication, no processes) and builds that rank's model chunks
with the project's own builder (megatron_tts.model.build_model_chunks) on the meta device, so an
8B shard costs no memory. From the shard it reports:

- parameters, and memory for weights, gradients (megatron's DDP buffer: fp32 when
  parallel.ddp.grad_reduce_in_fp32, else the parameter dtype) and Adam (fp32 master copy of
  16-bit parameters + two fp32 moments; sharded over DP with optim.distributed), all laid out
  by megatron-core's own buffer/bucket code (DistributedOptimizer.compute_full_param_layout),
  padding included;
- activations (formula below) and the total against --gpu-mem-gb (over --mem-fraction: exit 4);
- micro-batches per step, the pipeline bubble, DDP buckets (megatron's rule: bucket_size or
  max(40M, 1M x DP) elements; one bucket on pipeline stages > 0, for model chunks > 0 and
  without overlap_grad_reduce), and the bytes each GPU sends per step for DP (reduce-scatter of
  gradients + all-gather of parameters with the distributed optimizer, else an all-reduce), TP
  (per layer and micro-batch) and PP (point-to-point activations and their gradients).

Activation memory: the tensors one transformer layer keeps for backward, per token (bytes;
h = hidden, f = ffn_hidden, q = heads x kv_channels, k = 2 x query_groups x kv_channels,
t = TP, t' = t with sequence parallel else 1, a = 2 in bf16, 4 in fp32, s = seq_len):

    per_token = (16h + 8 + 2ah)/t' + (a(3q + k + 5f) + 4 heads)/t + a s

    16h + 8: the two RMSNorms (torch's, unfused: bf16 input with an fp32 weight) each keep
             two fp32 copies of their input and the fp32 rstd;
    2ah:     the norms' outputs, inputs of the QKV and FC1 linears;
    a(3q+k): the QKV output (kept whole through the v view), the rotated q, the attention
             output (also the projection's input); 4 heads: SDPA's fp32 log-sum-exp;
    5af:     SwiGLU: the FC1 output (2f), silu(gate), up + glu_linear_offset (megatron adds
             the offset, a new tensor even at 0) and the FC2 input (2f for a non-gated MLP);
    a s:     the dense block-diagonal mask, converted by SDPA to the activation dtype in every
             layer (b s^2 a bytes per layer and micro-batch, unsplit by TP).

This is the method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models": sbh(34 + 5as/h)/t with SP; flash/SDPA attention drops the 5as/h score
term) applied to this project's local layer spec, whose unfused norms and dense mask cost more
than GPT's 34: for llasa-8b at TP=8 it is 70 sbh/t (the mask 8 of it). tests/unit/test_plan.py
checks it against the tensors a real layer saves (saved-tensor hooks, CPU). Transformer-engine
layers (fused norms keeping input + rstd, THD attention without a mask) keep less. Hidden
dropout adds 2h/t' one-byte masks. Full recompute keeps a recomputed layer's input (a h/t';
every layer with recompute_method=uniform, the first recompute_num_layers of each chunk with
block) and, once, one layer's working set.

A rank keeps that for its layers times the micro-batches in flight under megatron's 1F1B
schedule, min(pp - pp_rank, m), so the first stage the most; with interleaving (vpp)
min(2(pp - pp_rank - 1) + (vpp - 1) pp + 1, m vpp) chunk forwards of layers/(pp vpp) layers
(megatron's warm-up counts, + 1), plus each in-flight input (a h/t' per token). The last stage
adds the final norm and the LM head's input ((8h + 4 + ah)/t' per token) and the logits:
s b V/t x 6 bytes (bf16 logits and the fp32 softmax the vocab-parallel cross-entropy keeps).
Not counted: the CUDA context, NCCL buffers, allocator fragmentation and transient buffers:
keep the total under ~90% of the GPU (--mem-fraction).

Settings the plan forces, so that the shard builds on the meta device: model.layer_spec=local
(transformer-engine layers hold the same parameters and need CUDA to build), model.init=megatron,
model.transformer.perform_initialization=false, use_cpu_initialization=true; train.dtype=auto
is planned as bf16 (a GPU run).

Exit codes: 0 the layout is valid and fits (warnings about waste may be printed); 3 the layout
is invalid (every problem is listed with its fix); 4 valid but over the memory budget;
64 bad command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import yaml

from megatron_tts.exit_codes import EXIT_FATAL as EXIT_INVALID  # 3: a config error, as in training

EXIT_OK = 0
EXIT_OVER_MEMORY = 4
EXIT_USAGE = 64

GB = 1e9

# What the plan sets on top of the recipe (see the module docstring).
BUILD_OVERRIDES = {
    "model.layer_spec": "local",
    "model.init": "megatron",
    "model.transformer.perform_initialization": False,
    "model.transformer.use_cpu_initialization": True,
}


class PlanError(Exception):
    """The layout is invalid: every problem, each with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------ the config


def read_raw(path: str, overrides: list[str]) -> dict:
    """The recipe's YAML tree with the dotted overrides applied (what load_config reads)."""
    from megatron_tts.config import ConfigError, parse_overrides

    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise PlanError([f"recipe {path} does not exist; see configs/ for the recipes"]) from None
    except yaml.YAMLError as e:
        raise PlanError([f"recipe {path} is not valid YAML: {e}"]) from None
    try:
        items = parse_overrides(list(overrides))
    except ConfigError as e:
        raise PlanError(e.problems) from None
    for key, value in items:
        _set(raw, key, value)
    return raw


def _set(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for k in parents:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[leaf] = value


def _get(raw: dict, dotted: str, default: Any = None) -> Any:
    node = raw
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def _skeleton(raw: dict) -> Optional[tuple[Any, bool]]:
    """(Config, whether its vocabulary is usable) holding only what layout_problems reads, built
    from the raw tree for when the full config does not build: its problems are reported, and
    the layout checks still add theirs."""
    from megatron_tts.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig, VocabConfig

    p, t = ParallelConfig(), TrainConfig()
    values = {"tp": _get(raw, "parallel.tp", p.tp), "pp": _get(raw, "parallel.pp", p.pp),
              "dp": _get(raw, "parallel.dp", p.dp), "vpp": _get(raw, "parallel.vpp", p.vpp),
              "mbs": _get(raw, "train.micro_batch_size", t.micro_batch_size),
              "gbs": _get(raw, "train.global_batch_size", t.global_batch_size),
              "seq_len": _get(raw, "data.seq_len", DataConfig().seq_len)}
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) for v in values.values()):
        return None  # a mistyped or non-positive size: the config's own problems name it
    try:
        vocab = VocabConfig(**(_get(raw, "model.vocab") or {}))
        usable = all(isinstance(getattr(vocab, k), int) for k in ("text_vocab_size", "n_codebooks", "codebook_size"))
    except TypeError:  # an unknown key: the config names it
        vocab, usable = VocabConfig(), False
    return Config(model=ModelConfig(vocab=vocab),
                  parallel=ParallelConfig(tp=values["tp"], pp=values["pp"], dp=values["dp"], vpp=values["vpp"],
                                          sequence_parallel=bool(_get(raw, "parallel.sequence_parallel", False))),
                  train=TrainConfig(micro_batch_size=values["mbs"], global_batch_size=values["gbs"]),
                  data=DataConfig(seq_len=values["seq_len"])), usable


def layout_problems(cfg, gpus: int, vocab_known: bool = True, gpus_per_node: Optional[int] = None) -> list[str]:
    """Problems of running `cfg` on `gpus` GPUs beyond what loading the config checks: the same
    check training runs at launch (megatron_tts.config.layout_problems). ``vocab_known``: False
    when the recipe's vocabulary section is unusable (its problems are reported by the config)."""
    from megatron_tts.config import layout_problems as problems_of

    if not vocab_known:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab=dataclasses.replace(
            cfg.model.vocab, padded_size=None)))
    return problems_of(cfg, gpus, ranks_per_node=gpus_per_node)


def load_plan_config(path: str, overrides: list[str], gpus: int, gpus_per_node: int = 8):
    """The validated config as the plan builds it; raises PlanError listing every problem."""
    from megatron_tts.config import ConfigError, build_config

    raw = read_raw(path, overrides)
    planned = dict(BUILD_OVERRIDES)
    if _get(raw, "train.dtype", "auto") == "auto":
        planned["train.dtype"] = "bf16"
    for key, value in planned.items():
        _set(raw, key, value)
    problems: list[str] = []
    if gpus < 1:
        problems.append(f"--gpus {gpus}: must be >= 1")
    cfg = None
    try:
        cfg = build_config(raw, source=path)
    except ConfigError as e:
        problems += e.problems
    if gpus >= 1:
        skeleton = (cfg, True) if cfg is not None else _skeleton(raw)
        if skeleton is not None:
            problems += layout_problems(skeleton[0], gpus, vocab_known=skeleton[1], gpus_per_node=gpus_per_node)
    problems = list(dict.fromkeys(problems))  # the batch check is in both the config and the world checks
    if problems:
        raise PlanError(problems)
    return cfg


# ------------------------------------------------------------------------------ one rank's shard


@contextlib.contextmanager
def fake_world(cfg, world_size: int, rank: int):
    """megatron-core's parallel state for `rank` of `world_size`, over torch's fake backend: the
    groups exist, nothing is sent. initialize_model_parallel at world size 4,096 takes ~0.5 s
    (measured on the 2-core CPU machine), so every group is built, as in the real run."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_tts import compat
    from megatron_tts.compat.mcore import parallel_state as ps

    if dist.is_initialized():
        raise RuntimeError("launch.plan needs a process without a process group (it builds a fake one)")
    compat.activate()  # on a machine without CUDA, as a training process would
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        p = cfg.parallel
        # As megatron_tts.parallel.init_distributed, minus the gloo side groups the fake backend
        # cannot create.
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                                     virtual_pipeline_model_parallel_size=p.vpp,
                                     create_gloo_process_groups=False)
        yield ps
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def _quiet():
    """megatron's deprecation notices (warnings and log lines), printed once per model built."""
    logger = logging.getLogger("megatron")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass
class Buffer:
    """One of megatron's DDP buffers (one per parameter/gradient dtype pair) of one model chunk."""

    chunk: int
    param_dtype: str
    grad_dtype: str
    numel: int  # padded, as allocated
    numel_unpadded: int
    buckets: list[int]  # elements per bucket (padded)
    param_bytes: int  # bytes per element
    grad_bytes: int


@dataclass
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    stage: str  # first / middle / last / only
    layers: list[int]  # global indices of the transformer layers this rank holds
    parameters: int
    embedding_parameters: int  # input embedding + LM head rows held here
    bucket_size: Optional[int]  # elements; None = one bucket per buffer
    buffers: list[Buffer]
    in_flight: int  # micro-batches (chunk forwards with vpp) whose activations are held at the peak
    memory: dict[str, int]  # bytes: weights, grads, optimizer, activations, total
    comm: dict[str, int]  # bytes this GPU sends per step: dp_grads, dp_params, embedding_sync, tp, pp, outer_sync
    build_s: float


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def ddp_buffers(cfg, chunks: list, dp: int, pp_rank: int) -> tuple[Optional[int], list[Buffer]]:
    """megatron's DDP buffers and buckets for these chunks, computed by megatron-core's own layout
    code (what DistributedDataParallel does at wrap time in megatron_tts/train/build.py, without
    allocating the buffers)."""
    from megatron_tts.compat.mcore import DistributedOptimizer, param_and_grad_buffer

    _compute_default_per_buffer_param_layout = param_and_grad_buffer._compute_default_per_buffer_param_layout
    group_params_for_buffers = param_and_grad_buffer.group_params_for_buffers

    ddp = cfg.parallel.ddp
    # DistributedDataParallel.__init__: the default size, then no bucketing without overlap or
    # on stages > 0; train.py passes disable_bucketing for chunks > 0.
    size = ddp.bucket_size if ddp.bucket_size is not None else max(40_000_000, 1_000_000 * dp)
    if not ddp.overlap_grad_reduce or pp_rank > 0:
        size = None
    out = []
    for i, chunk in enumerate(chunks):
        bucket_size = size if i == 0 else None
        params = [p for p in chunk.parameters() if p.requires_grad]
        if ddp.use_distributed_optimizer:
            layouts = DistributedOptimizer.compute_full_param_layout(params, bucket_size, dp, ddp).layouts
        else:
            layouts = {key: _compute_default_per_buffer_param_layout(group, bucket_size)
                       for key, (group, _) in group_params_for_buffers(params, ddp.grad_reduce_in_fp32).items()}
        for key, layout in layouts.items():
            out.append(Buffer(chunk=i, param_dtype=_dtype_name(key.param_dtype), grad_dtype=_dtype_name(key.grad_dtype),
                              numel=layout.bucket_indices[-1][1], numel_unpadded=sum(layout.per_bucket_numel_unpadded),
                              buckets=[e - s for s, e in layout.bucket_indices],
                              param_bytes=key.param_dtype.itemsize, grad_bytes=key.grad_dtype.itemsize))
    return size, out


def activation_bytes_per_layer(cfg, full_recompute: Optional[bool] = None) -> int:
    """Activation bytes one transformer layer keeps for backward, per micro-batch (the formula
    in the module docstring); full_recompute=None reads model.transformer.recompute_granularity."""
    from megatron_tts.config import resolve_dtype

    t = cfg.model.transformer
    tp = cfg.parallel.tp
    outside = tp if cfg.parallel.sequence_parallel else 1  # what SP shards, TP alone does not
    a = 2 if resolve_dtype(cfg) == "bf16" else 4
    h, f, s = t.hidden_size, t.ffn_hidden_size, cfg.data.seq_len
    q = t.num_attention_heads * t.kv_channels
    kv = 2 * (t.num_query_groups or t.num_attention_heads) * t.kv_channels
    if full_recompute is None:
        full_recompute = t.recompute_granularity == "full"
    if full_recompute:
        per_token = a * h / outside
    else:
        mlp = (5 if t.gated_linear_unit else 2) * f
        per_token = ((16 * h + 8 + 2 * a * h) / outside + (a * (3 * q + kv + mlp) + 4 * t.num_attention_heads) / tp
                     + a * s)
        if t.hidden_dropout > 0:
            per_token += 2 * h / outside
    return int(s * cfg.train.micro_batch_size * per_token)


def _in_flight(pp: int, vpp: Optional[int], pp_rank: int, m: int) -> int:
    """Peak micro-batches (chunk forwards with vpp) whose activations one rank holds under
    megatron's 1F1B schedules: warm-up forwards + the one of the steady phase."""
    if pp == 1:
        return 1
    if vpp is None:
        return min(pp - pp_rank, m)
    return min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1, m * vpp)


def estimate_rank(cfg, rank: int, ps, chunks: list, build_s: float = 0.0, gpus_per_node: int = 8) -> RankPlan:
    """Memory, buckets and communication of one rank, from its built (meta) chunks and megatron's
    parallel state for it."""
    from megatron_tts.config import padded_vocab_size, resolve_dtype
    from megatron_tts.config.derived import hierarchical_inner_size

    t = cfg.model.transformer
    p = cfg.parallel
    tp, pp, vpp = p.tp, p.pp, p.vpp
    dp = ps.get_data_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    m = cfg.num_microbatches(dp)
    b, s, h = cfg.train.micro_batch_size, cfg.data.seq_len, t.hidden_size
    a = 2 if resolve_dtype(cfg) == "bf16" else 4
    vocab_local = padded_vocab_size(cfg) // tp
    first = pp_rank == 0
    last = pp_rank == pp - 1

    layers = sorted({layer.layer_number - 1 for c in chunks for layer in c.decoder.layers})
    parameters = sum(q.numel() for c in chunks for q in c.parameters())
    embedding = sum(q.numel() for c in chunks for n, q in c.named_parameters()
                    if n.startswith(("embedding.", "output_layer.")))

    bucket_size, buffers = ddp_buffers(cfg, chunks, dp, pp_rank)
    distributed = cfg.parallel.ddp.use_distributed_optimizer
    weights = sum(x.numel * x.param_bytes for x in buffers) if distributed else \
        sum(q.numel() * q.element_size() for c in chunks for q in c.parameters())
    grads = sum(x.numel * x.grad_bytes for x in buffers)
    optimizer = 0
    for x in buffers:
        per_element = 8 + (4 if x.param_bytes < 4 else 0)  # two fp32 moments (+ fp32 master of 16-bit)
        optimizer += (x.numel // dp if distributed else x.numel_unpadded) * per_element

    in_flight = _in_flight(pp, vpp, pp_rank, m)
    layers_per_unit = len(layers) // len(chunks)  # per chunk forward
    outside = tp if p.sequence_parallel else 1
    stage_input = b * s * h * a // outside  # the schedule keeps each in-flight input for backward
    full, plain = activation_bytes_per_layer(cfg, full_recompute=True), activation_bytes_per_layer(cfg, False)
    recomputed = 0
    if t.recompute_granularity == "full":  # "block" recomputes the first recompute_num_layers of each chunk
        recomputed = layers_per_unit if t.recompute_method == "uniform" else \
            min(t.recompute_num_layers or 0, layers_per_unit)
    activations = in_flight * (recomputed * full + (layers_per_unit - recomputed) * plain + stage_input)
    if recomputed:  # one layer's working set while it is recomputed
        activations += plain
    if last:  # final norm, LM head input, logits
        activations += b * s * ((8 * h + 4 + a * h) // outside + vocab_local * 6)
    memory = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations}
    if p.hierarchical.enabled:  # fp32 anchor (+ momentum) of every parameter this rank holds
        per_param = 4 if p.hierarchical.outer_optimizer.kind == "average" else 8
        memory["outer_state"] = per_param * sum(x.numel_unpadded for x in buffers)
    memory["total"] = sum(memory.values())

    # Bytes one GPU sends per step, ring algorithms: all-reduce 2(n-1)/n, reduce-scatter and
    # all-gather (n-1)/n of the full buffer.
    ring = (dp - 1) / dp
    comm = {"dp_grads": 0, "dp_params": 0, "embedding_sync": 0, "tp": 0, "pp": 0, "outer_sync": 0}
    hier = p.hierarchical
    if hier.enabled:  # every step within the inner group; the outer delta (fp32) every k steps
        inner = hierarchical_inner_size(cfg, gpus_per_node)
        nodes = dp // inner
        comm["dp_grads"] = int(2 * (inner - 1) / inner * grads)
        comm["outer_sync"] = int(2 * (nodes - 1) / nodes * 4 * sum(x.numel for x in buffers) / inner
                                 / hier.outer_interval)
    elif distributed:
        comm["dp_grads"] = int(ring * grads)
        comm["dp_params"] = int(ring * sum(x.numel * x.param_bytes for x in buffers))
    else:
        comm["dp_grads"] = int(2 * ring * grads)
    def grad_bytes_of(q) -> int:
        return 4 if cfg.parallel.ddp.grad_reduce_in_fp32 else q.element_size()

    if cfg.model.share_embeddings and pp > 1 and (first or last):  # all-reduce over the 2 embedding copies
        comm["embedding_sync"] = sum(q.numel() * grad_bytes_of(q) for c in chunks for n, q in c.named_parameters()
                                     if n.startswith(("embedding.", "output_layer.")))
    if tp > 1:
        act = b * s * h * a
        tp_ring = (tp - 1) / tp
        if p.sequence_parallel:
            # fwd: all-gather before QKV and FC1, reduce-scatter after proj and FC2; bwd: their
            # conjugates plus the re-gather of the QKV/FC1 inputs for the weight gradients.
            per_layer_tp, embed_tp, head_tp = 10 * tp_ring * act, 2 * tp_ring * act, 3 * tp_ring * act
        else:
            per_layer_tp, embed_tp, head_tp = 4 * 2 * tp_ring * act, 2 * tp_ring * act, 2 * tp_ring * act
        per_mb = len(layers) * per_layer_tp + (embed_tp if first else 0)
        if last:
            per_mb += head_tp + 3 * 2 * tp_ring * b * s * 4  # + the cross-entropy's fp32 all-reduces
        # finalize_model_grads all-reduces the sequence-parallel (norm) weights' grads over TP.
        sp_grads = sum(q.numel() * grad_bytes_of(q) for c in chunks for q in c.parameters()
                       if getattr(q, "sequence_parallel", False))
        comm["tp"] = int(m * per_mb + 2 * tp_ring * sp_grads)
    if pp > 1:
        boundary = b * (s // tp if p.sequence_parallel else s) * h * a
        n_chunks = len(chunks)
        holds_first = sum(1 for c in chunks if c.pre_process)
        holds_last = sum(1 for c in chunks if c.post_process)
        comm["pp"] = int(m * ((n_chunks - holds_last) + (n_chunks - holds_first)) * boundary)

    stage = "only" if pp == 1 else "first" if first else "last" if last else "middle"
    return RankPlan(rank=rank, tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=pp_rank,
                    dp_rank=ps.get_data_parallel_rank(), stage=stage, layers=layers, parameters=parameters,
                    embedding_parameters=embedding, bucket_size=bucket_size, buffers=buffers, in_flight=in_flight,
                    memory=memory, comm=comm, build_s=round(build_s, 3))


def plan_rank(cfg, gpus: int, rank: int, gpus_per_node: int = 8) -> RankPlan:
    """Build `rank`'s shard of `cfg` on `gpus` GPUs (fake process group, meta device) and estimate
    it. Importable: needs a process without a process group."""
    import torch

    from megatron_tts.model import build_model_chunks

    t0 = time.perf_counter()
    with fake_world(cfg, gpus, rank) as ps, torch.device("meta"), _quiet():
        chunks = build_model_chunks(cfg, device=torch.device("meta"))
        return estimate_rank(cfg, rank, ps, chunks, time.perf_counter() - t0, gpus_per_node)


# ------------------------------------------------------------------------------ the whole layout


@dataclass
class Plan:
    config: str
    gpus: int
    tp: int
    pp: int
    dp: int
    vpp: Optional[int]
    sequence_parallel: bool
    distributed_optimizer: bool
    dtype: str
    micro_batch_size: int
    global_batch_size: int
    micro_batches: int
    bubble: float  # (pp - 1) / (vpp x m), as a fraction of the ideal step time
    padded_vocab: int
    total_parameters: int  # the model, counted once (no TP/PP copies)
    gpu_mem_bytes: int
    mem_fraction: float
    ranks: list[RankPlan]
    dp_sync: dict = field(default_factory=dict)  # inter-node DP bytes per GPU per step, flat vs hierarchical
    warnings: list[str] = field(default_factory=list)
    over_memory: list[str] = field(default_factory=list)


def default_ranks(cfg, gpus: int) -> list[int]:
    """The first rank of the first and of the last pipeline stage (megatron's rank order is
    tp-cp-ep-dp-pp: stage k starts at k x tp x dp)."""
    per_stage = gpus // cfg.parallel.pp
    return sorted({0, (cfg.parallel.pp - 1) * per_stage})


def total_parameters(cfg) -> int:
    """The whole model's parameters, counted from megatron's own modules (TP=PP=1, meta)."""
    import torch

    from megatron_tts.config import padded_vocab_size
    from megatron_tts.model import build_model_chunks

    transformer = dataclasses.replace(cfg.model.transformer, tensor_model_parallel_size=1,
                                      pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                                      sequence_parallel=False)
    vocab = dataclasses.replace(cfg.model.vocab, padded_size=padded_vocab_size(cfg))  # padding follows TP
    one = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, transformer=transformer, vocab=vocab),
        parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, vpp=None, sequence_parallel=False, dp=None))

    with fake_world(one, 1, 0), torch.device("meta"), _quiet():
        return sum(q.numel() for c in build_model_chunks(one, device=torch.device("meta")) for q in c.parameters())


def plan_layout(cfg, gpus: int, ranks: Optional[list[int]] = None, gpu_mem_gb: float = 80.0,
                mem_fraction: float = 0.9, gpus_per_node: int = 8, bubble_warn: float = 0.2,
                config_name: str = "") -> Plan:
    from megatron_tts.config import padded_vocab_size, resolve_dtype

    p = cfg.parallel
    dp = cfg.dp_for(gpus)
    m = cfg.num_microbatches(dp)
    ranks = ranks if ranks is not None else default_ranks(cfg, gpus)
    bad = [r for r in ranks if not 0 <= r < gpus]
    if bad:
        raise PlanError([f"--ranks {bad}: ranks go from 0 to {gpus - 1}"])
    plan = Plan(config=config_name, gpus=gpus, tp=p.tp, pp=p.pp, dp=dp, vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                distributed_optimizer=cfg.optim.distributed, dtype=resolve_dtype(cfg),
                micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size,
                micro_batches=m, bubble=(p.pp - 1) / ((p.vpp or 1) * m), padded_vocab=padded_vocab_size(cfg),
                total_parameters=total_parameters(cfg), gpu_mem_bytes=int(gpu_mem_gb * GB), mem_fraction=mem_fraction,
                ranks=[plan_rank(cfg, gpus, r, gpus_per_node) for r in ranks])
    plan.dp_sync = dp_sync(cfg, plan.ranks[0], dp, gpus_per_node)
    plan.warnings = layout_warnings(cfg, plan, gpus_per_node, bubble_warn)
    budget = mem_fraction * plan.gpu_mem_bytes
    fixes = ["raise parallel.tp (up to the GPUs per node) or parallel.pp"]
    if not cfg.optim.distributed and dp > 1:
        fixes.append("set optim.distributed=true")
    if cfg.train.micro_batch_size > 1:
        fixes.append("lower train.micro_batch_size")
    if cfg.model.transformer.recompute_granularity != "full":
        fixes.append("set model.transformer.recompute_granularity=full (and recompute_method=uniform)")
    for r in plan.ranks:
        if r.memory["total"] > budget:
            plan.over_memory.append(
                f"rank {r.rank} ({r.stage} stage) needs {r.memory['total'] / GB:.1f} GB, over {mem_fraction:.0%} of "
                f"{gpu_mem_gb:g} GB ({budget / GB:.1f} GB): " + ", ".join(fixes))
    return plan


def dp_sync(cfg, r: RankPlan, dp: int, gpus_per_node: int) -> dict:
    """Bytes one GPU sends across nodes per step for DP, without and with parallel.hierarchical
    (its outer_interval and inner group; the recipe's values, or the defaults when it is off).
    Both assume node-aware collectives: the g DP ranks of a node first reduce within it, then each
    exchanges its 1/g across the N nodes (ring: 2 (N-1)/N of what it exchanges for an all-reduce,
    (N-1)/N for a reduce-scatter or an all-gather). Flat DP exchanges the gradients every step (and
    all-gathers the parameters with the distributed optimizer); hierarchical DP exchanges the fp32
    parameter delta every outer_interval steps."""
    from megatron_tts.config.derived import hierarchical_inner_size

    h = cfg.parallel.hierarchical
    per_node = max(1, min(dp, gpus_per_node // cfg.parallel.tp))  # DP ranks of one TP x PP position per node
    nodes = max(1, dp // per_node)
    grads = sum(x.numel * x.grad_bytes for x in r.buffers)
    params = sum(x.numel * x.param_bytes for x in r.buffers)
    if cfg.optim.distributed:
        flat = (nodes - 1) / nodes * (grads + params) / per_node
    else:
        flat = 2 * (nodes - 1) / nodes * grads / per_node
    inner = min(dp, hierarchical_inner_size(cfg, gpus_per_node))
    outer_nodes = max(1, dp // inner)
    fp32_delta = 4 * sum(x.numel for x in r.buffers)
    hier = 2 * (outer_nodes - 1) / outer_nodes * fp32_delta / inner / h.outer_interval
    return {"enabled": bool(h.enabled), "gpus_per_node": gpus_per_node, "nodes": nodes, "dp_per_node": per_node,
            "inner": inner, "outer_interval": h.outer_interval,
            "flat_inter_node_bytes_per_gpu_per_step": int(flat),
            "hierarchical_inter_node_bytes_per_gpu_per_step": int(hier),
            "reduction": round(flat / hier, 2) if hier else None}


def layout_warnings(cfg, plan: Plan, gpus_per_node: int, bubble_warn: float) -> list[str]:
    p, ddp = cfg.parallel, cfg.parallel.ddp
    out = []
    if p.tp > gpus_per_node:
        out.append(f"parallel.tp={p.tp} > {gpus_per_node} GPUs per node: every layer's TP collectives cross the "
                   f"network; keep tp <= {gpus_per_node} and raise parallel.pp instead")
    elif gpus_per_node % p.tp:
        out.append(f"parallel.tp={p.tp} does not divide {gpus_per_node} GPUs per node: some TP groups straddle two "
                   f"nodes; use a tp that divides {gpus_per_node}")
    if p.pp > 1 and plan.micro_batches < p.pp:
        out.append(f"{plan.micro_batches} micro-batch(es) per step for {p.pp} pipeline stages: the pipeline never "
                   f"fills; raise train.global_batch_size or lower train.micro_batch_size")
    if plan.bubble > bubble_warn:
        out.append(f"pipeline bubble (pp-1)/(vpp x m) = ({p.pp}-1)/({p.vpp or 1} x {plan.micro_batches}) = "
                   f"{plan.bubble:.0%} of the step (> {bubble_warn:.0%}): raise train.global_batch_size, lower "
                   f"train.micro_batch_size or parallel.pp, or interleave with parallel.vpp")
    if cfg.optim.distributed and plan.dp == 1:
        out.append("optim.distributed=true with DP=1 shards nothing (it only adds copies); set it false or raise DP")
    if p.tp > 1 and not p.sequence_parallel:
        out.append(f"parallel.sequence_parallel=false with tp={p.tp}: norm and residual activations are replicated "
                   f"on every TP rank; set parallel.sequence_parallel=true (same communication volume, less memory)")
    if plan.dp > 1 and not ddp.overlap_grad_reduce:
        out.append("parallel.ddp.overlap_grad_reduce=false: the DP gradient reduction runs after the backward pass "
                   "instead of under it; set it true")
    return out


# ------------------------------------------------------------------------------ output


def _gb(x: float) -> str:
    return f"{x / GB:,.2f}"


def render(plan: Plan) -> str:
    lines = [f"{plan.config or 'config'} on {plan.gpus:,} GPUs: TP={plan.tp} x PP={plan.pp} x DP={plan.dp}"
             + (f" (vpp={plan.vpp})" if plan.vpp else "")
             + f", sequence parallel {'on' if plan.sequence_parallel else 'off'}, distributed optimizer "
             + f"{'on' if plan.distributed_optimizer else 'off'}, {plan.dtype}",
             f"model: {plan.total_parameters:,} parameters; padded vocabulary {plan.padded_vocab:,} "
             f"({plan.padded_vocab // plan.tp:,} rows per TP rank)",
             f"micro-batches per step: {plan.micro_batches} (global batch {plan.global_batch_size} = micro-batch "
             f"{plan.micro_batch_size} x DP {plan.dp} x {plan.micro_batches}); pipeline bubble "
             f"(pp-1)/(vpp x m) = {plan.bubble:.1%}", ""]
    rows = [("", *[f"rank {r.rank}" for r in plan.ranks])]
    add = rows.append
    add(("(tp, pp, dp) rank", *[f"({r.tp_rank}, {r.pp_rank}, {r.dp_rank})" for r in plan.ranks]))
    add(("pipeline stage", *[r.stage for r in plan.ranks]))
    add(("transformer layers", *[_span(r.layers) for r in plan.ranks]))
    add(("parameters", *[f"{r.parameters:,}" for r in plan.ranks]))
    add(("  of which embedding/LM head", *[f"{r.embedding_parameters:,}" for r in plan.ranks]))
    add(("memory, GB", *["" for _ in plan.ranks]))
    for key, label in (("weights", "weights"), ("grads", "gradients (DDP buffer)"),
                       ("optimizer", "Adam states" + (f" (/DP {plan.dp})" if plan.distributed_optimizer else "")),
                       ("activations", "activations"), ("outer_state", "hierarchical anchor + momentum")):
        if key in plan.ranks[0].memory:
            add((f"  {label}", *[_gb(r.memory[key]) for r in plan.ranks]))
    add(("  micro-batches in flight", *[str(r.in_flight) for r in plan.ranks]))
    add(("  total", *[f"{_gb(r.memory['total'])} ({r.memory['total'] / plan.gpu_mem_bytes:.0%} of "
                      f"{plan.gpu_mem_bytes / GB:g})" for r in plan.ranks]))
    add(("DDP buckets", *[_buckets(r) for r in plan.ranks]))
    add(("sent per GPU per step, GB", *["" for _ in plan.ranks]))
    for key, label in (("dp_grads", "DP grads " + ("reduce-scatter" if plan.distributed_optimizer else "all-reduce")),
                       ("dp_params", "DP params all-gather"), ("embedding_sync", "embedding grad sync"),
                       ("tp", "TP " + ("all-gather + reduce-scatter" if plan.sequence_parallel else "all-reduce")),
                       ("pp", "PP p2p"), ("outer_sync", "hierarchical outer sync (per step)")):
        add((f"  {label}", *[_gb(r.comm[key]) for r in plan.ranks]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()
              for row in rows]
    d = plan.dp_sync
    if d:
        lines.append(f"inter-node DP bytes per GPU per step (rank {plan.ranks[0].rank}, {d['nodes']} nodes x "
                     f"{d['dp_per_node']} DP rank(s)): flat {_gb(d['flat_inter_node_bytes_per_gpu_per_step'])} GB"
                     f"{' (in use)' if not d['enabled'] else ''}; hierarchical (inner {d['inner']}, outer sync every "
                     f"{d['outer_interval']} steps) {_gb(d['hierarchical_inter_node_bytes_per_gpu_per_step'])} GB"
                     f"{' (in use)' if d['enabled'] else ''}"
                     + (f", {d['reduction']:g}x less" if d['reduction'] else ""))
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"error: {o}" for o in plan.over_memory]
    return "\n".join(lines)


def _span(layers: list[int]) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _buckets(r: RankPlan) -> str:
    sizes = [n for x in r.buffers for n in x.buckets]
    return f"{len(sizes)}: {min(sizes) / 1e6:,.1f}M-{max(sizes) / 1e6:,.1f}M el" if len(sizes) > 1 else \
        f"1: {sizes[0] / 1e6:,.1f}M el"


# ------------------------------------------------------------------------------ entry point


def main(argv: Optional[list[str]] = None) -> int:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    ap = Parser(prog="python -m launch.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe, e.g. configs/llasa-8b.yaml")
    ap.add_argument("--gpus", type=int, required=True, help="world size (GPUs in the job)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.tp=8")
    ap.add_argument("--ranks", help="comma-separated ranks to build (default: first rank of the first and last stage)")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GPU memory in GB (1e9 bytes; default 80)")
    ap.add_argument("--mem-fraction", type=float, default=0.9, help="flag a total above this fraction (default 0.9)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="for the TP-across-nodes warning and the inter-node DP bytes "
                    "(default 8)")
    ap.add_argument("--bubble-warn", type=float, default=0.2, help="warn above this pipeline bubble (default 0.2)")
    ap.add_argument("--json", help="also write the plan as JSON to this path ('-': stdout, instead of the table)")
    args = ap.parse_intermixed_args(argv)  # overrides may sit between the options
    try:
        ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    except ValueError:
        ap.error(f"--ranks {args.ranks!r}: expected comma-separated integers")
    # megatron-core warns at import about every optional kernel it falls back from.
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*(Apex|Transformer Engine|absl).*")
    try:
        cfg = load_plan_config(args.config, args.overrides, args.gpus, args.gpus_per_node)
        plan = plan_layout(cfg, args.gpus, ranks, args.gpu_mem_gb, args.mem_fraction, args.gpus_per_node,
                           args.bubble_warn, config_name=os.path.basename(args.config))
    except PlanError as e:
        print(f"error: {len(e.problems)} problem(s) with {args.config} on {args.gpus} GPUs:\n{e}", file=sys.stderr)
        return EXIT_INVALID
    if args.json == "-":
        print(json.dumps(asdict(plan), indent=1))
    else:
        print(render(plan))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(asdict(plan), f, indent=1)
    return EXIT_OVER_MEMORY if plan.over_memory else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
