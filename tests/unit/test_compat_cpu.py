"""megatron_tts.compat.cpu: every redirection of megatron-core's hard-coded CUDA calls, and one real
megatron-core GPTModel forward + backward on CPU through it."""

from __future__ import annotations

import importlib.metadata
import math
import os
import socket
import threading

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("the CPU compatibility layer is a no-op on CUDA machines", allow_module_level=True)

import megatron_tts.compat as compat  # noqa: E402
from megatron_tts.compat import cpu as cpu_compat  # noqa: E402

from tests.helpers import SMALL  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", autouse=True)
def applied():
    assert cpu_compat.apply() is True
    assert cpu_compat.is_active()


def test_apply_is_idempotent():
    import torch.overrides

    stubbed = dict(
        current_device=torch.cuda.current_device, current_stream=torch.cuda.current_stream,
        Stream=torch.cuda.Stream, Event=torch.cuda.Event,
    )
    for _ in range(3):
        assert cpu_compat.apply() is True
    assert cpu_compat.is_active()
    assert dict(current_device=torch.cuda.current_device, current_stream=torch.cuda.current_stream,
                Stream=torch.cuda.Stream, Event=torch.cuda.Event) == stubbed
    # the device mode is pushed once per thread, however often apply() runs
    modes = [m for m in torch.overrides._get_current_function_mode_stack() if isinstance(m, cpu_compat.CpuDeviceMode)]
    assert len(modes) == 1


def test_cuda_requests_give_cpu_tensors():
    t = torch.ones(2)
    results = {
        "empty(device='cuda')": torch.empty(3, device="cuda"),
        "empty(device='cuda:0')": torch.empty(3, device="cuda:0"),
        "zeros(device=current_device())": torch.zeros(2, device=torch.cuda.current_device()),
        "zeros(device=0)": torch.zeros(2, device=0),
        "tensor(device=torch.device('cuda'))": torch.tensor([1.0], device=torch.device("cuda")),
        "t.cuda()": t.cuda(),
        "t.to('cuda')": t.to("cuda"),
        "t.to(torch.device('cuda', 0))": t.to(torch.device("cuda", 0)),
        "t.to(device='cuda')": t.to(device="cuda"),
        "t.pin_memory()": t.pin_memory(),
        "empty(pin_memory=True)": torch.empty(2, pin_memory=True),
    }
    for what, r in results.items():
        assert r.device.type == "cpu", what
    assert t.to("cuda", torch.float64).dtype == torch.float64  # the other arguments still apply
    assert torch.cuda.device_count() == 0


def test_tensor_type_reports_cuda_names():
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.zeros(1, dtype=torch.int64).type() == "torch.LongTensor"  # only float names are mapped
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # type(dtype) still converts


def test_device_mode_is_per_thread():
    seen = {}

    def worker():
        seen["before"] = torch.zeros(1).type()
        cpu_compat.apply()  # what every thread that calls into megatron does
        seen["after"] = torch.zeros(1).type()
        seen["device"] = torch.empty(1, device="cuda").device.type

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert seen == {"before": "torch.FloatTensor", "after": "torch.cuda.FloatTensor", "device": "cpu"}


def test_streams_and_events_are_noops():
    ev = torch.cuda.Event()
    ev.record()
    stream = torch.cuda.current_stream()
    assert stream.wait_event(ev) is None
    assert stream.wait_stream(torch.cuda.default_stream()) is None
    assert stream.query() is True
    with torch.cuda.stream(torch.cuda.Stream()):
        pass
    torch.cuda.synchronize()
    assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.memory_allocated() == 0


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    saved = tracker.get_states(), set(tracker.seeds_)
    try:
        tracker.reset()
        tracker.add("model-parallel-rng", 1234)
        torch.manual_seed(7)
        default_state = torch.get_rng_state()
        with tracker.fork():
            forked = torch.rand(8)
        # the default CPU stream is exactly where it was
        assert torch.equal(torch.get_rng_state(), default_state)
        outside = torch.rand(8)
        assert not torch.equal(forked, outside)
        torch.manual_seed(7)
        assert torch.equal(torch.rand(8), outside)
        # the fork advances its own state ...
        with tracker.fork():
            forked_next = torch.rand(8)
        assert not torch.equal(forked_next, forked)
        # ... and re-adding the same seed reproduces the stream
        tracker.reset()
        tracker.add("model-parallel-rng", 1234)
        with tracker.fork():
            assert torch.equal(torch.rand(8), forked)
        with pytest.raises(RuntimeError, match="already exists"):
            tracker.add("other", 1234)
        with pytest.raises(RuntimeError, match="is not added"):
            with tracker.fork("nope"):
                pass
        # the state survives a restore through get/set_states (checkpointing)
        states = tracker.get_states()
        with tracker.fork():
            a = torch.rand(4)
        tracker.set_states(states)
        with tracker.fork():
            assert torch.equal(torch.rand(4), a)
    finally:
        tracker.reset()
        tracker.set_states(saved[0])
        tracker.seeds_ = saved[1]


