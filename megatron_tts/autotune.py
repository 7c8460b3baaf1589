"""Self-tuned DDP buckets and micro-batches: ``train.micro_batch_size=auto`` and
``parallel.ddp.bucket_size=auto`` resolved by a short start-up sweep.

For each candidate (micro-batch size x bucket size) the sweep builds a throwaway model, optimizer
and loader from the run's own config, runs ``autotune.warmup_steps + autotune.steps`` real training
steps (the run's own ``train_step``) on the run's first batches, and times them. The run's loader,
model and RNG are built afterwards, seeded as without a sweep: the sweep changes nothing in the
result but the micro-batch size and the buckets, and the global batch stays fixed (gradient
accumulation = global_batch / (micro_batch x dp)).

Every rank runs every candidate; each candidate's per-step times, peak memory and failure flag
are all-reduced (max over ranks), so every rank sees the same numbers and picks the same winner:
the most tokens/s among the candidates within the memory headroom. The choice is logged with every
candidate, emitted as an ``autotune`` metrics event and written to ``RUN_DIR/autotune.json`` with a
fingerprint of what it depends on; a resume with the same fingerprint reuses it without a sweep,
and a changed layout (an elastic resize) re-tunes and says why.

Memory is measured behind one seam (``memory_probe``): on GPU the caching allocator's peak
(torch.cuda.max_memory_reserved) against the device's memory (torch.cuda.mem_get_info); on CPU the
process RSS against RSS + available RAM shared by the host's ranks (psutil).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tts import signals
from megatron_tts.checkpoint.collective import bcast
from megatron_tts.config import Config, auto_fields, resolve_dtype
from megatron_tts.config.validate import bucket_elements

log = logging.getLogger("megatron_tts")

FILE = "autotune.json"
DEFAULT_MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)
DEFAULT_BUCKET_SIZES = (10_000_000, 40_000_000, 100_000_000)  # gradient elements; 40M = megatron's default


class AutotuneError(RuntimeError):
    """No candidate can run (all over the memory headroom, or none divides the batch)."""


# --------------------------------------------------------------------------------------------
# Candidates and the choice (pure: tested on synthetic measurements).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    micro_batch_size: int
    bucket_size: Optional[int]  # gradient elements; None = not tuned (the recipe's value)

    def label(self) -> str:
        b = "-" if self.bucket_size is None else f"{self.bucket_size / 1e6:g}M"
        return f"mbs={self.micro_batch_size} bucket={b}"


@dataclass
class Measurement:
    candidate: Candidate
    status: str = "pending"  # ok | over_memory | predicted_over_memory | oom | over_budget | stopped
    step_time_s: Optional[float] = None  # median over the timed steps of the max over ranks
    step_times_s: list = field(default_factory=list)
    tokens_per_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None  # max over ranks
    memory_limit_bytes: Optional[int] = None  # min over ranks
    base_memory_bytes: Optional[int] = None  # max over ranks: held before the candidate's model was built
    note: str = ""

    def line(self) -> str:
        c = self.candidate.label()
        if self.step_time_s is None:
            return f"{c}: {self.status} ({self.note})"
        mem = ""
        if self.peak_memory_bytes is not None:
            mem = (f", peak {self.peak_memory_bytes / 2**30:.2f} GiB of "
                   f"{self.memory_limit_bytes / 2**30:.2f} GiB allowed")
        return (f"{c}: step {self.step_time_s:.3f} s (median of {len(self.step_times_s)}, max over ranks), "
                f"{self.tokens_per_s:,.0f} tokens/s{mem}: {self.status}" + (f" ({self.note})" if self.note else ""))

    def record(self) -> dict:
        d = asdict(self)
        d["candidate"] = asdict(self.candidate)
        return d

    @classmethod
    def from_record(cls, d: dict) -> "Measurement":
        return cls(**{**d, "candidate": Candidate(**d["candidate"])})


def micro_batch_candidates(cfg: Config, dp: int) -> tuple[list[int], list[int]]:
    """(candidates that divide global_batch / dp, those dropped because they do not)."""
    from megatron_tts.model import uses_transformer_engine

    # transformer-engine's packed (THD) attention takes one sequence per micro-batch (train/build.py)
    wanted = [1] if uses_transformer_engine(cfg) else cfg.autotune.micro_batch_sizes or list(DEFAULT_MICRO_BATCH_SIZES)
    per_rank = cfg.train.global_batch_size // dp
    pp = cfg.parallel.pp if cfg.parallel.vpp else 1  # interleaved 1F1B: micro-batches a multiple of pp

    def fits(m: int) -> bool:
        return per_rank % m == 0 and (per_rank // m) % pp == 0

    return sorted({m for m in wanted if fits(m)}), sorted({m for m in wanted if not fits(m)})


def bucket_candidates(cfg: Config) -> list[Optional[int]]:
    if "parallel.ddp.bucket_size" not in auto_fields(cfg):
        return [cfg.parallel.ddp.bucket_size]
    ddp = cfg.parallel.ddp
    fp32_grads = getattr(ddp, "grad_reduce_in_fp32", False) or resolve_dtype(cfg) == "fp32"
    wanted = cfg.autotune.bucket_sizes or list(DEFAULT_BUCKET_SIZES)
    return sorted({bucket_elements(b, 4 if fp32_grads else 2) for b in wanted})


def candidates(cfg: Config, dp: int) -> list[Candidate]:
    mbs = micro_batch_candidates(cfg, dp)[0] if "train.micro_batch_size" in auto_fields(cfg) \
        else [cfg.train.micro_batch_size]
    return [Candidate(m, b) for m in mbs for b in bucket_candidates(cfg)]


def predicted_peak(measured: list[Measurement], cand: Candidate) -> Optional[tuple[int, Measurement]]:
    """A larger micro-batch's peak memory from the smaller ones measured with the same buckets:
    activations grow linearly with the micro-batch, weights and optimizer state do not. Two
    points: the line through the two largest; one: its growth over the memory held before its
    model was built, scaled by the micro-batch ratio (an upper bound)."""
    smaller = sorted((m for m in measured if m.peak_memory_bytes is not None and m.base_memory_bytes is not None
                      and m.candidate.bucket_size == cand.bucket_size
                      and m.candidate.micro_batch_size < cand.micro_batch_size),
                     key=lambda m: m.candidate.micro_batch_size)
    if not smaller:
        return None
    ref = smaller[-1]
    mbs, peak = ref.candidate.micro_batch_size, ref.peak_memory_bytes
    if len(smaller) > 1:
        prev = smaller[-2]
        slope = max(0.0, (peak - prev.peak_memory_bytes) / (mbs - prev.candidate.micro_batch_size))
        return int(peak + slope * (cand.micro_batch_size - mbs)), ref
    grown = max(0, peak - ref.base_memory_bytes)
    return int(ref.base_memory_bytes + grown * cand.micro_batch_size / mbs), ref


def pre_verdict(measured: list[Measurement], cand: Candidate, elapsed_s: float,
                budget_s: float) -> Optional[tuple[str, str]]:
    """(status, note) of a candidate that is not run: the sweep's time budget is spent (the first
    candidate always runs), or a smaller micro-batch's peak predicts it exceeds the headroom."""
    if measured and elapsed_s > budget_s:
        return "over_budget", f"autotune.budget_s={budget_s:g} s spent ({elapsed_s:.1f} s)"
    predicted = predicted_peak(measured, cand)
    if predicted is not None and predicted[0] > predicted[1].memory_limit_bytes:
        peak, ref = predicted
        return "predicted_over_memory", (f"{peak / 2**30:.2f} GiB predicted from {ref.candidate.label()} > "
                                         f"{ref.memory_limit_bytes / 2**30:.2f} GiB allowed; not run")
    return None


