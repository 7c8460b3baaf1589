"""A run stopped at step k and resumed matches the uninterrupted run: bitwise on CPU.
A checkpoint written under one layout resumes under another (resharding)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from tests.helpers import LAYOUT_BASE as BASE
from tests.helpers import LAYOUT_STEPS as STEPS
from tests.helpers import LAYOUT_STOP as STOP
from tests.helpers import pretrain
from tests.reference_runs import reference_run


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    """The model tensors of the last checkpoint, gathered from the dist checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}")
    with tempfile.TemporaryDirectory() as tmp:  # the run may be a shared reference: never write into it
        out = os.path.join(tmp, "final.pt")
        dcp_to_torch_save(ckpt, out)
        sd = torch.load(out, weights_only=False)
    del FileSystemReader
    return {k: v for k, v in sd.items() if k.startswith(("embedding.", "decoder.", "output_layer.")) and
            isinstance(v, torch.Tensor)}


def run_pair(tmp_path, tmp_path_factory, nproc: int, overrides: list[str]):
    full = reference_run(tmp_path_factory, BASE + overrides, nproc=nproc)
    assert full.returncode == 0, full.output[-3000:]
    part = pretrain(str(tmp_path / "part"), BASE + overrides + [f"train.stop_after={STOP}"], nproc=nproc)
    assert part.returncode == 0, part.output[-3000:]
    assert max(part.losses()) == STOP
    resumed = pretrain(str(tmp_path / "part"), BASE + overrides + ["train.resume=auto"], nproc=nproc)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from" in resumed.output
    return full, resumed


def assert_bitwise(full, resumed):
    a = {r["step"]: r for r in full.metrics() if "loss" in r}
    b = {r["step"]: r for r in resumed.metrics() if "loss" in r}
    for step in range(STOP + 1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "consumed_tokens", "consumed_samples"):
            assert a[step][key] == b[step][key], f"step {step} {key}: {a[step][key]!r} != {b[step][key]!r}"
    wa, wb = final_weights(full.run_dir), final_weights(resumed.run_dir)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"final weight {k} differs"


@pytest.mark.parametrize("name,nproc,overrides", [
    ("tp2", 2, ["parallel.tp=2"]),
    # Several DDP buckets: megatron-core 0.19.2 corrupted multi-bucket distributed-optimizer
    # resumes in one checkpoint format (notes/megatron-core-cpu.md). (A single-bucket variant
    # proved nothing more and cost CI 30 s.)
    ("dp2_distopt_buckets", 2, ["optim.distributed=true", "parallel.ddp.bucket_size=20000"]),
])
def test_resume_is_bitwise(name, nproc, overrides, tmp_path, tmp_path_factory):
    full, resumed = run_pair(tmp_path, tmp_path_factory, nproc, overrides)
    assert_bitwise(full, resumed)


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    r = reference_run(tmp_path_factory, BASE + ["parallel.tp=2"], nproc=2)
    assert r.returncode == 0, r.output[-3000:]
    return r


@pytest.mark.parametrize("name,nproc,overrides", [
    ("tp1", 1, []),
    ("pp2", 2, ["parallel.pp=2"]),
])
def test_tp2_checkpoint_reshards(name, nproc, overrides, tp2_run, tmp_path):
    ckpt = os.path.join(tp2_run.run_dir, "checkpoints", f"step_{STOP:08d}")
    r = pretrain(str(tmp_path), BASE + overrides + [f"train.resume={ckpt}"], nproc=nproc)
    assert r.returncode == 0, r.output[-3000:]
    ref, got = tp2_run.losses(), r.losses()
    assert min(got) == STOP + 1, "the resharded run must continue after the checkpoint's step"
    assert abs(got[STOP + 1] - ref[STOP + 1]) <= 1e-5, (got, ref)
    for step in got:
        assert abs(got[step] - ref[step]) <= 1e-5, f"step {step}: {got[step]} vs {ref[step]}"
