"""The one place that knows megatron-core and torch internals.

Everything here depends on the pinned versions (``PINNED``): the CPU layer (``cpu``), the
optimizer fixes (``optimizer``), the dist_checkpointing / torch DCP hooks (``dist_ckpt``), the
elastic-restart store (``elastic``) and the single import point of megatron.core (``mcore``).
Every workaround is a row of ``WORKAROUNDS`` with the upstream file:line it answers and the test
that proves it is still needed; tests/unit/test_compat.py checks that each anchor still reads
as recorded, so an upgrade fails loudly until every row is re-checked.

Import order matters only once: ``megatron_tts.compat.mcore`` installs the import-time stand-in
(``cpu.prepare_import``) and then imports megatron.core. Nothing patches ``torch.cuda`` until
``activate()`` runs, which ``megatron_tts.parallel.init_distributed`` calls on a machine
without CUDA: loading a config has no side effects.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

PINNED = {"megatron-core": "0.19.2"}
TORCH_SUPPORTED = ("2.11", "2.12", "2.13", "2.14")  # major.minor: CPU wheel here, CUDA builds on the cluster


class VersionError(RuntimeError):
    """An installed megatron-core or torch that the workarounds were not checked against."""


def check_versions() -> None:
    """Refuse versions whose internals the workarounds below were not verified against."""
    for dist, want in PINNED.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError as e:
            raise VersionError(f"{dist} is not installed: run `make install`") from e
        if have != want:
            raise VersionError(f"megatron_tts.compat works around {dist} {want} internals but {have} is installed; "
                               f"install {dist}=={want} (`make install`), or re-check every row of "
                               f"megatron_tts.compat.WORKAROUNDS against {have} and update PINNED")
    import torch

    if not torch.__version__.startswith(TORCH_SUPPORTED):
        raise VersionError(f"torch {torch.__version__} is not one of the checked releases {TORCH_SUPPORTED}; "
                           "re-check the torch rows of megatron_tts.compat.WORKAROUNDS and extend TORCH_SUPPORTED")


@dataclass(frozen=True)
class Workaround:
    name: str
    """What we do instead."""
    upstream: str
    """The upstream file:line (site-packages relative) that needs it."""
    anchor: str
    """Text that line still holds (tests/unit/test_compat.py checks it)."""
    where: str
    """Our module that implements it."""
    test: str
    """The test that fails without it."""


_M = "megatron/core/"
WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround("torch.compile of megatron's fused functions deferred to their first call while megatron imports",
               _M + "jit.py:21", "jit_fuser = torch.compile", "compat.cpu.defer_import_time_costs",
               "tests/unit/test_compat.py::test_megatron_import_time_costs_are_deferred"),
    Workaround("wandb hidden from megatron's timers while megatron imports (we pass no timers writer)",
               _M + "timers.py:13", "import wandb", "compat.cpu.defer_import_time_costs",
               "tests/unit/test_compat.py::test_megatron_import_time_costs_are_deferred"),
    Workaround("stand-in for the triton MoE kernel module that `import megatron.core` reaches",
               _M + "transformer/moe/ops/paged_stash.py:4", "import triton", "compat.cpu.prepare_import",
               "tests/unit/test_compat.py::test_megatron_imports_without_triton"),
    Workaround("model-parallel RNG tracker on the CPU generator",
               _M + "tensor_parallel/random.py:303", "torch.cuda.get_rng_state()", "compat.cpu.CpuRNGStatesTracker",
               "tests/unit/test_compat_cpu.py::test_rng_tracker_forks_the_cpu_generator"),
    Workaround("cuda device requests mapped to the CPU (TorchFunctionMode)",
               _M + "models/common/embeddings/rotary_pos_embedding.py:162", "torch.cuda.current_device()",
               "compat.cpu.CpuDeviceMode", "tests/unit/test_compat_cpu.py::test_cuda_requests_give_cpu_tensors"),
    Workaround("cuda device requests mapped to the CPU (TorchFunctionMode)",
               _M + "pipeline_parallel/schedules.py:749", 'device="cuda"', "compat.cpu.CpuDeviceMode",
               "tests/unit/test_compat_cpu.py::test_gpt_model_forward_backward_on_cpu"),
    Workaround("cuda device requests mapped to the CPU (TorchFunctionMode)",
               _M + "transformer/utils.py:39", 'device="cuda"', "compat.cpu.CpuDeviceMode",
               "tests/unit/test_compat_cpu.py::test_cuda_requests_give_cpu_tensors"),
    Workaround("no-op CUDA streams and events",
               _M + "distributed/param_and_grad_buffer.py:632", "torch.cuda.current_stream()",
               "compat.cpu._patch_cuda_runtime", "tests/distributed/test_parallel_equivalence.py"),
    Workaround("no-op torch.cuda.synchronize (batched p2p)",
               _M + "pipeline_parallel/p2p_communication.py:419", "torch.cuda.synchronize()",
               "compat.cpu._patch_cuda_runtime", "tests/distributed/test_parallel_equivalence.py"),
    Workaround("CPU float tensors reported as torch.cuda.FloatTensor to type() checks",
               _M + "optimizer/clip_grads.py:174", "torch.cuda.FloatTensor", "compat.cpu.CpuDeviceMode",
               "tests/distributed/test_parallel_equivalence.py"),
    Workaround("CPU float tensors reported as torch.cuda.FloatTensor to type() checks",
               _M + "optimizer/distrib_optimizer.py:466", "torch.cuda.FloatTensor", "compat.cpu.CpuDeviceMode",
               "tests/distributed/test_resume.py"),
    Workaround("non-persistent async checkpoint writer (the persistent one divides by device_count())",
               _M + "dist_checkpointing/strategies/async_utils.py:565", "rank % torch.cuda.device_count()",
               "compat.dist_ckpt.async_calls_queue", "tests/integration/test_checkpoint_faults.py"),
    Workaround("batched p2p off on gloo (it reorders several sends between the same two ranks)",
               _M + "pipeline_parallel/p2p_communication.py:263", "torch.cuda.synchronize()",
               "compat.batch_p2p_supported", "tests/distributed/test_parallel_equivalence.py"),
    Workaround("SP-capable RMSNorm instead of torch's (asserts under sequence parallelism)",
               _M + "transformer/torch_norm.py:50", "sequence parallel not supported", "norm.LocalRMSNorm",
               "tests/distributed/test_parallel_equivalence.py"),
    Workaround("one Adam `step` tensor per param after a distributed-optimizer load (shared: drifts)",
               _M + "optimizer/distrib_optimizer.py:1028", "step = torch.tensor(steps[0], dtype=torch.float)",
               "compat.optimizer.unshare_adam_steps", "tests/distributed/test_resume.py"),
    Workaround("Adam states initialised before a distributed-optimizer load",
               _M + "optimizer/distrib_optimizer.py:839", "assert len(steps) == 1", "compat.optimizer.init_optimizer_states",
               "tests/distributed/test_resume.py"),
    Workaround("missing 'step' entry tolerated in fully_reshardable loads (KeyError)",
               _M + "optimizer/distrib_optimizer.py:1223", "if not isinstance(tensors[key], torch.Tensor):",
               "compat.optimizer.apply", "tests/distributed/test_resume.py"),
    Workaround("allow-list unpickling of DCP .metadata (upstream runs pickled code)",
               "torch/distributed/checkpoint/filesystem.py:930", "pickle.load(metadata_file)",
               "compat.dist_ckpt.safe_unpickling", "tests/integration/test_checkpoint_faults.py"),
    Workaround("pickled objects in shards through torch.load(weights_only=True)",
               "torch/distributed/checkpoint/default_planner.py:387", "torch.load(value, weights_only=False)",
               "compat.dist_ckpt.safe_unpickling", "tests/integration/test_checkpoint_faults.py"),
    Workaround("a failure while rank 0 writes .metadata reaches every rank (upstream: the others hang)",
               _M + "dist_checkpointing/strategies/state_dict_saver.py:243", "storage_writer.finish(",
               "compat.dist_ckpt.finalize_on_all_ranks", "tests/integration/test_checkpoint_faults.py"),
    Workaround("checkpoint results queue warmed up in the background; stale results drained",
               _M + "dist_checkpointing/strategies/filesystem_async.py:65", "ctx.Manager().Queue()",
               "compat.dist_ckpt.results_queue_warmup", "bench/ckpt_kill_trials.py"),
    Workaround("metadata.json written by rank 0 in our commit, not in a finalize barrier",
               _M + "dist_checkpointing/serialization.py:453", "torch.distributed.barrier()",
               "compat.dist_ckpt.save_request", "tests/integration/test_checkpoint_faults.py"),
    Workaround("process group on a per-rendezvous-round prefix of torchrun's shared store "
               "(stale peer addresses after a restart: pytorch#135712)",
               "torch/distributed/rendezvous.py:189", "We create a new TCPStore for every retry",
               "compat.elastic.worker_store", "tests/integration/test_elastic.py::test_plain_torchrun_kill9_restarts_are_bitwise_invisible"),
)


def batch_p2p_supported(backend: str) -> bool:
    """gloo does not keep the order of a batch of sends and receives between the same two ranks
    (pp=2 interleaved: next == prev): messages land in the wrong buffers."""
    return backend == "nccl"


def activate() -> bool:
    """Apply everything a training process needs: the CPU layer where CUDA is absent and the
    optimizer fixes. Idempotent; True when the CPU layer is active."""
    from megatron_tts.compat import cpu, mcore, optimizer  # noqa: F401 - mcore first: the import stand-in

    optimizer.apply()
    return cpu.apply()


def cpu_active() -> bool:
    from megatron_tts.compat import cpu

    return cpu.is_active()
