"""Validation of the config tree (every problem at once, each with its fix) and of a launch
layout: ``layout_problems(cfg, world_size)`` is the one check of a TP x PP x DP layout, run by
training at launch (megatron_tts.parallel) and by the layout planner (launch.plan).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from data_pipeline.layouts import CHAT_LOSS_SEGMENTS, SEGMENTS
from megatron_tts.config.derived import check_padded_vocab, hierarchical_inner_size, padded_vocab_size
from megatron_tts.config.schema import Config, ConfigError, auto_fields, watchdog_longest

def validate(cfg: Config, problems: list[str]) -> None:
    """Append every problem of the tree (without the world size) to ``problems``."""
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
    problems += check_padded_vocab(cfg)
    if cfg.model.layout not in ("llasa", "flattened"):
        problems.append(f"model.layout: '{cfg.model.layout}' unknown; use llasa or flattened")
    if cfg.model.layout == "llasa" and v.n_codebooks != 1:
        problems.append("model.vocab.n_codebooks: the llasa layout takes 1 codebook; use model.layout=flattened")
    bad = [s for s in cfg.model.loss_segments if s not in SEGMENTS]
    if bad:
        problems.append(f"model.loss_segments: {bad} unknown; choose from {list(SEGMENTS)}")
    if cfg.model.layer_spec not in ("auto", "te", "local"):
        problems.append(f"model.layer_spec: '{cfg.model.layer_spec}' unknown; use auto, te or local")
    _validate_watchdog(cfg, problems)
    _validate_checkpoint(cfg, problems)
    _validate_hierarchical(cfg, problems)
    _validate_monitoring(cfg, problems)
    _validate_autotune(cfg, problems)
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
    if tr.init_from is not None and not (isinstance(tr.init_from, str) and tr.init_from.startswith("hf:")
                                         and len(tr.init_from) > 3):
        problems.append(f"train.init_from={tr.init_from!r}: expected hf:/path/to/model (a local Hugging Face Llama)")
    if cfg.model.framing not in ("plain", "llasa_chat"):
        problems.append(f"model.framing: '{cfg.model.framing}' unknown; use plain or llasa_chat")
    elif cfg.model.framing == "llasa_chat":
        if cfg.data.tokenizer.kind != "hf":
            problems.append("model.framing=llasa_chat renders the base model's chat template: it needs "
                            "data.tokenizer.kind=hf with a tokenizer_config.json beside the tokenizer.json")
        if list(cfg.model.loss_segments) != list(CHAT_LOSS_SEGMENTS):
            problems.append(f"model.framing=llasa_chat trains as LLaSA does, from SPEECH_GENERATION_START to the end: "
                            f"set model.loss_segments=[{','.join(CHAT_LOSS_SEGMENTS)}] (now {cfg.model.loss_segments})")
    sm = cfg.samples
    for name, v in (("eval.interval", cfg.eval.interval), ("samples.interval", sm.interval)):
        if isinstance(v, int) and v < 0:
            problems.append(f"{name}={v}: must be >= 0 (0 = off)")
    if cfg.eval.interval and not cfg.data.valid_paths:
        problems.append("eval.interval: set data.valid_paths=[...] (validation datasets), or eval.interval=0")
    if isinstance(cfg.eval.batches, int) and cfg.eval.batches < 1:
        problems.append(f"eval.batches={cfg.eval.batches}: must be >= 1")
    if sm.interval and not sm.prompts:
        problems.append("samples.prompts: empty; give at least one text, or samples.interval=0")
    if isinstance(sm.max_tokens, int) and sm.max_tokens < 1:
        problems.append(f"samples.max_tokens={sm.max_tokens}: must be >= 1")
    d = cfg.data
    if d.codec is not None:
        problems.extend(_codec_problems(d.codec))
    if isinstance(d.pack_window, int) and d.pack_window < 1:
        problems.append(f"data.pack_window={d.pack_window}: must be >= 1 (samples packed together; 1024 is typical)")
    if isinstance(d.num_workers, int) and not 1 <= d.num_workers <= 64:
        problems.append(f"data.num_workers={d.num_workers}: must be in [1, 64] (reader threads per rank)")
    if isinstance(d.prefetch, int) and not 0 <= d.prefetch <= 64:
        problems.append(f"data.prefetch={d.prefetch}: must be in [0, 64] (steps prepared ahead; 0 = none)")
    if isinstance(cfg.train.lock_lease_s, (int, float)) and cfg.train.lock_lease_s < 10:
        problems.append(f"train.lock_lease_s={cfg.train.lock_lease_s:g}: must be >= 10 s (renewed every lease/4)")
    if d.paths is not None and d.sources is not None:
        problems.append("data.paths and data.sources: give exactly one (data.paths: one unweighted stream; "
                        "data.sources: weighted sources [{paths, weight, name}]); over a recipe that sets "
                        "data.paths, add data.paths=null")
    elif d.paths is not None and not d.paths:
        problems.append("data.paths: empty; give at least one dataset dir (e.g. data/demo)")
    if d.sources is not None:
        _source_problems(d.sources, problems)
    if d.sample_order not in ("shuffle", "duration"):
        problems.append(f"data.sample_order: '{d.sample_order}' unknown; use shuffle or duration")
    s = cfg.optim.schedule
    if s.decay_style not in ("cosine", "linear", "constant", "WSD", "inverse-square-root"):
        problems.append(f"optim.schedule.decay_style: '{s.decay_style}' unknown; use cosine, linear, constant or WSD")
    if s.decay_style == "WSD" and not s.wsd_decay_steps:
        problems.append("optim.schedule.wsd_decay_steps: required with decay_style=WSD")
    if tr.resume not in ("auto", "never") and not isinstance(tr.resume, str):
        problems.append("train.resume: use auto, never, or a checkpoint directory")


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
        need = watchdog_longest(w) + w.exit_grace_s + 10
        if t < need:
            problems.append(f"parallel.timeout_s={t:g} is shorter than the watchdog's longest window "
                            f"({watchdog_longest(w):g} s) + watchdog.exit_grace_s ({w.exit_grace_s:g} s) + 10 s: "
                            f"a hang would surface as an anonymous collective timeout instead of naming the "
                            f"stuck rank; set it >= {math.ceil(need)}, omit it (derived), or lower the watchdog's "
                            f"timeouts")


def bucket_elements(value: Any, bytes_per_grad: int = 4) -> int:
    """An autotune.bucket_sizes entry in gradient elements: an int, or 'NMB' (megabytes of
    gradient at ``bytes_per_grad`` bytes each). ValueError names the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip().upper().endswith("MB"):
        try:
            mb = float(value.strip()[:-2])
        except ValueError:
            mb = -1.0
        if mb > 0:
            return max(1, int(mb * 1e6 / bytes_per_grad))
    raise ValueError(f"{value!r}: give a positive number of gradient elements (40000000) or megabytes ('100MB')")


