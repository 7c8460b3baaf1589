"""Run real megatron-core (TP, SP, PP, DP, distributed optimizer, dist_checkpointing) on CPU with gloo.

megatron-core hard-codes CUDA in a handful of places (the rows of megatron_tts.compat.WORKAROUNDS
give each file:line). This module redirects exactly those, and nothing else, so the same
training code runs on a laptop, in CI and on a GPU cluster:

- ``prepare_import()``: a stand-in for the one triton MoE kernel module that ``import
  megatron.core`` reaches (only sys.modules is touched; megatron_tts.compat.mcore calls it);
- ``apply()``, in a training process without CUDA (megatron_tts.parallel.init_distributed):
  ``torch.cuda.current_device/synchronize/current_stream/Stream/Event`` as CPU no-ops; a
  ``TorchFunctionMode`` that maps ``device="cuda"``, ``.cuda()``, ``.to("cuda")`` and
  ``pin_memory`` to CPU and reports CPU float tensors as ``torch.cuda.*Tensor`` to the
  ``tensor.type()`` checks in clip_grads / distrib_optimizer; an RNG tracker that forks the CPU
  generator instead of the CUDA one.

``apply()`` is a no-op when CUDA is available. Because TorchFunctionMode is thread-local, it must
also run in every thread or spawned process that calls into megatron-core (``enter_device_mode()``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)
_applied = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply() -> bool:
    """Install the CPU layer if CUDA is absent. Idempotent; returns True when it is active."""
    global _applied
    if cuda_available():
        return False
    if _applied:
        enter_device_mode()
        return True
    from megatron_tts.compat import check_versions

    check_versions()
    prepare_import()
    _patch_cuda_runtime()
    enter_device_mode()
    _patch_rng_tracker()
    _applied = True
    log.debug("megatron-core CPU compatibility layer active")
    return True


def is_active() -> bool:
    return _applied


def prepare_import() -> None:
    """`import megatron.core` reaches an MoE triton kernel module; dense models never call it.
    Without triton, a stand-in module that raises if called. Touches sys.modules only."""
    try:
        import triton  # noqa: F401

        return
    except ImportError:
        pass
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return
    mod = types.ModuleType(name)

    def _unavailable(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("MoE paged-stash kernels need triton, which is not installed")

    mod.GLOBAL_BLOCK_SIZE = 1024
    mod.paged_stash_copy_kernel = _unavailable
    mod.paged_stash_pop_kernel = _unavailable
    mod.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[name] = mod


class _NoOpStream:
    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def wait_event(self, *_a: Any) -> None:
        pass

    def wait_stream(self, *_a: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _NoOpEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_NoOpStream":
        return self

    def __exit__(self, *_a: Any) -> None:
        pass


class _NoOpEvent:
    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def record(self, *_a: Any) -> None:
        pass

    def wait(self, *_a: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_cuda_runtime() -> None:
    c = torch.cuda
    # A device string, not an index: megatron passes it as `device=` in autograd backward
    # functions too, where our (thread-local) TorchFunctionMode is not in effect.
    c.current_device = lambda: "cpu"
    c.device_count = lambda: 0
    c.synchronize = lambda *_a, **_k: None
    c.current_stream = lambda *_a, **_k: _NoOpStream()
    c.default_stream = lambda *_a, **_k: _NoOpStream()
    c.Stream = _NoOpStream
    c.Event = _NoOpEvent
    c.stream = lambda *_a, **_k: contextlib.nullcontext()
    c.set_device = lambda *_a, **_k: None
    c.is_current_stream_capturing = lambda: False
    c.memory_allocated = lambda *_a, **_k: 0
    c.max_memory_allocated = lambda *_a, **_k: 0
    c.memory_reserved = lambda *_a, **_k: 0
    c.empty_cache = lambda: None


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device
    return isinstance(dev, int) and not isinstance(dev, bool)


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class CpuDeviceMode(TorchFunctionMode):
    """Maps every request for a CUDA device to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


_mode_entered = __import__("threading").local()


def enter_device_mode() -> None:
    """Push the device mode on this thread (TorchFunctionMode stacks are thread-local)."""
    if getattr(_mode_entered, "mode", None) is None:
        mode = CpuDeviceMode()
        mode.__enter__()
        _mode_entered.mode = mode


class CpuRNGStatesTracker:
    """Megatron's model-parallel RNG tracker, forking the CPU generator instead of CUDA's.

    Dropout and activation recompute need real per-TP-rank forks, so this keeps named states
    exactly like megatron's CudaRNGStatesTracker does.
    """

    def __init__(self, *_a: Any, **_k: Any) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._initialized = False

    def is_initialized(self) -> bool:
        return self._initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def initialize_rng_tracker(*_a: Any, force_reset: bool = False, **_k: Any) -> None:
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    initialize_rng_tracker(force_reset=True)
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, a silent no-op without CUDA.


def defer_import_time_costs() -> Callable[[], None]:
    """While megatron.core imports, two of its module-level statements cost ~2.3 s of CPU in every
    process that imports it (halving `import megatron.core`):

    - ``megatron.core.jit``: ``jit_fuser = torch.compile``, then ``@jit_fuser`` on its fused
      bias/activation functions; ``torch.compile(fn)`` imports torch._dynamo and _inductor (~1.7 s)
      although nothing is compiled until the function is called. Here ``torch.compile`` of a plain
      function returns a wrapper that calls the real ``torch.compile`` at its first call: the same
      compiled function, only its import deferred to first use. (A training process imports
      torch._dynamo anyway when torch.optim builds the optimizer; the CLIs that build none -
      plan, export, verify, preflight, a refused config - do not.)
    - ``megatron.core.timers``: ``try: import wandb`` for a timers writer we never pass (~0.7 s):
      hidden while megatron imports (it takes the ImportError branch), visible again afterwards
      for our own wandb sink.

    Returns the function that undoes both (call it right after the import)."""
    import functools
    import inspect

    real_compile = torch.compile

    def compile_at_first_call(model=None, **kwargs):
        if model is None:  # @torch.compile(mode=...)
            return lambda fn: compile_at_first_call(fn, **kwargs)
        if not inspect.isfunction(model):
            return real_compile(model, **kwargs)
        compiled = None

        @functools.wraps(model)
        def run(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **kw)

        return run

    torch.compile = compile_at_first_call
    hide_wandb = "wandb" not in sys.modules
    if hide_wandb:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError

    def undo() -> None:
        torch.compile = real_compile
        if hide_wandb and "wandb" in sys.modules and sys.modules["wandb"] is None:
            del sys.modules["wandb"]

    return undo
