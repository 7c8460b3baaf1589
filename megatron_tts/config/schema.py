"""The typed config tree: our sections as dataclasses, a docstring per field.

megatron-core's TransformerConfig, DistributedDataParallelConfig and OptimizerConfig are nested
as they are (``model.transformer``, ``parallel.ddp``, ``optim.optimizer``; built by
megatron_tts.config.load); nothing here re-declares their fields.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with its fix."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")




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
    mask_padded_vocab: bool = True
    """Keep the padding rows of the vocabulary (there so that it splits evenly over TP) out of
    the softmax: the loss and sampling cover the real vocabulary, as in an exported HF model."""
    framing: str = "plain"
    """How a sample is framed: 'plain' (TEXT_UNDERSTANDING_START text ... SPEECH_GENERATION_END)
    or 'llasa_chat' (LLaSA's training sequences: the base model's chat template, user turn
    'Convert the text to speech:<text>', assistant turn <speech>; data.tokenizer must be an HF
    tokenizer whose tokenizer_config.json holds the chat template)."""
    chat_date: str = "26 Jul 2024"
    """The date_string the chat template renders (fixed, so that sequences are deterministic;
    Llama-3.x's own default)."""
    init: str = "layout_invariant"
    """'layout_invariant': every weight is a function of (seed, name), identical under any
    TP/PP layout; 'megatron': megatron's per-rank init (faster to build at scale)."""


@dataclass
class OuterOptimizerConfig:
    kind: str = "nesterov"
    """The outer step on the averaged parameter delta (anchor - params): 'nesterov' (DiLoCo's
    Nesterov momentum), 'sgd' (heavy-ball momentum) or 'average' (params = anchor - lr x delta:
    with lr=1 plain parameter averaging)."""
    lr: float = 0.7
    """Outer learning rate (DiLoCo: 0.7 with nesterov; 1.0 with average = plain averaging)."""
    momentum: float = 0.9
    """Outer momentum for nesterov/sgd (ignored by average)."""


@dataclass
class HierarchicalConfig:
    enabled: bool = False
    """Synchronise gradients within a node every step and parameters across nodes every
    outer_interval steps (local SGD / DiLoCo). TP and PP are untouched; only DP is split."""
    inner: Any = "node"
    """The inner (every-step) DP group: 'node' = the DP ranks on one node (LOCAL_WORLD_SIZE / tp:
    megatron orders ranks TP-fastest, then DP), or an int: that many consecutive DP ranks."""
    outer_interval: int = 8
    """Applied optimizer steps between outer synchronisations (k). Guard-skipped steps do not count."""
    outer_optimizer: OuterOptimizerConfig = field(default_factory=OuterOptimizerConfig)
    """How the averaged parameter delta is applied to the anchor."""


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
    hierarchical: HierarchicalConfig = field(default_factory=HierarchicalConfig)
    """Hierarchical DP: every-step gradient sync within a node, outer parameter sync across nodes."""


@dataclass
class TokenizerConfig:
    kind: str = "byte"
    """'byte' (ships with the project) or 'hf' (a local tokenizer.json; never downloaded)."""
    path: Optional[str] = None
    """Local path of the HF tokenizer (file or directory) when kind = 'hf'."""


@dataclass
class SourceConfig:
    paths: list[str] = field(default_factory=list)
    """Dataset dirs or index.json URLs of this source (local paths or s3://)."""
    weight: float = 1.0
    """Share of the training tokens drawn from this source (weights are normalised over the
    sources; 0 pauses it). May change on resume: a new stage, each source continues where it was."""
    name: Optional[str] = None
    """Name in metrics (loss_by_source, audio_hours_by_source) and in the loader state; default:
    its datasets' names joined by '+'. A resume matches sources by name."""


@dataclass
class DataConfig:
    paths: Optional[list[str]] = None
    """Dataset dirs or index.json URLs (local paths or s3://), read as one unweighted stream
    (their natural proportions). None: data/demo, unless data.sources is given."""
    sources: Optional[list[SourceConfig]] = None
    """Instead of data.paths: weighted sources [{paths, weight, name}], blended by tokens, each
    with its own epochs (data_pipeline/mixing.py)."""
    sample_order: str = "shuffle"
    """Order of the packs within a packing window: 'shuffle' (seeded) or 'duration' (shortest
    utterances first: a curriculum, as VALL-E's sample_order=duration)."""
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
    codec: Optional[dict] = None
    """The codec the datasets must have been tokenized with: any of name, version, sample_rate,
    frame_rate, n_q, codebook_size, checkpoint_sha256 (as in a dataset's index.json, e.g.
    {name: xcodec2, checkpoint_sha256: ...}); a dataset differing in a given field stops the run
    (exit 3). None: not checked."""
    valid_paths: list[str] = field(default_factory=list)
    """Validation datasets (eval.interval); a sample key found in the training data too is refused."""


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
    init_from: Optional[str] = None
    """Start a new run from pretrained weights: 'hf:/path/to/model' (a local Hugging Face Llama:
    config.json, safetensors, tokenizer). Applies only when the run has no checkpoint to resume."""
    reset_data: bool = False
    """A new training stage: resume the model, optimizer and schedule but restart the data stream
    (needed when seq_len, the datasets or the data order changed; refused otherwise)."""
    lock_lease_s: float = 300.0
    """The run directory lock's lease: rank 0 renews it every lease/4 s; another job takes over a
    lock whose holder is gone (same host) or has not renewed it for this long."""


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
class EvalConfig:
    interval: int = 0
    """Evaluate the validation data every N steps (and at the last step); 0 = off."""
    batches: int = 4
    """Global batches (of train.global_batch_size packed sequences) per evaluation."""


@dataclass
class SamplesConfig:
    interval: int = 0
    """Every N steps, sample the prompts from the newest committed checkpoint in a side process
    (CPU, niced: training never waits for it) into RUN_DIR/samples/step_XXXXXXXX/; 0 = off."""
    prompts: list[str] = field(default_factory=lambda: ["Hello, this is a test of the speech model."])
    """Texts to speak."""
    max_tokens: int = 500
    """Speech tokens sampled at most per prompt."""
    greedy: bool = True
    """Greedy decoding (comparable across steps); false: temperature sampling, seeded."""
    temperature: float = 0.8
    """Sampling temperature when not greedy."""
    seed: int = 0
    """Seed of the sampler (prompt i uses seed + i)."""
    codec: Optional[str] = None
    """Codec to decode with; None = the one recorded in training (the dataset's)."""
    codec_path: Optional[str] = None
    """The codec's weights; None = the first training dataset (where the demo codec keeps them)."""
    timeout_s: float = 900.0
    """A side process running longer is killed and counted as a failure (never fatal)."""


@dataclass
class AutotuneConfig:
    """The start-up sweep behind ``train.micro_batch_size=auto`` and ``parallel.ddp.bucket_size=auto``
    (megatron_tts.autotune); ignored when neither is auto."""

    micro_batch_sizes: Optional[list[int]] = None
    """Micro-batch candidates; None = 1, 2, 4, 8, 16 (those dividing global_batch_size / dp). The
    global batch stays fixed: gradient accumulation absorbs the micro-batch size."""
    bucket_sizes: Optional[list[Any]] = None
    """DDP bucket candidates, in gradient elements (an int) or megabytes of gradient ('25MB');
    None = 10M, 40M (megatron-core's default) and 100M elements."""
    steps: int = 3
    """Timed training steps per candidate (their median, max over ranks, is its step time)."""
    warmup_steps: int = 1
    """Untimed steps per candidate first (allocator, communicators, lazy init)."""
    budget_s: float = 300.0
    """Stop starting candidates once the sweep has run this long, and pick among those measured
    (the first candidate always runs)."""
    headroom: float = 0.1
    """Fraction of the memory kept free: a candidate whose peak exceeds (1 - headroom) x the memory
    available to this rank (GPU: the device's; CPU: RSS + available RAM / local ranks) is rejected,
    and a larger micro-batch predicted to exceed it is not run."""


# Config fields that accept 'auto' (resolved by the start-up sweep, megatron_tts.autotune).
AUTO_FIELDS = ("train.micro_batch_size", "parallel.ddp.bucket_size")
_AUTO_ATTR = "_megatron_tts_auto"


def auto_fields(cfg: "Config") -> tuple[str, ...]:
    """The AUTO_FIELDS the recipe or overrides set to 'auto' (the loader records them)."""
    return getattr(cfg, _AUTO_ATTR, ())


def mark_auto(cfg: "Config", fields: tuple[str, ...]) -> None:
    object.__setattr__(cfg, _AUTO_ATTR, tuple(fields))


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation loss on held-out data."""
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """Audio samples of the model during training."""
    autotune: AutotuneConfig = field(default_factory=AutotuneConfig)
    """The start-up sweep that resolves micro_batch_size=auto and ddp.bucket_size=auto."""

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
        return 60.0 * math.ceil((watchdog_longest(self.watchdog) + self.watchdog.exit_grace_s + 60) / 60)



def watchdog_longest(w: WatchdogConfig) -> float:
    """The longest no-progress window of the hang watchdog."""
    return max(w.min_timeout_s, w.first_step_timeout_s, w.checkpoint_timeout_s)


__all__ = ["ConfigError", "VocabConfig", "ModelConfig", "OuterOptimizerConfig", "HierarchicalConfig",
           "ParallelConfig", "TokenizerConfig", "DataConfig",
           "ScheduleConfig", "OptimConfig", "TrainConfig", "GuardConfig", "CheckpointConfig", "LoggingConfig",
           "WatchdogConfig", "MonitoringConfig", "AlertsConfig", "ProfilingConfig", "EvalConfig", "SamplesConfig",
           "AutotuneConfig", "AUTO_FIELDS", "auto_fields", "mark_auto", "Config", "watchdog_longest"]
