"""Per-node health check before a training job: GPUs, GEMM speed, all-reduce bandwidth, the
checkpoint directory. Run it on every node (one process per node) before launching training:

    srun --ntasks-per-node=1 python -m launch.preflight --ckpt-dir RUN_DIR/checkpoints \\
        --store-endpoint HEAD_ADDR:PORT [--json report.json]
    torchrun --nproc-per-node 1 --nnodes N ... -m launch.preflight ...     (RANK/MASTER_ADDR set)
    python -m launch.preflight --ckpt-dir /ckpt                            (this node alone)

Checks (thresholds are flags; see --help):
  gpus.visible   CUDA devices seen vs --expect-gpus
  gpuI.ecc       NVML volatile uncorrected ECC errors == 0
  gpuI.throttle  no HW slowdown, SW/HW thermal or power-brake clock throttling (idle and the
                 power cap are normal)
  gpuI.remap     no failed row remapping (NVML)
  gpuI.memory    free memory >= --min-gpu-free-frac of total (leftover processes hold memory)
  gpuI.gemm      bf16 GEMM TFLOP/s >= --gemm-threshold x the median of this node's GPUs
  gemm           this node's slowest GEMM (fp32 on CPU) >= --gemm-threshold x the median over
                 all nodes, and >= --min-tflops
  allreduce      bus bandwidth of an all-reduce over all processes (nccl on GPU, gloo on CPU;
                 busbw = algbw x 2(n-1)/n, as nccl-tests report it) >= --min-busbw-gbps. It
                 measures the fabric, not one node: a failure is reported for the job.
  ckpt.write     write + fsync of --write-mb MB in --ckpt-dir >= --min-write-mbps
  ckpt.free      free space in --ckpt-dir >= --min-free-gb

Without NVML or CUDA, one line says so and the checks that apply still run.

With several processes (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, plus MASTER_ADDR/
MASTER_PORT or --store-endpoint), every node's results are gathered and compared; rank 0 prints
the table of nodes, writes --json, and prints an `--exclude=` hint naming the bad nodes (Slurm
node names when SLURMD_NODENAME is set, else hostnames).

Exit codes (each process):
  0   every check passed on every node
  1   the preflight itself failed (a crash, a rendezvous or collective that failed)
  2   THIS node failed a check: exclude it (srun returns the highest code of its tasks)
  4   this node passed, but another node or the fabric (all-reduce) failed
  64  bad command line

Test hook: MEGATRON_TTS_PREFLIGHT_SLOWDOWN=RANK:FACTOR[,RANK:FACTOR...] makes the GEMM
benchmark of those ranks really take FACTOR times longer (it sleeps inside the timed region).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_NODE = 2
EXIT_OTHERS_BAD = 4
EXIT_USAGE = 64

SLOWDOWN_ENV = "MEGATRON_TTS_PREFLIGHT_SLOWDOWN"

# Clock-event reasons that mean the GPU is sick or overheating; idle, application clocks and
# the software power cap (normal under load) are not on the list.
_BAD_THROTTLE = {
    0x08: "hw_slowdown",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}


@dataclass
class Check:
    name: str
    ok: Optional[bool]  # None: skipped (not applicable here)
    measured: Any = None
    expected: Any = None
    unit: str = ""
    detail: str = ""


@dataclass
class NodeReport:
    node: str  # Slurm node name (what --exclude takes) or hostname
    hostname: str
    rank: int
    world_size: int
    device: str
    checks: list[Check] = field(default_factory=list)
    gemm_tflops: Optional[float] = None  # this node's slowest device
    exit_code: int = EXIT_OK

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]


class UsageError(Exception):
    pass


# ------------------------------------------------------------------------------ process world


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int


def world_from_env() -> World:
    """torchrun's variables, else Slurm's (srun without torchrun), else a world of one."""
    env = os.environ
    rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
    size = env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
    local_rank = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    local_size = env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1"))
    try:
        # SLURM_NTASKS_PER_NODE may read "2(x3)" on heterogeneous steps: more than one per node.
        local = int(local_size.split("(")[0])
        return World(int(rank), int(size), int(local_rank), local)
    except ValueError as e:
        raise UsageError(f"cannot read the process layout from the environment: {e}") from e


def init_distributed(world: World, store_endpoint: Optional[str], backend: str, timeout_s: float) -> bool:
    """Join the other nodes' processes; False when this process runs alone."""
    import torch.distributed as dist

    if world.size == 1:
        return False
    timeout = datetime.timedelta(seconds=timeout_s)
    if store_endpoint:
        host, _, port = store_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--store-endpoint {store_endpoint!r}: expected HOST:PORT")
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        # One external store serves several steps and requeued incarnations of a job.
        step = f"{os.environ.get('SLURM_JOB_ID', 'nojob')}.{os.environ.get('SLURM_STEP_ID', '0')}"
        store = dist.PrefixStore(f"preflight/{step}", store)
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=timeout)
        return True
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        print(f"preflight: {world.size} processes but no MASTER_ADDR/MASTER_PORT or --store-endpoint: "
              "running this node's checks alone (no cross-node comparison, no all-reduce)",
              file=sys.stderr, flush=True)
        return False
    dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size, timeout=timeout)
    return True