def choose(measurements: list[Measurement]) -> tuple[Candidate, str]:
    """The winner (most tokens/s among those within the headroom) and why it won."""
    ok = [m for m in measurements if m.status == "ok"]
    if not ok:
        raise AutotuneError("no autotune candidate fits: " + "; ".join(m.line() for m in measurements) +
                            ". Lower autotune.micro_batch_sizes, lower autotune.headroom, or set the values by hand")
    ranked = sorted(ok, key=lambda m: (-m.tokens_per_s, m.candidate.micro_batch_size,
                                       m.candidate.bucket_size or 0))
    best = ranked[0]
    why = f"{best.candidate.label()} is the fastest within the memory headroom: {best.tokens_per_s:,.0f} tokens/s"
    if len(ranked) > 1:
        second = ranked[1]
        gain = 100.0 * (best.tokens_per_s / second.tokens_per_s - 1.0)
        why += f", {gain:.1f}% above the runner-up {second.candidate.label()} ({second.tokens_per_s:,.0f} tokens/s)"
    else:
        why += " (the only candidate measured within the headroom)"
    rejected = [m for m in measurements if m.status != "ok"]
    if rejected:
        why += "; not chosen: " + ", ".join(f"{m.candidate.label()} {m.status}" for m in rejected)
    return best.candidate, why


