"""One typed config tree, loaded from a YAML recipe plus ``dotted.key=value`` overrides.

megatron-core's own TransformerConfig, DistributedDataParallelConfig and OptimizerConfig are
nested as they are (their fields are written under ``model.transformer``, ``parallel.ddp`` and
``optim.optimizer``); nothing here re-declares them. Fields they share with our tree (the
parallel sizes, dtypes, the distributed-optimizer switch) are filled in from ours when the tree
is built, so a recipe states each fact once.

Loading validates everything and raises one ``ConfigError`` listing every problem with its fix.
Building the config has no side effects: nothing is created on disk, no process group touched.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with its fix."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


# --------------------------------------------------------------------------------------------
# Our sections. Every field has a docstring (the string literal under it).
# --------------------------------------------------------------------------------------------


@dataclass
class VocabConfig:
    text_vocab_size: int = 256
    """Size of the text tokenizer's vocabulary (Llama-3: 128256, the byte tokenizer: 256)."""
    special_tokens: Optional[list[str]] = None
    """Special tokens appended after the text vocab; None = LLaSA's 8, in LLaSA order."""
    n_codebooks: int = 1
    """Codec codebooks (LLaSA/xcodec2: 1; flattened SNAC: 7 slots)."""
    codebook_size: int = 65536
    """Entries per codebook (xcodec2: 65536)."""
    padded_size: Optional[int] = None
    """Embedding rows; None = vocab rounded up to a multiple of 128 x max(TP, 8), so that
    checkpoints reshard across any TP <= 8 without changing the embedding's shape."""


@dataclass
class ModelConfig:
    transformer: Any = None
    """megatron-core TransformerConfig fields (num_layers, hidden_size, ...); built into one."""
    vocab: VocabConfig = field(default_factory=VocabConfig)
    """Vocabulary layout: text ids, special tokens, codec ids."""
    layout: str = "llasa"
    """Sequence layout: 'llasa' (text then speech, one codebook) or 'flattened' (frame-major slots)."""
    loss_segments: list[str] = field(default_factory=lambda: ["speech", "speech_end"])
    """Segments trained on (LLaSA: speech ids and the speech-end token)."""
    share_embeddings: bool = True
    """Tie input embedding and LM head (Llama-3.2-1B/3B: true, Llama-3.1-8B: false)."""
    rotary_base: int = 500000
    """RoPE base (Llama-3: 500000)."""
    rope_scaling: bool = False
    """Llama-3.1 RoPE frequency scaling."""
    rope_scaling_factor: float = 8.0
    """Llama-3.1 RoPE scaling factor (3.2-1B/3B: 32, 3.1-8B: 8)."""
    layer_spec: str = "auto"
    """'auto' (transformer-engine when it imports, else local), 'te' or 'local'."""
    core_attention: str = "sdpa"
    """Local spec only: 'sdpa' (torch scaled_dot_product_attention) or 'megatron'
    (megatron-core's unfused DotProductAttention)."""
    init: str = "layout_invariant"
    """'layout_invariant': every weight is a function of (seed, name), identical under any
    TP/PP layout; 'megatron': megatron's per-rank init (faster to build at scale)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: Optional[int] = None
    """Data-parallel size; None = world_size / (tp * pp)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None = off."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl with CUDA, else gloo), 'nccl' or 'gloo'."""
    timeout_s: float = 600.0
    """Collective timeout in seconds."""
    ddp: Any = None
    """megatron-core DistributedDataParallelConfig fields (bucket_size, overlap_grad_reduce, ...)."""


