"""On a CUDA machine: the autotune memory seam reads the caching allocator's peak against the
device's memory, and a one-GPU run with train.micro_batch_size=auto sweeps on the device and
records its choice. Skipped without CUDA (no GPU was lent when this was written: see
docs/benchmarks.md)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import SMALL, pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_probe_sees_the_peak_and_the_device_limit():
    from megatron_tts.autotune import CudaMemory, memory_probe

    probe = memory_probe(torch.device("cuda", 0))
    assert isinstance(probe, CudaMemory)
    probe.reset()
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del x
    assert probe.peak() >= 256 * 2**20
    total = torch.cuda.mem_get_info()[1]
    assert 0 < probe.limit(0.1) <= 0.9 * total + 1


def test_gpu_run_tunes_the_micro_batch(tmp_path):
    r = pretrain(str(tmp_path), SMALL + ["train.dtype=bf16", "parallel.backend=nccl", "model.layer_spec=local",
                                         "train.steps=2", "train.micro_batch_size=auto",
                                         "autotune.micro_batch_sizes=[1,2,4,8]"], nproc=1)
    assert r.returncode == 0, r.output[-3000:]
    with open(os.path.join(str(tmp_path), "autotune.json")) as f:
        saved = json.load(f)
    assert saved["fingerprint"]["device"] != "cpu"
    assert all(m["status"] == "ok" for m in saved["candidates"]), saved["candidates"]
    assert all(m["peak_memory_bytes"] > 0 for m in saved["candidates"])