# --------------------------------------------------------------------------------------------
# autotune.json: the choice, reused on resume while its fingerprint matches.
# --------------------------------------------------------------------------------------------


def fingerprint(cfg: Config, world_size: int, dp: int) -> dict:
    """What the choice depends on: the layout, the batch and model shape, the device, the sweep's
    own settings. Any difference re-tunes."""
    t = cfg.model.transformer
    ddp = cfg.parallel.ddp
    return {
        "world_size": world_size, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp, "dp": dp,
        "sequence_parallel": cfg.parallel.sequence_parallel,
        "global_batch_size": cfg.train.global_batch_size, "seq_len": cfg.data.seq_len, "dtype": resolve_dtype(cfg),
        "model": [t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_attention_heads, t.num_query_groups],
        "distributed_optimizer": cfg.optim.distributed,
        "overlap_grad_reduce": bool(getattr(ddp, "overlap_grad_reduce", False)),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "auto": list(auto_fields(cfg)),
        "autotune": asdict(cfg.autotune),
    }


def load_choice(run_dir: str, fp: dict) -> tuple[Optional[dict], str]:
    """(the saved record, '') when RUN_DIR/autotune.json matches ``fp``; else (None, why)."""
    path = os.path.join(run_dir, FILE)
    if not os.path.exists(path):
        return None, "no autotune.json in the run directory"
    try:
        with open(path) as f:
            saved = json.load(f)
        old = saved["fingerprint"]
        saved["choice"]["micro_batch_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path} is unreadable ({e!r})"
    diffs = _differences(old, fp)
    if diffs:
        return None, "the setting changed since it was tuned: " + "; ".join(diffs)
    return saved, ""


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key old -> new' for each differing leaf (nested keys dotted: autotune.steps 3 -> 5)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def save_choice(run_dir: str, record: dict) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Memory: the one device seam.
# --------------------------------------------------------------------------------------------


class CudaMemory:
    """The caching allocator's peak against the device's memory (other processes' use included)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> None:
        pass  # the allocator keeps its own peak

    def peak(self) -> int:
        return int(torch.cuda.max_memory_reserved(self.device))

    def limit(self, headroom: float) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        # what is free now plus what this process holds is what a candidate may grow into
        usable = min(total, free + torch.cuda.memory_reserved(self.device))
        return int(usable * (1.0 - headroom))

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def is_oom(e: BaseException) -> bool:
        return isinstance(e, torch.cuda.OutOfMemoryError)


class HostMemory:
    """The process's peak RSS against RSS + the host's available RAM split over the ranks on this
    host. On Linux the kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs)
    catches the peak inside a step; elsewhere RSS sampled after each step stands in for it."""

    _STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"

    def __init__(self) -> None:
        import psutil

        self.proc, self.psutil = psutil.Process(), psutil
        self.max_rss = 0
        self.kernel_peak = False

    def reset(self) -> None:
        gc.collect()
        self.max_rss = self.proc.memory_info().rss
        try:
            with open(self._CLEAR, "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kernel_peak = self._hwm() is not None
        except OSError:
            self.kernel_peak = False

    def _hwm(self) -> Optional[int]:
        try:
            with open(self._STATUS) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def sample(self) -> None:
        self.max_rss = max(self.max_rss, self.proc.memory_info().rss)

    def peak(self) -> int:
        hwm = self._hwm() if self.kernel_peak else None
        return int(max(self.max_rss, hwm or 0))

    def limit(self, headroom: float) -> int:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        available = self.psutil.virtual_memory().available
        return int((self.proc.memory_info().rss + available / local) * (1.0 - headroom))

    def sync(self) -> None:
        pass

    @staticmethod
    def is_oom(e: BaseException) -> bool:
        return isinstance(e, MemoryError)


def memory_probe(device: torch.device):
    return CudaMemory(device) if device.type == "cuda" else HostMemory()


# --------------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------------


@dataclass
class Tuned:
    """The resolution of the auto fields on this run: what to apply, log, save and emit."""

    choice: Candidate
    reason: str
    measurements: list[Measurement]
    fingerprint: dict
    reused: bool
    elapsed_s: float
    retune_reason: str = ""

    def record(self) -> dict:
        return {"choice": asdict(self.choice), "reason": self.reason, "fingerprint": self.fingerprint,
                "candidates": [m.record() for m in self.measurements], "elapsed_s": self.elapsed_s,
                "time": time.time()}

    def event(self) -> dict:
        return {"event": "autotune", "reused": self.reused, "choice": asdict(self.choice), "reason": self.reason,
                "candidates": [m.record() for m in self.measurements], "elapsed_s": self.elapsed_s,
                **({"retune_reason": self.retune_reason} if self.retune_reason else {})}


def candidate_config(cfg: Config, cand: Candidate) -> Config:
    """A copy of ``cfg`` with the candidate's values (megatron's DDP writes into its ddp config,
    and wrap_ddp into the TransformerConfig: the run's own must stay untouched)."""
    c = copy.deepcopy(cfg)
    c.train.micro_batch_size = cand.micro_batch_size
    c.parallel.ddp.bucket_size = cand.bucket_size
    return c