@dataclass
class TokenizerConfig:
    kind: str = "byte"
    """'byte' (ships with the project) or 'hf' (a local tokenizer.json; never downloaded)."""
    path: Optional[str] = None
    """Local path of the HF tokenizer (file or directory) when kind = 'hf'."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=lambda: ["data/demo"])
    """Dataset dirs or index.json URLs (local paths or s3://)."""
    seq_len: int = 512
    """Packed sequence length."""
    pack_window: int = 1024
    """Samples packed together (best-fit-decreasing) per window."""
    num_workers: int = 2
    """Reader threads per rank."""
    prefetch: int = 2
    """Optimizer steps prepared ahead by the background thread."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Text tokenizer."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_style: str = "cosine"
    """'cosine', 'linear', 'constant' or 'WSD' (warmup-stable-decay)."""
    decay_steps: Optional[int] = None
    """Steps over which lr decays; None = train.steps."""
    wsd_decay_steps: Optional[int] = None
    """WSD: length of the final decay phase."""
    wsd_decay_style: str = "linear"
    """WSD: shape of the final decay ('linear', 'cosine', 'exponential', 'minus_sqrt')."""


@dataclass
class OptimConfig:
    optimizer: Any = None
    """megatron-core OptimizerConfig fields (lr, min_lr, weight_decay, adam_beta2, clip_grad, ...)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    distributed: bool = False
    """Distributed optimizer (ZeRO-1: optimizer state sharded over DP)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to train for (the run ends at this step)."""
    seed: int = 1234
    """Seed for init, data order and RNG."""
    run_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/."""
    resume: str = "auto"
    """'auto' (newest checkpoint in run_dir if any), 'never', or a checkpoint directory."""
    micro_batch_size: int = 1
    """Packed sequences per micro-batch per rank."""
    global_batch_size: int = 8
    """Packed sequences per optimizer step over all DP ranks."""
    dtype: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    stop_after: Optional[int] = None
    """Stop (with a checkpoint) after this many steps in this invocation, e.g. to test resume."""


@dataclass
class GuardConfig:
    enabled: bool = True
    """Skip optimizer steps whose loss or gradients are non-finite (or spike)."""
    clip_value: Optional[float] = None
    """Clip each gradient element to [-v, v] before clipping by norm (optim.optimizer.clip_grad)."""
    spike_k: float = 6.0
    """A loss above median + k x 1.4826 x MAD of the recent window is a spike; 0 = off."""
    spike_window: int = 100
    """Accepted losses kept for the spike rule."""
    spike_min_history: int = 20
    """Losses needed before the spike rule applies."""
    spike_action: str = "log"
    """'log' (apply the step, count the spike) or 'skip' (skip it like a NaN)."""
    max_consecutive_skips: int = 3
    """More consecutive skips than this: roll back to the last committed checkpoint."""
    max_skips_per_window: int = 10
    """More skips than this within window_steps: roll back."""
    window_steps: int = 100
    """The window for max_skips_per_window."""
    max_rollbacks: int = 2
    """Rollbacks without a new committed checkpoint before the run is fatal (exit 3)."""


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every N steps (and at the end)."""
    dir: Optional[str] = None
    """Checkpoint directory; None = RUN_DIR/checkpoints."""
    keep_last: int = 3
    """Committed checkpoints kept (older ones are pruned)."""
    async_save: bool = False
    """Save with megatron-core's async dist_checkpointing (writes overlap training)."""


@dataclass
class LoggingConfig:
    interval: int = 1
    """Log every N steps (metrics.jsonl and console)."""
    console: bool = True
    """Print a one-line summary per logged step on rank 0."""
    wandb: bool = False
    """Also log to wandb (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "megatron-tts"
    """wandb project name."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The speech LM."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token shards and packing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Step loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Step guard: NaN/spike skipping, skip budget, rollback."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and console output."""

    # ---- derived facts, computed from the tree (no state of their own) ----
    def dp_for(self, world_size: int) -> int:
        return self.parallel.dp or world_size // (self.parallel.tp * self.parallel.pp)

    def num_microbatches(self, dp: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.train.run_dir, "checkpoints")


# --------------------------------------------------------------------------------------------
# The megatron-core configs we nest.
# --------------------------------------------------------------------------------------------

_MEGATRON_SECTIONS = {
    ("model", "transformer"): "megatron.core.transformer.TransformerConfig",
    ("parallel", "ddp"): "megatron.core.distributed.DistributedDataParallelConfig",
    ("optim", "optimizer"): "megatron.core.optimizer.OptimizerConfig",
}


def _megatron_class(path: tuple[str, str]) -> type:
    import importlib

    from megatron_tts import cpu_compat

    cpu_compat.apply()  # importing megatron.core needs the triton stand-in on CPU machines
    mod, _, cls = _MEGATRON_SECTIONS[path].rpartition(".")
    return getattr(importlib.import_module(mod), cls)


_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu"}


def _activation(name: str):
    import torch.nn.functional as F

    return getattr(F, _ACTIVATIONS[name])


# Fields of the megatron configs that this tree owns; a recipe must not set them there.
_OWNED = {
    ("model", "transformer"): {
        "tensor_model_parallel_size": "parallel.tp",
        "pipeline_model_parallel_size": "parallel.pp",
        "virtual_pipeline_model_parallel_size": "parallel.vpp",
        "sequence_parallel": "parallel.sequence_parallel",
        "params_dtype": "train.dtype",
        "bf16": "train.dtype",
        "fp16": "train.dtype",
        "pipeline_dtype": "train.dtype",
        "calculate_per_token_loss": "(fixed: every target token weighs the same)",
        "batch_p2p_comm": "parallel.backend (derived)",
    },
    ("parallel", "ddp"): {"use_distributed_optimizer": "optim.distributed"},
    ("optim", "optimizer"): {
        "use_distributed_optimizer": "optim.distributed",
        "bf16": "train.dtype",
        "fp16": "train.dtype",
        "params_dtype": "train.dtype",
    },
}


def resolve_backend(cfg: Config) -> str:
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_dtype(cfg: Config) -> str:
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def _build_megatron(path: tuple[str, str], raw: dict, cfg: Config, problems: list[str]) -> Any:
    import torch

    cls = _megatron_class(path)
    names = {f.name for f in dataclasses.fields(cls)}
    where = ".".join(path)
    kwargs: dict[str, Any] = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of {cls.__name__} fields, got {raw!r}")
        raw = {}
    for k, v in raw.items():
        if k not in names:
            problems.append(f"{where}.{k}: not a field of {cls.__name__}; check the spelling")
        elif k in _OWNED[path]:
            problems.append(f"{where}.{k}: set it through {_OWNED[path][k]} instead")
        elif k == "activation_func":
            if v not in _ACTIVATIONS:
                problems.append(f"{where}.activation_func: '{v}' unknown; use one of {sorted(_ACTIVATIONS)}")
            else:
                kwargs[k] = _activation(v)
        else:
            kwargs[k] = v
    bf16 = resolve_dtype(cfg) == "bf16"
    if path == ("model", "transformer"):
        kwargs.update(
            tensor_model_parallel_size=cfg.parallel.tp,
            pipeline_model_parallel_size=cfg.parallel.pp,
            virtual_pipeline_model_parallel_size=cfg.parallel.vpp,
            sequence_parallel=cfg.parallel.sequence_parallel,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
            # Loss = sum over target tokens / their global count, identical under any layout.
            calculate_per_token_loss=True,
            # gloo does not keep the order of a batch of sends and receives between the same
            # two ranks (pp=2 interleaved: next == prev): messages land in the wrong buffers.
            batch_p2p_comm=resolve_backend(cfg) == "nccl",
        )
    elif path == ("parallel", "ddp"):
        kwargs["use_distributed_optimizer"] = cfg.optim.distributed
    else:
        kwargs.update(use_distributed_optimizer=cfg.optim.distributed, bf16=bf16,
                      params_dtype=torch.bfloat16 if bf16 else torch.float32)
    return cls, kwargs


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError([f"override '{item}': write it as dotted.key=value"], "command line")
        key, _, value = item.partition("=")
        out.append((key.strip(), yaml.safe_load(value) if value != "" else None))
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([f"override '{key}': '{p}' is a value, not a section"], "command line")
        node = nxt
    node[parts[-1]] = value


def _coerce(value: Any, typ: Any, where: str, problems: list[str]) -> Any:
    origin = get_origin(typ)
    if origin is Union:
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, problems)
    if typ is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, get_args(typ)[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):
        return _build_section(typ, value, where, problems)
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        problems.append(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _build_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {raw!r}")
        raw = {}
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            problems.append(f"{where}.{k}: unknown key; valid keys are {', '.join(names)}" if where else
                            f"{k}: unknown section; valid sections are {', '.join(names)}")
    kwargs = {}
    for k, v in raw.items():
        if k in names:
            n = len(problems)
            value = _coerce(v, hints[k], f"{where}.{k}" if where else k, problems)
            # A wrongly typed value is reported and replaced by its default, so that the checks
            # after it still run (and list their own problems) instead of crashing on it.
            if len(problems) == n or dataclasses.is_dataclass(hints[k]):
                kwargs[k] = value
    return cls(**kwargs)


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a recipe, apply overrides, validate, and build the typed tree (raises ConfigError)."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError([f"recipe {path} does not exist; see configs/ for the recipes"], path)
        except yaml.YAMLError as e:
            raise ConfigError([f"recipe {path} is not valid YAML: {e}"], path)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    return build_config(raw, source=path or "config")


def build_config(raw: dict, source: str = "config") -> Config:
    problems: list[str] = []
    cfg = _build_section(Config, raw, "", problems)
    if cfg.model.transformer is None:
        problems.append("model.transformer: missing; give at least num_layers, hidden_size, num_attention_heads")
    _validate(cfg, problems)
    # The megatron sections' keys are checked with ours, so that one error lists both.
    built = {}
    for path in _MEGATRON_SECTIONS:
        section = getattr(cfg, path[0])
        raw_section = getattr(section, path[1])
        built[path] = _build_megatron(path, {} if raw_section is None else raw_section, cfg, problems)
    # Only a tree free of problems is handed to megatron's constructors, whose
    # __post_init__ asserts would otherwise report one problem at a time.
    if problems:
        raise ConfigError(problems, source)
    for path, (cls, kwargs) in built.items():
        try:
            obj = cls(**kwargs)
        except (AssertionError, ValueError, TypeError) as e:
            raise ConfigError([f"{'.'.join(path)}: megatron-core rejected it: {e}"], source) from e
        # Remember what the recipe set: the dump writes those back, not the values megatron
        # derived from them (kv_channels, ...), which would go stale under a later override.
        object.__setattr__(obj, _USER_FIELDS, tuple(k for k in kwargs if k not in _OWNED[path]))
        setattr(getattr(cfg, path[0]), path[1], obj)
    return cfg


def _validate(cfg: Config, problems: list[str]) -> None:
    # (a transformer section that is not a mapping is reported by _build_megatron)
    t = cfg.model.transformer if isinstance(cfg.model.transformer, dict) else {}
    for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups"):
        if t.get(k) is not None and (not isinstance(t[k], int) or isinstance(t[k], bool)):
            problems.append(f"model.transformer.{k}: expected int, got {t[k]!r}")
            t = {**t, k: None}  # the checks below skip it
    p, tr = cfg.parallel, cfg.train
    for name, v in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("train.steps", tr.steps),
                    ("train.micro_batch_size", tr.micro_batch_size),
                    ("train.global_batch_size", tr.global_batch_size), ("data.seq_len", cfg.data.seq_len),
                    ("checkpoint.interval", cfg.checkpoint.interval), ("logging.interval", cfg.logging.interval)):
        if isinstance(v, int) and v < 1:
            problems.append(f"{name}: must be >= 1, got {v}")
    if p.dp is not None and p.dp < 1:
        problems.append(f"parallel.dp: must be >= 1 or omitted, got {p.dp}")
    heads = t.get("num_attention_heads")
    groups = t.get("num_query_groups") or heads
    layers = t.get("num_layers")
    for k in ("num_layers", "hidden_size", "num_attention_heads"):
        if k not in t and isinstance(cfg.model.transformer, dict):
            problems.append(f"model.transformer.{k}: missing; every recipe must set it")
    if heads and p.tp and heads % p.tp:
        problems.append(f"model.transformer.num_attention_heads={heads} is not divisible by parallel.tp={p.tp}; "
                        f"choose tp from {_divisors(heads)}")
    if groups and p.tp and groups % p.tp:
        problems.append(f"model.transformer.num_query_groups={groups} is not divisible by parallel.tp={p.tp}; "
                        f"choose tp from {_divisors(groups)}")
    if heads and groups and heads % groups:
        problems.append(f"model.transformer.num_attention_heads={heads} is not divisible by num_query_groups={groups}")
    if layers and p.pp:
        stages = p.pp * (p.vpp or 1)
        if layers % stages:
            problems.append(f"model.transformer.num_layers={layers} is not divisible by parallel.pp*vpp={stages}; "
                            f"choose pp*vpp from {_divisors(layers)}")
    if p.vpp is not None and p.pp < 2:
        problems.append("parallel.vpp: interleaved pipelining needs parallel.pp >= 2; unset vpp or raise pp")
    if p.sequence_parallel and p.tp < 2:
        problems.append("parallel.sequence_parallel: needs parallel.tp >= 2; set it false or raise tp")
    if p.backend not in ("auto", "nccl", "gloo"):
        problems.append(f"parallel.backend: '{p.backend}' unknown; use auto, nccl or gloo")
    if p.dp is not None and p.dp >= 1 and tr.micro_batch_size >= 1 and tr.global_batch_size % (tr.micro_batch_size * p.dp):
        problems.append(_batch_problem(cfg, p.dp))
    v = cfg.model.vocab
    from data_pipeline.layouts import LLASA_SPECIAL_TOKENS

    specials = v.special_tokens if v.special_tokens is not None else LLASA_SPECIAL_TOKENS
    vocab = v.text_vocab_size + len(specials) + v.n_codebooks * v.codebook_size
    multiple = 128 * max(p.tp, 1)
    if v.padded_size is not None:
        if v.padded_size < vocab:
            problems.append(f"model.vocab.padded_size={v.padded_size} is smaller than the vocab ({vocab}); "
                            f"use {math.ceil(vocab / multiple) * multiple}")
        elif v.padded_size % multiple:
            problems.append(f"model.vocab.padded_size={v.padded_size} is not a multiple of 128 x tp = {multiple}; "
                            f"use {math.ceil(v.padded_size / multiple) * multiple} or omit it")
    if cfg.model.layout not in ("llasa", "flattened"):
        problems.append(f"model.layout: '{cfg.model.layout}' unknown; use llasa or flattened")
    if cfg.model.layout == "llasa" and v.n_codebooks != 1:
        problems.append("model.vocab.n_codebooks: the llasa layout takes 1 codebook; use model.layout=flattened")
    from data_pipeline.layouts import SEGMENTS

    bad = [s for s in cfg.model.loss_segments if s not in SEGMENTS]
    if bad:
        problems.append(f"model.loss_segments: {bad} unknown; choose from {list(SEGMENTS)}")
    if cfg.model.layer_spec not in ("auto", "te", "local"):
        problems.append(f"model.layer_spec: '{cfg.model.layer_spec}' unknown; use auto, te or local")
    g = cfg.guard
    if g.spike_action not in ("log", "skip"):
        problems.append(f"guard.spike_action: '{g.spike_action}' unknown; use log or skip")
    if g.clip_value is not None and g.clip_value <= 0:
        problems.append(f"guard.clip_value={g.clip_value}: must be > 0 or omitted")
    for name in ("spike_window", "window_steps"):
        if getattr(g, name) < 1:
            problems.append(f"guard.{name}: must be >= 1")
    if cfg.model.core_attention not in ("sdpa", "megatron"):
        problems.append(f"model.core_attention: '{cfg.model.core_attention}' unknown; use sdpa or megatron")
    if cfg.model.init not in ("layout_invariant", "megatron"):
        problems.append(f"model.init: '{cfg.model.init}' unknown; use layout_invariant or megatron")
    if tr.dtype not in ("auto", "bf16", "fp32"):
        problems.append(f"train.dtype: '{tr.dtype}' unknown; use auto, bf16 or fp32")
    if cfg.data.tokenizer.kind not in ("byte", "hf"):
        problems.append(f"data.tokenizer.kind: '{cfg.data.tokenizer.kind}' unknown; use byte or hf")
    if cfg.data.tokenizer.kind == "hf" and not cfg.data.tokenizer.path:
        problems.append("data.tokenizer.path: required when data.tokenizer.kind=hf (a local tokenizer.json)")
    if cfg.data.tokenizer.kind == "byte" and v.text_vocab_size != 256:
        problems.append(f"model.vocab.text_vocab_size={v.text_vocab_size} but the byte tokenizer has 256 ids; "
                        "set it to 256 or use data.tokenizer.kind=hf")
    if not cfg.data.paths:
        problems.append("data.paths: empty; give at least one dataset dir (e.g. data/demo)")
    s = cfg.optim.schedule
    if s.decay_style not in ("cosine", "linear", "constant", "WSD", "inverse-square-root"):
        problems.append(f"optim.schedule.decay_style: '{s.decay_style}' unknown; use cosine, linear, constant or WSD")
    if s.decay_style == "WSD" and not s.wsd_decay_steps:
        problems.append("optim.schedule.wsd_decay_steps: required with decay_style=WSD")
    if tr.resume not in ("auto", "never") and not isinstance(tr.resume, str):
        problems.append("train.resume: use auto, never, or a checkpoint directory")


