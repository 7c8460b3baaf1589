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
    timeout_s: Optional[float] = None
    """Collective timeout in seconds (gloo/NCCL); None = derived from the watchdog: its longest
    window + watchdog.exit_grace_s + 60 s, rounded up to whole minutes (600 s with the defaults;
    600 s when the watchdog is off). It must outlast the watchdog, so that a hang is reported by
    the watchdog naming the stuck rank, not by an anonymous collective timeout."""
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
    """Newest committed checkpoints kept; older ones are pruned (>= 1)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of N, forever (0 = none)."""
    async_save: bool = False
    """Write through megatron-core's async dist_checkpointing (a forked writer per save): the
    loop blocks only to plan and fork; the commit runs at a later step once every rank is done."""
    mirror: Optional[str] = None
    """Copy each committed checkpoint to this URL (s3://bucket/prefix, through s3fs) in the
    background, COMMITTED last; failures alert and never stop training. None = no mirror."""
    mirror_retries: int = 3
    """Retries per mirrored checkpoint (exponential backoff from 1 s) before an ALERT."""


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
    ledger: bool = False
    """Write RUN_DIR/ledger/rank_XXXXX.jsonl: the sample keys each DP rank trained on per step
    (an audit trail that no sample was lost or repeated)."""
    wandb_mode: str = "offline"
    """'offline' (no network; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later) or 'online'
    (opt-in: needs WANDB_API_KEY and network; without network wandb hangs ~100 s, then fails)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to RUN_DIR/tensorboard (torch.utils.tensorboard)."""


@dataclass
class WatchdogConfig:
    enabled: bool = True
    """Detect hangs: a rank without progress dumps every thread's stack to RUN_DIR/hang/ and
    exits 75 (requeue)."""
    min_timeout_s: float = 120.0
    """Shortest no-progress window of a steady step (the floor under k x p99)."""
    k: float = 10.0
    """Steady window = max(min_timeout_s, k x the p99 of the recent step times)."""
    window_steps: int = 100
    """Recent steps whose durations give the p99."""
    first_step_timeout_s: float = 480.0
    """Window until this process has completed a step (warm-up, lazy communicator set-up)."""
    checkpoint_timeout_s: float = 480.0
    """Window for resume loading, checkpoint saves and shutdown."""
    exit_grace_s: float = 15.0
    """After its dump, a rank that detected a hang waits this long before exiting, so its peers'
    watchdogs fire and dump as well (they stall at most about one step later)."""


@dataclass
class MonitoringConfig:
    phase_timers: bool = True
    """Time each phase of a step into the record's phase_s (data, forward_backward, grad_sync,
    optimizer, checkpoint, logging); no extra host sync (docs/monitoring.md)."""
    nvtx: bool = True
    """NVTX ranges around each step and phase, for Nsight Systems; a no-op without CUDA."""
    memory: bool = True
    """Record mem per logged step: CUDA allocated/reserved/peak GB and the process RSS."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one GPU for MFU; None = from the GPU name for bf16 (H100 SXM 989,
    H200 989, A100 312, ...). MFU is null on CPU, with fp32, or on an unknown GPU unless set."""
    gpu_stats: bool = True
    """Sample utilization, memory, power, temperature, SM clock, throttle reasons and ECC errors of
    the logging rank's node through NVML on a background thread ('gpu' events). Without NVML: one
    log line, nothing else."""
    gpu_stats_interval_s: float = 30.0
    """Seconds between NVML samples (a 'gpu' event is written at the first logged step after each)."""
    straggler_interval: int = 50
    """Every N steps, all-gather each rank's mean busy step time (one small collective) and log
    min/median/max ('rank_step_times' events); 0 = off."""
    straggler_ratio: float = 1.1
    """A rank whose busy time exceeds this multiple of the median is slow in that window."""
    straggler_windows: int = 3
    """Consecutive slow windows before a rank is flagged as a straggler (event + ALERT)."""


@dataclass
class AlertsConfig:
    enabled: bool = True
    """Log `ALERT <kind>: ...` and write an 'alert' event on a stall, a non-finite or skipped
    step, a straggler, a throughput drop or a failed checkpoint (logging rank)."""
    stall_s: float = 60.0
    """A stall: no completed step for max(stall_s, 5 x the median recent step time) seconds
    (checkpoint saves and loads excluded). Keep it under watchdog.min_timeout_s, which ends a
    hung process."""
    throughput_drop: float = 0.10
    """Alert when the median tokens/s of the last throughput_recent steps falls more than this
    fraction below the median of the throughput_window steps before them."""
    throughput_window: int = 50
    """Trailing steps whose median tokens/s is the baseline."""
    throughput_recent: int = 5
    """Most recent steps compared with the baseline (a median: one slow step is not a drop)."""
    command: Optional[str] = None
    """Run this command (split like a shell line, not run by a shell) for each alert, the alert's
    JSON record on its stdin, off the training thread; failures are counted, never fatal."""
    webhook: Optional[str] = None
    """POST each alert's JSON record to this http(s) URL, off the training thread; failures are
    counted, never fatal."""
    timeout_s: float = 10.0
    """Time limit of one alert command or webhook call."""