def apply(cfg: Config, cand: Candidate) -> None:
    cfg.train.micro_batch_size = cand.micro_batch_size
    cfg.parallel.ddp.bucket_size = cand.bucket_size


def _agree(values: list[float]) -> list[float]:
    """The max over ranks of each value (every rank gets the same list)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


@dataclass
class _Batches:
    """A candidate's data: the run's first steps at one micro-batch size, and their (closed) loader."""

    loader: object
    steps: list


def _measure(cfg: Config, layout, cand: Candidate, batches: _Batches, probe,
             ddp_groups=None) -> tuple[list[float], float, bool, str]:
    """Run the candidate's steps: (per-step times after warmup, real tokens per step, oom, note)."""
    # (imported here: megatron_tts.train.build imports this module)
    from megatron_tts.model import uses_transformer_engine
    from megatron_tts.optim import build_scheduler
    from megatron_tts.step_guard import StepGuard
    from megatron_tts.train.build import Run, build_model_and_optimizer
    from megatron_tts.train.hooks import Hooks
    from megatron_tts.train.step import make_forward_step, train_step
    from monitoring.timers import PhaseTimers

    c = candidate_config(cfg, cand)
    times, tokens, oom, note = [], 0.0, False, ""
    model = optimizer = run = None
    try:
        model, optimizer, _ = build_model_and_optimizer(c, ddp_groups=ddp_groups)
        # The run's own step function over a throwaway model: no checkpointer, metrics or hooks.
        run = Run(c, layout, model, optimizer, build_scheduler(c, optimizer), loader=batches.loader,
                  checkpointer=None, metrics=None, guard=StepGuard(c.guard),
                  monitor=PhaseTimers(enabled=False, nvtx=False), hooks=Hooks([]))
        forward_step = make_forward_step(uses_transformer_engine(c), layout.device, len(batches.loader.sources))
        warmup = cfg.autotune.warmup_steps
        for i, step_batches in enumerate(batches.steps):
            probe.sync()
            t0 = time.perf_counter()
            result = train_step(run, step_batches, forward_step)
            probe.sync()
            dt = time.perf_counter() - t0
            probe.sample()
            if i >= warmup:
                times.append(dt)
                tokens += result.stats.tokens
        tokens /= max(1, len(times))
    except Exception as e:  # noqa: BLE001 - only an out-of-memory error is a verdict; others propagate
        if not probe.is_oom(e):
            raise
        oom, note = True, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        del run, model, optimizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return times, tokens, oom, note