def _batch_problem(cfg: Config, dp: int) -> str:
    tr = cfg.train
    unit = tr.micro_batch_size * dp
    below, above = max(unit, tr.global_batch_size // unit * unit), math.ceil(tr.global_batch_size / unit) * unit
    return (f"train.global_batch_size={tr.global_batch_size} is not divisible by micro_batch_size x dp = "
            f"{tr.micro_batch_size} x {dp} = {unit}; use {below}" + ("" if below == above else f" or {above}"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the world size (known only at launch); raises ConfigError."""
    p = cfg.parallel
    problems = []
    mp = p.tp * p.pp
    if world_size % mp:
        problems.append(f"world size {world_size} is not divisible by tp x pp = {mp}; "
                        f"launch a multiple of {mp} processes or change parallel.tp/pp")
    else:
        dp = world_size // mp
        if p.dp is not None and p.dp != dp:
            problems.append(f"parallel.dp={p.dp} but world size {world_size} / (tp x pp) = {dp}; omit parallel.dp")
        elif cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp):
            problems.append(_batch_problem(cfg, dp))
    if problems:
        raise ConfigError(problems, "launch layout")


def padded_vocab_size(cfg: Config) -> int:
    v = cfg.model.vocab
    if v.padded_size is not None:
        return v.padded_size
    multiple = 128 * max(cfg.parallel.tp, 8)
    return math.ceil(vocab_layout(cfg).vocab_size / multiple) * multiple


def vocab_layout(cfg: Config):
    from data_pipeline.layouts import LLASA_SPECIAL_TOKENS, VocabLayout

    v = cfg.model.vocab
    return VocabLayout(text_vocab_size=v.text_vocab_size,
                       special_tokens=list(v.special_tokens if v.special_tokens is not None else LLASA_SPECIAL_TOKENS),
                       n_codebooks=v.n_codebooks, codebook_size=v.codebook_size)


# --------------------------------------------------------------------------------------------
# Saving the resolved config.
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    import torch

    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


_USER_FIELDS = "_megatron_tts_user_fields"


def to_dict(obj: Any, owned: dict = None) -> dict:
    """Our sections in full; nested megatron configs as the fields the recipe set (else their
    non-default fields), without the fields our tree owns, so the dump loads back as a recipe."""
    out = {}
    is_megatron = type(obj).__module__.startswith("megatron.")
    user = getattr(obj, _USER_FIELDS, None) if is_megatron else None
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if user is not None:
            if f.name in user:
                out[f.name] = _plain(value)
            continue
        if dataclasses.is_dataclass(value) and type(value).__module__.startswith("megatron."):
            path = next(p for p in _MEGATRON_SECTIONS if p[1] == f.name)
            out[f.name] = to_dict(value, _OWNED[path])
            continue
        if is_megatron:
            if f.name in (owned or {}) or (callable(value) and f.name != "activation_func"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            try:
                if value is default or value == default:
                    continue
            except Exception:  # tensors and other types without a plain ==
                pass
            if not f.init:
                continue
        out[f.name] = _plain(value)
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