@dataclass
class ProfilingConfig:
    nsys_steps: Optional[list[int]] = None
    """[start, stop): open an Nsight Systems capture range (torch.cuda.profiler.start) before step
    start and close it after step stop-1, on profiling.ranks. Run under `nsys profile
    --capture-range=cudaProfilerApi --capture-range-end=stop`. Needs CUDA."""
    torch_steps: Optional[list[int]] = None
    """[start, stop): torch.profiler trace of those steps on profiling.ranks, written as a Chrome
    trace to RUN_DIR/profile/torch_rankR_stepsA-B.json."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """Global ranks that profile (configured windows and the trigger file)."""
    trigger_file: str = "PROFILE"
    """Touching RUN_DIR/<trigger_file> (a new mtime) traces the next trigger_steps steps with the
    torch profiler on profiling.ranks, without a restart; SIGUSR2 does the same on the worker
    that receives it."""
    trigger_steps: int = 5
    """Steps traced per trigger."""
    trigger_check_s: float = 2.0
    """Seconds between checks of the trigger file (one stat; 0 = every step)."""


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
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """Hang detection."""
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    """Phase timers, throughput/MFU, memory, GPU stats, straggler detection."""
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    """Alerts: log lines, metrics events, optional command/webhook hooks."""
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    """Nsight Systems capture windows, torch.profiler traces, runtime triggers."""

    # ---- derived facts, computed from the tree (no state of their own) ----
    def dp_for(self, world_size: int) -> int:
        return self.parallel.dp or world_size // (self.parallel.tp * self.parallel.pp)

    def num_microbatches(self, dp: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.train.run_dir, "checkpoints")

    @property
    def collective_timeout_s(self) -> float:
        """parallel.timeout_s, or derived so that it outlasts every watchdog window (see there)."""
        if self.parallel.timeout_s is not None:
            return self.parallel.timeout_s
        if not self.watchdog.enabled:
            return 600.0
        return 60.0 * math.ceil((_watchdog_longest(self.watchdog) + self.watchdog.exit_grace_s + 60) / 60)


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
    ddp = p.ddp if isinstance(p.ddp, dict) else {}
    if ddp.get("average_in_collective") is True:
        # the loss is a per-token sum divided by the global token count (calculate_per_token_loss),
        # and megatron's DistributedDataParallel asserts gradients are summed, not averaged
        problems.append("parallel.ddp.average_in_collective=true conflicts with the per-token loss "
                        "(megatron's DDP asserts at wrap time); set it false or remove it")
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
    _validate_watchdog(cfg, problems)
    _validate_checkpoint(cfg, problems)
    _validate_monitoring(cfg, problems)
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


def _watchdog_longest(w: WatchdogConfig) -> float:
    return max(w.min_timeout_s, w.first_step_timeout_s, w.checkpoint_timeout_s)


def _validate_checkpoint(cfg: Config, problems: list[str]) -> None:
    c = cfg.checkpoint
    if isinstance(c.keep_last, int) and c.keep_last < 1:
        problems.append(f"checkpoint.keep_last: must be >= 1 (the newest committed checkpoint is always kept), "
                        f"got {c.keep_last}")
    if isinstance(c.keep_every, int) and c.keep_every < 0:
        problems.append(f"checkpoint.keep_every: must be >= 0 (0 = none), got {c.keep_every}")
    if isinstance(c.mirror_retries, int) and c.mirror_retries < 0:
        problems.append(f"checkpoint.mirror_retries: must be >= 0, got {c.mirror_retries}")
    if c.mirror is not None and not (isinstance(c.mirror, str) and c.mirror.startswith("s3://")
                                     and len(c.mirror.rstrip("/")) > len("s3://")):
        problems.append(f"checkpoint.mirror: expected s3://bucket[/prefix], got {c.mirror!r}")


def _validate_watchdog(cfg: Config, problems: list[str]) -> None:
    w = cfg.watchdog
    bad = False
    for name in ("min_timeout_s", "first_step_timeout_s", "checkpoint_timeout_s"):
        v = getattr(w, name)
        if isinstance(v, (int, float)) and v <= 0:
            problems.append(f"watchdog.{name}: must be > 0 seconds, got {v}")
            bad = True
    if isinstance(w.k, (int, float)) and w.k < 1:
        problems.append(f"watchdog.k: must be >= 1 (a multiple of the p99 step time), got {w.k}")
    if isinstance(w.window_steps, int) and w.window_steps < 1:
        problems.append(f"watchdog.window_steps: must be >= 1, got {w.window_steps}")
    if isinstance(w.exit_grace_s, (int, float)) and w.exit_grace_s < 0:
        problems.append(f"watchdog.exit_grace_s: must be >= 0, got {w.exit_grace_s}")
        bad = True
    t = cfg.parallel.timeout_s
    if w.enabled and not bad and isinstance(t, (int, float)) and all(
            isinstance(getattr(w, n), (int, float)) for n in ("min_timeout_s", "first_step_timeout_s",
                                                              "checkpoint_timeout_s", "exit_grace_s")):
        need = _watchdog_longest(w) + w.exit_grace_s + 10
        if t < need:
            problems.append(f"parallel.timeout_s={t:g} is shorter than the watchdog's longest window "
                            f"({_watchdog_longest(w):g} s) + watchdog.exit_grace_s ({w.exit_grace_s:g} s) + 10 s: "
                            f"a hang would surface as an anonymous collective timeout instead of naming the "
                            f"stuck rank; set it >= {math.ceil(need)}, omit it (derived), or lower the watchdog's "
                            f"timeouts")


def _validate_monitoring(cfg: Config, problems: list[str]) -> None:
    m, a, pr = cfg.monitoring, cfg.alerts, cfg.profiling

    def positive(name: str, v: Any, strict: bool = True) -> None:
        if isinstance(v, (int, float)) and (v <= 0 if strict else v < 0):
            problems.append(f"{name}: must be {'>' if strict else '>='} 0, got {v}")

    if cfg.logging.wandb_mode not in ("offline", "online"):
        problems.append(f"logging.wandb_mode: '{cfg.logging.wandb_mode}' unknown; use offline or online")
    positive("monitoring.gpu_stats_interval_s", m.gpu_stats_interval_s)
    positive("monitoring.straggler_interval", m.straggler_interval, strict=False)
    if m.peak_tflops is not None:
        positive("monitoring.peak_tflops", m.peak_tflops)
    if isinstance(m.straggler_ratio, (int, float)) and m.straggler_ratio <= 1:
        problems.append(f"monitoring.straggler_ratio: must be > 1 (a multiple of the median), got {m.straggler_ratio}")
    if isinstance(m.straggler_windows, int) and m.straggler_windows < 1:
        problems.append(f"monitoring.straggler_windows: must be >= 1, got {m.straggler_windows}")
    positive("alerts.stall_s", a.stall_s)
    positive("alerts.timeout_s", a.timeout_s)
    if isinstance(a.throughput_drop, (int, float)) and not 0 < a.throughput_drop < 1:
        problems.append(f"alerts.throughput_drop: a fraction in (0, 1), got {a.throughput_drop}")
    if isinstance(a.throughput_recent, int) and a.throughput_recent < 1:
        problems.append(f"alerts.throughput_recent: must be >= 1, got {a.throughput_recent}")
    elif isinstance(a.throughput_window, int) and isinstance(a.throughput_recent, int) \
            and a.throughput_window < a.throughput_recent:
        problems.append(f"alerts.throughput_window={a.throughput_window} must be >= alerts.throughput_recent="
                        f"{a.throughput_recent}")
    if a.command is not None:
        import shlex

        try:
            if not shlex.split(a.command):
                problems.append("alerts.command: empty; omit it or give a command line")
        except ValueError as e:
            problems.append(f"alerts.command: cannot be split like a shell line ({e}): {a.command!r}")
    if a.webhook is not None and not (isinstance(a.webhook, str) and a.webhook.startswith(("http://", "https://"))):
        problems.append(f"alerts.webhook: expected an http:// or https:// URL, got {a.webhook!r}")
    windows = {}
    for name in ("nsys_steps", "torch_steps"):
        w = getattr(pr, name)
        if w is None:
            continue
        if len(w) != 2 or not all(isinstance(x, int) for x in w) or not 1 <= w[0] < w[1]:
            problems.append(f"profiling.{name}: expected [start, stop) with 1 <= start < stop, got {w!r}")
        else:
            windows[name] = w
    if "nsys_steps" in windows and "torch_steps" in windows:
        (a0, b0), (a1, b1) = windows["nsys_steps"], windows["torch_steps"]
        if a0 < b1 and a1 < b0:
            problems.append(f"profiling.nsys_steps={windows['nsys_steps']} and profiling.torch_steps="
                            f"{windows['torch_steps']} overlap; profile one way at a time")
    if pr.nsys_steps is not None:
        import torch

        if not torch.cuda.is_available():
            problems.append("profiling.nsys_steps: an Nsight Systems capture range needs CUDA "
                            "(torch.cuda.profiler.start), and this machine has none; on CPU use "
                            "profiling.torch_steps=[start,stop] for a torch.profiler trace")
    if any(not isinstance(r, int) or r < 0 for r in pr.ranks):
        problems.append(f"profiling.ranks: expected global ranks >= 0, got {pr.ranks!r}")
    if isinstance(pr.trigger_steps, int) and pr.trigger_steps < 1:
        problems.append(f"profiling.trigger_steps: must be >= 1, got {pr.trigger_steps}")
    positive("profiling.trigger_check_s", pr.trigger_check_s, strict=False)
    if not pr.trigger_file or os.sep in pr.trigger_file:
        problems.append(f"profiling.trigger_file: a file name inside RUN_DIR, got {pr.trigger_file!r}")


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
    beyond = [r for r in cfg.profiling.ranks if r >= world_size]
    if beyond:
        problems.append(f"profiling.ranks: {beyond} not in this world of {world_size} process(es); "
                        f"choose ranks below {world_size}")
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