# ------------------------------------------------------------------------------ GPUs (NVML)


def _nvml():
    """pynvml, initialised; or (None, why)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, ""
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return None, f"{type(e).__name__}: {e}".strip(": ")


def _nvml_handle(pynvml, cuda_index: int):
    """The NVML handle of CUDA device `cuda_index` (CUDA_VISIBLE_DEVICES renumbers devices; NVML
    does not), found through the device UUID when torch exposes it."""
    import torch

    try:
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v for v in visible.split(",") if v.strip()]
        if ids and all(v.strip().isdigit() for v in ids):
            return pynvml.nvmlDeviceGetHandleByIndex(int(ids[cuda_index]))
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


def gpu_health_checks(pynvml, cuda_index: int, min_free_frac: float) -> list[Check]:
    h = _nvml_handle(pynvml, cuda_index)
    name = f"gpu{cuda_index}"
    checks = []

    def nvml_call(check: str, fn):
        try:
            return fn()
        except pynvml.NVMLError_NotSupported:
            checks.append(Check(f"{name}.{check}", None, detail="not supported by this GPU/driver"))
        except pynvml.NVMLError as e:
            checks.append(Check(f"{name}.{check}", False, detail=f"NVML error: {e}"))
        return None

    ecc = nvml_call("ecc", lambda: pynvml.nvmlDeviceGetTotalEccErrors(
        h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC))
    if ecc is not None:
        checks.append(Check(f"{name}.ecc", ecc == 0, ecc, 0, "errors", "volatile uncorrected ECC"))
    get_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    reasons = nvml_call("throttle", lambda: get_reasons(h))
    if reasons is not None:
        bad = [label for bit, label in _BAD_THROTTLE.items() if reasons & bit]
        checks.append(Check(f"{name}.throttle", not bad, ",".join(bad) or "none", "none", "",
                            f"clock event reasons 0x{reasons:x}"))
    remap = nvml_call("remap", lambda: pynvml.nvmlDeviceGetRemappedRows(h))
    if remap is not None:
        _corr, _unc, pending, failed = remap
        checks.append(Check(f"{name}.remap", not failed, "failed" if failed else "ok", "ok", "",
                            "row remapping pending (reset the GPU)" if pending else ""))
    mem = nvml_call("memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(h))
    if mem is not None:
        free_gb, total_gb = mem.free / 1e9, mem.total / 1e9
        detail = ""
        if mem.free < min_free_frac * mem.total:
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                detail = "held by pids " + ",".join(str(p.pid) for p in procs) if procs else ""
            except pynvml.NVMLError:
                pass
        checks.append(Check(f"{name}.memory", mem.free >= min_free_frac * mem.total, free_gb,
                            f">= {_num(min_free_frac * total_gb)}", "GB free", detail))
    return checks


# ------------------------------------------------------------------------------ benchmarks


def parse_slowdown(spec: str) -> dict[int, float]:
    """'1:8,3:2' -> {1: 8.0, 3: 2.0} (the test hook)."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        rank, sep, factor = item.partition(":")
        try:
            if not sep or float(factor) < 1:
                raise ValueError
            out[int(rank)] = float(factor)
        except ValueError:
            raise UsageError(f"{SLOWDOWN_ENV}={spec!r}: expected RANK:FACTOR[,RANK:FACTOR], FACTOR >= 1") from None
    return out


