"""On a CUDA machine: the same entry point trains with NCCL and bf16. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SMALL, pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_trains_on_gpu_with_nccl_and_bf16(tmp_path):
    r = pretrain(str(tmp_path), SMALL + ["train.steps=5", "train.dtype=bf16", "parallel.backend=nccl",
                                         "model.layer_spec=local"], nproc=1)
    assert r.returncode == 0, r.output[-3000:]
    losses = r.losses()
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert all(l == l for l in losses.values())  # finite, not NaN