def _validate_autotune(cfg: Config, problems: list[str]) -> None:
    at, tr = cfg.autotune, cfg.train
    auto = auto_fields(cfg)
    if isinstance(at.steps, int) and at.steps < 1:
        problems.append(f"autotune.steps={at.steps}: must be >= 1 (timed steps per candidate)")
    if isinstance(at.warmup_steps, int) and at.warmup_steps < 0:
        problems.append(f"autotune.warmup_steps={at.warmup_steps}: must be >= 0")
    if isinstance(at.budget_s, (int, float)) and at.budget_s <= 0:
        problems.append(f"autotune.budget_s={at.budget_s}: must be > 0 seconds")
    if isinstance(at.headroom, (int, float)) and not 0 <= at.headroom < 1:
        problems.append(f"autotune.headroom={at.headroom}: a fraction in [0, 1) of the memory kept free, e.g. 0.1")
    if at.micro_batch_sizes is not None:
        bad = [m for m in at.micro_batch_sizes if not isinstance(m, int) or isinstance(m, bool) or m < 1]
        gbs = tr.global_batch_size
        undivided = [m for m in at.micro_batch_sizes if m not in bad and isinstance(gbs, int) and gbs % m]
        if not at.micro_batch_sizes:
            problems.append("autotune.micro_batch_sizes: empty; give candidates or omit it (1, 2, 4, 8, 16)")
        if bad:
            problems.append(f"autotune.micro_batch_sizes: {bad} are not positive integers")
        if undivided:
            problems.append(f"autotune.micro_batch_sizes: {undivided} do not divide train.global_batch_size={gbs} "
                            f"(the global batch stays fixed); choose from {_divisors(gbs)}")
    if at.bucket_sizes is not None:
        if not at.bucket_sizes:
            problems.append("autotune.bucket_sizes: empty; give candidates or omit it (10M, 40M, 100M elements)")
        for v in at.bucket_sizes:
            try:
                bucket_elements(v)
            except ValueError as e:
                problems.append(f"autotune.bucket_sizes: {e}")
    if "parallel.ddp.bucket_size" in auto:
        ddp = cfg.parallel.ddp if isinstance(cfg.parallel.ddp, dict) else {}
        if not ddp.get("overlap_grad_reduce"):
            # megatron-core's DDP sets bucket_size=None (one bucket) without overlap_grad_reduce
            problems.append("parallel.ddp.bucket_size=auto: buckets only exist with parallel.ddp.overlap_grad_reduce="
                            "true (megatron-core uses one bucket otherwise); set it, or drop bucket_size=auto")
    if "train.micro_batch_size" in auto and cfg.model.layer_spec == "te":
        problems.append("train.micro_batch_size=auto: transformer-engine's packed (THD) attention needs "
                        "micro_batch_size=1, so there is nothing to tune; set train.micro_batch_size=1")


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