def gemm_tflops(device, n: int, iters: int, repeats: int, slowdown: float = 1.0) -> float:
    """Best of `repeats` timings of `iters` n x n matmuls (bf16 on GPU, fp32 on CPU)."""
    import torch

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda *_: None)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, lazy init
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        sync(device)
        if slowdown > 1:
            time.sleep((slowdown - 1) * (time.perf_counter() - t0))
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * iters / best / 1e12


def allreduce_busbw(device, megabytes: float, iters: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s of an fp32 all-reduce of `megabytes` MB over the world, timed by the
    slowest rank, as nccl-tests define them."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    numel = max(1, int(megabytes * 1e6) // 4)
    x = torch.ones(numel, dtype=torch.float32, device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda *_: None)
    for _ in range(2):
        dist.all_reduce(x)
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    sync(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    algbw = numel * 4 * iters / elapsed.item() / 1e9
    return algbw, algbw * 2 * (n - 1) / n


# ------------------------------------------------------------------------------ checkpoint dir


def checkpoint_dir_checks(path: str, write_mb: float, min_write_mbps: float, min_free_gb: float,
                          tag: str, free_reason: str = "") -> list[Check]:
    checks = []
    try:
        os.makedirs(path, exist_ok=True)
        target = os.path.join(path, f".preflight-{tag}-{os.getpid()}.tmp")
        block = os.urandom(1 << 20)
        total = max(1, int(write_mb))
        try:
            t0 = time.perf_counter()
            with open(target, "wb") as f:
                for _ in range(total):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            mbps = total * len(block) / 1e6 / (time.perf_counter() - t0)
        finally:
            try:
                os.remove(target)
            except OSError:
                pass
        checks.append(Check("ckpt.write", mbps >= min_write_mbps, mbps, f">= {min_write_mbps:g}", "MB/s",
                            f"{total} MB write+fsync in {path}"))
    except OSError as e:
        checks.append(Check("ckpt.write", False, None, f">= {min_write_mbps:g}", "MB/s", f"{path}: {e}"))
    try:
        free_gb = shutil.disk_usage(path).free / 1e9
        checks.append(Check("ckpt.free", free_gb >= min_free_gb, free_gb, f">= {min_free_gb:.4g}", "GB",
                            f"free space in {path}" + (f"; needed: {free_reason}" if free_reason else "")))
    except OSError as e:
        checks.append(Check("ckpt.free", False, None, f">= {min_free_gb:g}", "GB", f"{path}: {e}"))
    return checks


# ------------------------------------------------------------------------------ one node


def node_checks(args, world: World) -> tuple[NodeReport, Any]:
    """This node's checks (all but the cross-node comparison); returns the report and the
    device the collectives use."""
    import torch

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    # Defaults sized for the device: ~30 ms per timing on an H100, ~0.1-0.5 s on one CPU core.
    args.gemm_n = args.gemm_n or (8192 if cuda else 1024)
    args.gemm_iters = args.gemm_iters or (20 if cuda else 4)
    args.allreduce_mb = args.allreduce_mb or (256 if cuda else 32)
    report = NodeReport(node=node, hostname=socket.gethostname(), rank=world.rank, world_size=world.size,
                        device="cuda" if cuda else "cpu")
    checks = report.checks
    slowdown = parse_slowdown(os.environ.get(SLOWDOWN_ENV, "")).get(world.rank, 1.0)

    if cuda:
        count = torch.cuda.device_count()
        # Several processes per node each test their own GPU; one per node tests them all.
        indices = [world.local_rank] if world.local_size > 1 else list(range(count))
        expect = args.expect_gpus
        checks.append(Check("gpus.visible", expect is None or count == expect, count,
                            expect if expect is not None else "any", "GPUs"))
        collective_device = torch.device("cuda", indices[0])
        torch.cuda.set_device(collective_device)
        pynvml, why = _nvml()
        if pynvml is None:
            print(f"preflight: NVML unavailable ({why}): GPU health checks (ECC, throttling, memory) skipped",
                  file=sys.stderr, flush=True)
        per_gpu = []
        for i in indices:
            if pynvml is not None:
                checks.extend(gpu_health_checks(pynvml, i, args.min_gpu_free_frac))
            try:
                per_gpu.append((i, gemm_tflops(torch.device("cuda", i), args.gemm_n, args.gemm_iters,
                                               args.gemm_repeats, slowdown)))
            except RuntimeError as e:  # a CUDA error here is the GPU's fault
                checks.append(Check(f"gpu{i}.gemm", False, None, None, "TFLOP/s", f"GEMM failed: {e}"))
        if per_gpu:
            median = statistics.median(t for _, t in per_gpu)
            floor = args.gemm_threshold * median
            for i, t in per_gpu:
                checks.append(Check(f"gpu{i}.gemm", t >= floor, t, f">= {_num(floor)}", "TFLOP/s",
                                    f"bf16 {args.gemm_n}^3; {args.gemm_threshold:g} x this node's median"))
            report.gemm_tflops = min(t for _, t in per_gpu)
    else:
        print("preflight: no CUDA device: GPU checks skipped; GEMM in fp32 on CPU, all-reduce on gloo",
              file=sys.stderr, flush=True)
        collective_device = torch.device("cpu")
        if args.expect_gpus:
            checks.append(Check("gpus.visible", False, 0, args.expect_gpus, "GPUs", "CUDA is not available"))
        report.gemm_tflops = gemm_tflops(collective_device, args.gemm_n, args.gemm_iters, args.gemm_repeats,
                                         slowdown)

    if args.ckpt_dir:
        checks.extend(checkpoint_dir_checks(args.ckpt_dir, args.write_mb, args.min_write_mbps, args.min_free_gb,
                                            f"{node}-{world.rank}", args.min_free_reason))
    else:
        checks.append(Check("ckpt.write", None, detail="no --ckpt-dir given"))
    return report, collective_device


# ------------------------------------------------------------------------------ across nodes


def judge(reports: list[NodeReport], args, busbw: Optional[tuple[float, float]]) -> dict:
    """Compare nodes' GEMM speed with their median, set every node's exit code, and build the
    job-level report (identical on every rank: all computed from the gathered reports)."""
    speeds = [r.gemm_tflops for r in reports if r.gemm_tflops is not None]
    median = statistics.median(speeds) if speeds else None
    for r in reports:
        if r.gemm_tflops is None:
            continue
        floor = args.gemm_threshold * median
        ok = r.gemm_tflops >= floor and r.gemm_tflops >= args.min_tflops
        r.checks.append(Check("gemm", ok, r.gemm_tflops, f">= {_num(max(floor, args.min_tflops))}", "TFLOP/s",
                              f"slowest device; {args.gemm_threshold:g} x median {_num(median)} over {len(speeds)} node(s)"
                              + (f", --min-tflops {args.min_tflops:g}" if args.min_tflops else "")))
    job_failures = []
    allreduce = None
    if busbw is not None:
        algbw, bus = busbw
        allreduce = {"size_mb": args.allreduce_mb, "iters": args.allreduce_iters, "algbw_gbps": algbw, "busbw_gbps": bus,
                     "ok": bus >= args.min_busbw_gbps, "expected": f">= {args.min_busbw_gbps:g}"}
        if bus < args.min_busbw_gbps:
            job_failures.append({"check": "allreduce", "measured": bus, "expected": f">= {args.min_busbw_gbps:g}",
                                 "unit": "GB/s busbw", "detail": f"{len(reports)} processes"})
    bad = [r for r in reports if r.failures]
    for r in reports:
        r.exit_code = EXIT_BAD_NODE if r.failures else (EXIT_OTHERS_BAD if bad or job_failures else EXIT_OK)
    exclude = sorted({r.node for r in bad})
    return {
        "ok": not bad and not job_failures,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "world_size": len(reports),
        "thresholds": {k: getattr(args, k) for k in ("gemm_threshold", "min_tflops", "min_busbw_gbps",
                                                     "min_write_mbps", "min_free_gb", "min_gpu_free_frac",
                                                     "expect_gpus")},
        "gemm_median_tflops": median,
        "allreduce": allreduce,
        "bad_nodes": [{"node": r.node, "hostname": r.hostname, "rank": r.rank,
                       "failures": [_brief(c) for c in r.failures]} for r in bad],
        "job_failures": job_failures,
        "exclude": f"--exclude={','.join(exclude)}" if exclude else None,
        "nodes": [asdict(r) for r in reports],
    }


def _brief(c: Check) -> dict:
    return {"check": c.name, "measured": c.measured, "expected": c.expected, "unit": c.unit, "detail": c.detail}


def _num(v: float) -> str:
    """Three significant digits or more: 1,092 / 81.26 / 0.0412."""
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return _num(v)
    return "-" if v is None else str(v)


def render(summary: dict, reports: list[NodeReport], full: bool) -> str:
    lines = []
    if full:  # one node: every check
        r = reports[0]
        lines.append(f"preflight on {r.node} (rank {r.rank}, {r.device})")
        rows = [("check", "status", "measured", "expected", "detail")]
        for c in r.checks:
            status = "skip" if c.ok is None else "ok" if c.ok else "FAIL"
            rows.append((c.name, status, f"{_fmt(c.measured)} {c.unit}".strip(), _fmt(c.expected), c.detail))
        lines += _table(rows)
    else:
        rows = [("node", "rank", "gemm TFLOP/s", "ckpt MB/s", "ckpt free GB", "status")]
        for r in reports:
            get = {c.name: c.measured for c in r.checks}
            status = "ok" if not r.failures else "BAD: " + ", ".join(c.name for c in r.failures)
            rows.append((r.node, str(r.rank), _fmt(r.gemm_tflops), _fmt(get.get("ckpt.write")),
                         _fmt(get.get("ckpt.free")), status))
        lines += _table(rows)
    ar = summary["allreduce"]
    if ar:
        lines.append(f"all-reduce {ar['size_mb']:g} MB x {ar['iters']} over {summary['world_size']} processes: "
                     f"busbw {_num(ar['busbw_gbps'])} GB/s (algbw {_num(ar['algbw_gbps'])} GB/s)"
                     + ("" if ar["ok"] else f"  FAIL, expected {ar['expected']}"))
    for b in summary["bad_nodes"]:
        for f in b["failures"]:
            lines.append(f"BAD {b['node']} (host {b['hostname']}, rank {b['rank']}): {f['check']} measured "
                         f"{_fmt(f['measured'])} {f['unit']}, expected {_fmt(f['expected'])}"
                         + (f" ({f['detail']})" if f["detail"] else ""))
    for f in summary["job_failures"]:
        lines.append(f"FAIL (job) {f['check']}: measured {_fmt(f['measured'])} {f['unit']}, expected {f['expected']}")
    if summary["ok"]:
        lines.append(f"preflight: all {summary['world_size']} node(s) passed")
    else:
        lines.append(f"preflight: {len(summary['bad_nodes'])} of {summary['world_size']} node(s) bad"
                     + (f"; resubmit with {summary['exclude']}" if summary["exclude"] else ""))
    return "\n".join(lines)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


# ------------------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # exit 2 is reserved for "this node is bad"
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    p = Parser(prog="python -m launch.preflight", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the full report (all nodes) here; rank 0 writes it")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--expect-gpus", type=int, help="GPUs every node must show (default: any number)")
    p.add_argument("--min-gpu-free-frac", type=float, default=0.9, help="free GPU memory / total (default 0.9)")
    p.add_argument("--gemm-n", type=int, help="matrix size (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--gemm-iters", type=int, help="matmuls per timing (default 20 on GPU, 4 on CPU)")
    p.add_argument("--gemm-repeats", type=int, default=3, help="timings; the best counts (default 3)")
    p.add_argument("--gemm-threshold", type=float, default=0.9,
                   help="flag a node (GPU) below this fraction of the median over nodes (this node's GPUs); "
                        "default 0.9")
    p.add_argument("--min-tflops", type=float, default=0.0, help="absolute GEMM floor per node (default off)")
    p.add_argument("--allreduce-mb", type=float, help="all-reduce size (default 256 MB on GPU, 32 MB on CPU)")
    p.add_argument("--allreduce-iters", type=int, default=10, help="timed all-reduces (default 10)")
    p.add_argument("--min-busbw-gbps", type=float, default=0.0,
                   help="all-reduce bus bandwidth floor in GB/s (default off: set it from a known-good run)")
    p.add_argument("--ckpt-dir", help="checkpoint directory to test (created if missing)")
    p.add_argument("--write-mb", type=float, default=256, help="MB written + fsynced (default 256)")
    p.add_argument("--min-write-mbps", type=float, default=100, help="write speed floor in MB/s (default 100)")
    p.add_argument("--min-free-gb", type=float, default=None,
                   help="free space floor in GB (default: derived from --config: the checkpoint size of its model "
                        "with optimizer state x (checkpoint.keep_last + 1) x 1.2; 100 without --config)")
    p.add_argument("--config", help="the run's recipe: derives --min-free-gb from its checkpoint size")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of the recipe, as given to launch.pretrain (repeatable)")
    p.add_argument("--store-endpoint", help="HOST:PORT of a running TCPStore (launch.rdzv_store) to meet the "
                                            "other nodes through, instead of MASTER_ADDR/MASTER_PORT")
    p.add_argument("--timeout-s", type=float, default=300, help="rendezvous and collective timeout (default 300)")
    return p


def derive_min_free(args) -> None:
    """--min-free-gb from the recipe's checkpoint size, unless given; the reason goes with it."""
    args.min_free_reason = ""
    if args.min_free_gb is not None:
        args.min_free_reason = "--min-free-gb as given"
        return
    if not args.config:
        args.min_free_gb = 100.0
        args.min_free_reason = "the default without --config"
        return
    from megatron_tts.config import ConfigError, checkpoint_space_bytes, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        raise UsageError(f"--config {args.config}: {e}") from None
    need, why = checkpoint_space_bytes(cfg)
    args.min_free_gb = need / 1e9
    args.min_free_reason = why


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        derive_min_free(args)
        world = world_from_env()
        parse_slowdown(os.environ.get(SLOWDOWN_ENV, ""))
        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank if world.local_size > 1 else 0)
        distributed = init_distributed(world, args.store_endpoint, backend, args.timeout_s)
    except UsageError as e:
        print(f"preflight: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        print(f"preflight: error: could not join the other processes: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        report, device = node_checks(args, world)
        busbw = None
        if distributed:
            busbw = allreduce_busbw(device, args.allreduce_mb, args.allreduce_iters)
            gathered: list = [None] * world.size
            dist.all_gather_object(gathered, report)
            reports = gathered
        else:
            reports = [report]
        summary = judge(reports, args, busbw)
        mine = next(r for r in reports if r.rank == world.rank)
    except UsageError as e:
        print(f"preflight: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        print(f"preflight: error on {socket.gethostname()} rank {world.rank}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return EXIT_ERROR
    if mine.failures and world.rank != 0:  # rank 0's output names it too; this line is in this node's log
        for c in mine.failures:
            print(f"preflight: BAD {mine.node} rank {mine.rank}: {c.name} measured {_fmt(c.measured)} {c.unit}, "
                  f"expected {_fmt(c.expected)}", file=sys.stderr, flush=True)
    if world.rank == 0:
        print(render(summary, reports, full=len(reports) == 1), flush=True)
        if args.json:
            tmp = f"{args.json}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1, default=str)
            os.replace(tmp, args.json)
    if distributed:
        # torchrun SIGTERMs the other workers as soon as one exits non-zero: from here on, a
        # SIGTERM ends this process with its verdict, so that the agent (and srun) see each
        # node's own code, whoever exits first.
        code = mine.exit_code
        signal.signal(signal.SIGTERM, lambda *_: _leave(code))
        try:
            dist.barrier()
        except Exception:  # the verdict is out; a peer that left early must not turn it into 1
            pass
    return mine.exit_code


def _leave(code: int) -> None:
    """Exit now, skipping interpreter shutdown: Python restores the default SIGTERM action while
    it finalizes (and torch's teardown is slow), which would turn a verdict into -15."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _leave(main())