def _first_batches(cfg: Config, layout, mbs: int, n_steps: int) -> _Batches:
    """The run's first ``n_steps`` steps of data at this micro-batch size, from a loader of its own
    (the run's loader is built after the sweep and starts where it would have)."""
    from megatron_tts.train.build import build_loader

    c = copy.deepcopy(cfg)
    c.train.micro_batch_size = mbs
    c.data.prefetch = 0  # nothing read beyond the steps the sweep runs
    loader = build_loader(c, layout)
    try:
        return _Batches(loader, [loader.next_step() for _ in range(n_steps)])
    finally:
        loader.close()


def sweep(cfg: Config, layout, probe=None, ddp_groups=None) -> list[Measurement]:
    """Measure every candidate (same order and verdicts on every rank). ``ddp_groups``: the
    groups the run's DDP reduces over (parallel.hierarchical), so the sweep times that all-reduce."""
    at = cfg.autotune
    probe = probe or memory_probe(layout.device)
    cands = candidates(cfg, layout.dp)
    start = time.monotonic()
    out: list[Measurement] = []
    batches: Optional[_Batches] = None
    for cand in cands:
        m = Measurement(cand)
        out.append(m)
        # every rank cuts off at the same candidate: the slowest clock, any rank's stop signal
        elapsed, stop = _agree([time.monotonic() - start, float(signals.requested())])
        verdict = ("stopped", "a stop signal arrived; the run stops after its first step") if stop and out[:-1] \
            else pre_verdict(out[:-1], cand, elapsed, at.budget_s)
        if verdict is not None:
            m.status, m.note = verdict
            _report(layout, m)
            continue
        if batches is None or batches.steps[0][0].tokens.shape[0] != cand.micro_batch_size:
            batches = _first_batches(cfg, layout, cand.micro_batch_size, at.warmup_steps + at.steps)
        probe.reset()
        limit, base = probe.limit(at.headroom), probe.peak()
        times, tokens, oom, note = _measure(cfg, layout, cand, batches, probe, ddp_groups)
        n = at.steps
        local = (times if not oom else [0.0] * n) + [float(probe.peak()), -float(limit), float(oom), tokens,
                                                     float(base)]
        agreed = _agree(local)
        m.step_times_s = agreed[:n]
        m.peak_memory_bytes, m.memory_limit_bytes = int(agreed[n]), int(-agreed[n + 1])
        m.base_memory_bytes = int(agreed[n + 4])
        if agreed[n + 2] > 0:
            m.status, m.note = "oom", note or "out of memory on another rank"
            m.step_times_s = []
        else:
            m.step_time_s = statistics.median(m.step_times_s)
            m.tokens_per_s = agreed[n + 3] / m.step_time_s
            m.status = "ok" if m.peak_memory_bytes <= m.memory_limit_bytes else "over_memory"
            if m.status == "over_memory":
                m.note = f"autotune.headroom={at.headroom:g}"
        _report(layout, m)
    return out