def test_version_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compat.importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.raises(compat.VersionError) as info:
        compat.check_versions()
    msg = str(info.value)
    assert "0.19.2" in msg and "0.99.0" in msg and "make install" in msg and "WORKAROUNDS" in msg


def test_missing_megatron_is_a_clear_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(compat.importlib.metadata, "version", missing)
    with pytest.raises(compat.VersionError, match="megatron-core is not installed"):
        compat.check_versions()


def test_an_unchecked_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "3.0.0")
    with pytest.raises(compat.VersionError, match="torch 3.0.0 is not one of the checked releases"):
        compat.check_versions()


def test_import_megatron_core_works():
    import megatron.core  # noqa: F401
    from megatron.core.pipeline_parallel import get_forward_backward_func  # reaches the MoE triton module

    assert callable(get_forward_backward_func)
    try:
        import triton  # noqa: F401
    except ImportError:
        stub = __import__("sys").modules["megatron.core.transformer.moe.ops.paged_stash"]
        assert stub.GLOBAL_BLOCK_SIZE == 1024
        with pytest.raises(RuntimeError, match="need triton"):
            stub.paged_stash_copy_kernel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpt_model_forward_backward_on_cpu(monkeypatch):
    """A real megatron-core TP=1 GPTModel (local spec) through megatron's no-pipelining schedule."""
    import torch.distributed as dist

    from megatron_tts.config import load_config, padded_vocab_size
    from megatron_tts.model import build_model_chunks
    from megatron_tts.parallel import destroy_distributed, init_distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    seq = 32
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      SMALL + ["model.transformer.num_layers=2", f"data.seq_len={seq}", "train.dtype=fp32"])
    assert not dist.is_initialized()
    layout = init_distributed(cfg)
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and layout.world_size == 1
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(cfg.train.seed)
        model_parallel_cuda_manual_seed(cfg.train.seed)
        (model,) = build_model_chunks(cfg)
        assert all(p.device.type == "cpu" for p in model.parameters())
        vocab = padded_vocab_size(cfg)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 520, (2, seq + 1), generator=g)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        position_ids = torch.arange(seq).expand(2, seq)
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).expand(2, 1, seq, seq)

        def forward_step(data_iterator, m):
            next(data_iterator)
            out = m(inputs, position_ids, mask, labels=labels)  # per-token losses [B, S]

            def loss_func(losses):
                n = torch.tensor(losses.numel(), dtype=torch.int)
                return losses.float().sum(), n, {"lm": torch.stack([losses.detach().sum(), n.float()])}

            return out, loss_func

        model.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=model, num_microbatches=1,
            seq_length=seq, micro_batch_size=2, forward_only=False,
        )
        loss_sum, n = out[0]["lm"].tolist()
        loss = loss_sum / n
        assert math.isfinite(loss)
        assert abs(loss - math.log(vocab)) < 1.0  # a fresh model is close to uniform
        grads = {name: p.grad if p.grad is not None else getattr(p, "main_grad", None)
                 for name, p in model.named_parameters() if p.requires_grad}
        assert grads and all(gr is not None for gr in grads.values()), [k for k, v in grads.items() if v is None]
        assert all(torch.isfinite(gr).all() for gr in grads.values())
        assert sum(float(gr.abs().sum()) for gr in grads.values()) > 0

        # the logits path (no labels) gives [B, S, vocab]
        with torch.no_grad():
            logits = model(inputs, position_ids, mask)
        assert logits.shape == (2, seq, vocab) and torch.isfinite(logits).all()
    finally:
        destroy_distributed()
    assert not dist.is_initialized()