def layout_problems(cfg: Config, world_size: int, ranks_per_node: Optional[int] = None) -> list[str]:
    """Every problem of running ``cfg`` on ``world_size`` processes, beyond what loading the config
    checks: the one layout check of training (at launch) and of launch.plan. ``ranks_per_node``:
    processes per node, for parallel.hierarchical.inner=node (None: not checked)."""
    p, tr = cfg.parallel, cfg.train
    problems = []
    mp = p.tp * p.pp
    dp = None
    if world_size % mp:
        problems.append(f"world size {world_size} is not divisible by tp x pp = {mp}; "
                        f"launch a multiple of {mp} processes or change parallel.tp/pp")
    else:
        dp = world_size // mp
        if p.dp is not None and p.dp != dp:
            problems.append(f"parallel.dp={p.dp} but world size {world_size} / (tp x pp) = {dp}; omit parallel.dp")
            dp = None
        elif tr.global_batch_size % (tr.micro_batch_size * dp):
            problems.append(_batch_problem(cfg, dp))
            dp = None
    beyond = [r for r in cfg.profiling.ranks if r >= world_size]
    if beyond:
        problems.append(f"profiling.ranks: {beyond} not in this world of {world_size} process(es); "
                        f"choose ranks below {world_size}")
    vocab = padded_vocab_size(cfg)
    if vocab % p.tp:  # only an explicit padded_size can get here; check_padded_vocab names it too
        problems.append(f"the padded vocabulary ({vocab}) is not divisible by parallel.tp={p.tp}: megatron splits "
                        f"the embedding rows evenly over TP; set model.vocab.padded_size to a multiple of {128 * p.tp}")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        problems.append(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.tp={p.tp}: sequence parallel "
                        f"splits the sequence over TP; use a seq_len multiple of {p.tp}")
    if p.vpp and dp is not None:
        m = tr.global_batch_size // (tr.micro_batch_size * dp)
        if m % p.pp:
            unit = tr.micro_batch_size * dp
            below, above = max(p.pp, m // p.pp * p.pp) * unit, math.ceil(m / p.pp) * p.pp * unit
            problems.append(f"interleaved pipelining (parallel.vpp={p.vpp}) needs the micro-batches per step "
                            f"({m}) to be a multiple of parallel.pp={p.pp} (megatron raises otherwise); use "
                            f"train.global_batch_size={below}" + ("" if below == above else f" or {above}"))
    if dp is not None:
        problems += _hierarchical_layout_problems(cfg, dp, ranks_per_node)
    return problems


def _validate_hierarchical(cfg: Config, problems: list[str]) -> None:
    h = cfg.parallel.hierarchical
    if not h.enabled:
        return
    where = "parallel.hierarchical"
    if not (h.inner == "node" or (isinstance(h.inner, int) and not isinstance(h.inner, bool) and h.inner >= 1)):
        problems.append(f"{where}.inner={h.inner!r}: use 'node' (the DP ranks of one node) or a DP group size >= 1")
    if not isinstance(h.outer_interval, int) or h.outer_interval < 1:
        problems.append(f"{where}.outer_interval={h.outer_interval!r}: must be an int >= 1 (applied steps between "
                        "outer synchronisations)")
    o = h.outer_optimizer
    if o.kind not in ("nesterov", "sgd", "average"):
        problems.append(f"{where}.outer_optimizer.kind: '{o.kind}' unknown; use nesterov, sgd or average")
    if isinstance(o.lr, (int, float)) and not o.lr > 0:
        problems.append(f"{where}.outer_optimizer.lr={o.lr}: must be > 0 (1.0 with average = plain averaging)")
    if isinstance(o.momentum, (int, float)) and not 0 <= o.momentum < 1:
        problems.append(f"{where}.outer_optimizer.momentum={o.momentum}: must be in [0, 1)")
    if cfg.optim.distributed:
        # The distributed optimizer shards its state over the full DP group, while the gradients
        # are reduced over the inner group only: its shards would mix replicas that diverge.
        problems.append(f"{where}.enabled=true with optim.distributed=true is not supported (the optimizer "
                        "shards over the full DP group, which hierarchical sync splits); set "
                        "optim.distributed=false, or disable parallel.hierarchical")


def _hierarchical_layout_problems(cfg: Config, dp: int, ranks_per_node: Optional[int]) -> list[str]:
    h = cfg.parallel.hierarchical
    if not h.enabled or not (h.inner == "node" or isinstance(h.inner, int)):
        return []
    where = "parallel.hierarchical.inner"
    if h.inner == "node":
        if ranks_per_node is None:
            return []  # known at launch only (LOCAL_WORLD_SIZE)
        if ranks_per_node % cfg.parallel.tp:
            return [f"{where}=node: {ranks_per_node} ranks per node is not a multiple of parallel.tp="
                    f"{cfg.parallel.tp} (TP groups would straddle nodes); give inner as a DP group size"]
    inner = hierarchical_inner_size(cfg, ranks_per_node or 1)
    out = []
    if dp % inner:
        out.append(f"{where}: {inner} DP ranks per inner group does not divide DP={dp}; use a divisor of {dp} "
                   f"({_divisors(dp)})")
    elif dp // inner < 2:
        out.append(f"{where}: one inner group of {inner} spans all of DP={dp}: there is nothing to synchronise "
                   "across; disable parallel.hierarchical or use a smaller inner group")
    return out


def validate_world(cfg: Config, world_size: int) -> None:
    """layout_problems as one ConfigError (exit 3 at launch)."""
    lws = os.environ.get("LOCAL_WORLD_SIZE")
    problems = layout_problems(cfg, world_size, ranks_per_node=int(lws) if lws else world_size)
    if problems:
        raise ConfigError(problems, "launch layout")


def _codec_problems(codec) -> list[str]:
    from data_pipeline.shard_format import CODEC_IDENTITY_KEYS

    if not isinstance(codec, dict):
        return [f"data.codec: expected a mapping of {', '.join(CODEC_IDENTITY_KEYS)}, got {codec!r}"]
    bad = sorted(set(codec) - set(CODEC_IDENTITY_KEYS))
    out = [f"data.codec.{k}: unknown; valid keys are {', '.join(CODEC_IDENTITY_KEYS)}" for k in bad]
    for k in ("sample_rate", "frame_rate", "n_q", "codebook_size"):
        v = codec.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            out.append(f"data.codec.{k}={v!r}: must be a positive number")
    return out


def _source_problems(sources: list, problems: list[str]) -> None:
    if not sources:
        problems.append("data.sources: empty; give at least one {paths: [...], weight: w, name: n}")
        return
    names = []
    for i, src in enumerate(sources):
        where = f"data.sources[{i}]"
        if not src.paths:
            problems.append(f"{where}.paths: empty; give the source's dataset dirs")
        if isinstance(src.weight, (int, float)) and not src.weight >= 0:
            problems.append(f"{where}.weight={src.weight}: must be >= 0 (a share of the tokens; 0 pauses it)")
        if src.name is not None and not str(src.name).strip():
            problems.append(f"{where}.name: empty; give a name or leave it out")
        names.append(src.name)
    if all(isinstance(s.weight, (int, float)) for s in sources) and sources and not any(s.weight > 0 for s in sources):
        problems.append("data.sources: every weight is 0; give at least one source a positive weight")
    named = [n for n in names if n is not None]
    dup = sorted({n for n in named if named.count(n) > 1})
    if dup:
        problems.append(f"data.sources: names {dup} repeat; give each source a unique name")
