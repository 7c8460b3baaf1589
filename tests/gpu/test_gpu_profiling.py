"""On a CUDA machine: CUDA-event spans see queued GPU work that host timers miss; a training run
with an nsys capture window opens and closes it on the configured steps, reports GPU memory,
MFU and NVML stats; under Nsight Systems (when `nsys` is on PATH) the report holds our NVTX
phase ranges. Skipped without CUDA."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch

from tests.helpers import REPO, SMALL, env, pretrain, pretrain_cmd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU = SMALL + ["train.dtype=bf16", "parallel.backend=nccl", "model.layer_spec=local"]


def test_cuda_event_span_times_the_queued_gpu_work():
    import time

    from monitoring.timers import PhaseTimers

    t = PhaseTimers(enabled=True, nvtx=True, cuda=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with t.span("grad_sync"):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, enqueued in microseconds
    host = time.perf_counter() - t0
    torch.cuda.synchronize()  # the loop's statistics sync plays this part
    got = t.take(("grad_sync",))["grad_sync"]
    assert host < 0.02 < got, (host, got)


def test_nsys_window_memory_mfu_and_gpu_stats(tmp_path):
    r = pretrain(str(tmp_path), GPU + ["train.steps=6", "profiling.nsys_steps=[2,4]",
                                       "monitoring.gpu_stats_interval_s=0.5"])
    assert r.returncode == 0, r.output[-3000:]
    metrics = r.metrics()
    prof = [(m["kind"], m["action"], m["step"]) for m in metrics if m.get("event") == "profile"]
    assert prof == [("nsys", "start", 2), ("nsys", "stop", 3)]
    steps = [m for m in metrics if "event" not in m]
    for m in steps:
        assert m["mem"]["allocated_gb"] > 0 and m["mem"]["peak_gb"] >= m["mem"]["allocated_gb"]
        assert m["mem"]["reserved_gb"] >= m["mem"]["allocated_gb"]
        assert m["tflops_per_gpu"] > 0
        name = torch.cuda.get_device_name()
        if any(k in name for k in ("H100", "H200", "A100")):
            assert 0 < m["mfu"] < 1
    gpus = [m for m in metrics if m.get("event") == "gpu"]
    assert gpus, "no gpu event although NVML should work on a CUDA machine"
    g = gpus[-1]["gpus"][0]
    assert g["mem_total_gb"] > 10 and g["sm_clock_mhz"] > 0 and isinstance(g["throttle_reasons"], list)


@pytest.mark.skipif(shutil.which("nsys") is None, reason="Nsight Systems (nsys) is not on PATH")
def test_nsys_report_holds_the_phase_ranges(tmp_path):
    run_dir = str(tmp_path / "run")
    out = str(tmp_path / "report")
    cmd = ["nsys", "profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop", "--trace=cuda,nvtx",
           "--force-overwrite=true", f"--output={out}",
           *pretrain_cmd(run_dir, GPU + ["train.steps=5", "profiling.nsys_steps=[2,4]"], torchrun=False)]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    (rep,) = glob.glob(out + ".nsys-rep")
    stats = subprocess.run(["nsys", "stats", "--report", "nvtx_sum", "--format", "csv", rep], capture_output=True,
                           text=True, timeout=300)
    for name in ("forward_backward", "optimizer", "data", "step 2", "step 3"):
        assert name in stats.stdout, stats.stdout[-3000:]
    assert "step 4" not in stats.stdout  # the capture range closed before step 4
    assert os.path.getsize(rep) > 0