def _report(layout, m: Measurement) -> None:
    if layout.rank == 0:
        log.info("autotune: %s", m.line())


def resolve(cfg: Config, layout, ddp_groups=None) -> Optional[Tuned]:
    """Resolve the auto fields of ``cfg`` in place (reusing RUN_DIR/autotune.json when it still
    applies, else by a sweep); None when no field is auto. Writes nothing (see ``save``)."""
    if not auto_fields(cfg):
        return None
    fp = fingerprint(cfg, layout.world_size, layout.dp)
    saved, why = load_choice(cfg.train.run_dir, fp) if layout.rank == 0 else (None, "")
    saved, why = bcast((saved, why))  # rank 0's file decides: the run directory need not be shared
    if saved is not None:
        choice = Candidate(**saved["choice"])
        tuned = Tuned(choice, saved["reason"], [Measurement.from_record(r) for r in saved["candidates"]], fp,
                      reused=True, elapsed_s=0.0)
        apply(cfg, _agreed(choice, layout))
        if layout.rank == 0:
            log.info("autotune: reusing %s (tuned for this layout and config): %s; not re-tuning",
                     os.path.join(cfg.train.run_dir, FILE), choice.label())
        return tuned
    if layout.rank == 0:
        kept, dropped = micro_batch_candidates(cfg, layout.dp)
        if "train.micro_batch_size" in auto_fields(cfg) and dropped:
            log.warning("autotune: micro-batch sizes %s do not divide global_batch_size / dp = %d / %d; not tried",
                        dropped, cfg.train.global_batch_size, layout.dp)
        log.info("autotune: tuning %s (%s) over %d candidate(s), %d+%d steps each, budget %g s",
                 ", ".join(auto_fields(cfg)), why, len(candidates(cfg, layout.dp)), cfg.autotune.warmup_steps,
                 cfg.autotune.steps, cfg.autotune.budget_s)
    if not candidates(cfg, layout.dp):
        wanted = cfg.autotune.micro_batch_sizes or list(DEFAULT_MICRO_BATCH_SIZES)
        raise AutotuneError(f"train.micro_batch_size=auto: no candidate of {wanted} divides global_batch_size / dp "
                            f"= {cfg.train.global_batch_size} / {layout.dp}; set autotune.micro_batch_sizes to "
                            f"divisors of {cfg.train.global_batch_size // layout.dp}")
    t0 = time.monotonic()
    measurements = sweep(cfg, layout, ddp_groups=ddp_groups)
    choice, reason = choose(measurements)
    apply(cfg, _agreed(choice, layout))
    tuned = Tuned(choice, reason, measurements, fp, reused=False, elapsed_s=time.monotonic() - t0,
                  retune_reason=why if why.startswith("the setting changed") else "")
    if layout.rank == 0:
        log.info("autotune: chose %s in %.1f s: %s", choice.label(), tuned.elapsed_s, reason)
    return tuned


def _agreed(choice: Candidate, layout) -> Candidate:
    """Every rank's choice, checked equal: ranks that disagreed would train with different
    micro-batch counts, which no collective of the step would notice."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        got: list = [None] * dist.get_world_size()
        dist.all_gather_object(got, asdict(choice))
        if any(g != got[0] for g in got):
            raise RuntimeError(f"autotune: ranks chose differently: {got}")
    if layout.rank == 0:
        log.info("autotune: all %d rank(s) use %s", layout.world_size, choice.label())
    return choice


def save(cfg: Config, tuned: Optional[Tuned], rank: int) -> None:
    """Rank 0 writes a new choice to RUN_DIR/autotune.json (once the run directory may be written)."""
    if tuned is None or tuned.reused or rank != 0:
        return
    path = save_choice(cfg.train.run_dir, tuned.record())
    log.info("autotune: choice saved to %s", path)
