"""megatron_tts.compat: the version check, the table of workarounds (each anchor still reads as
recorded upstream, each names a test that exists), the single megatron import point, and the
elastic-restart store."""

from __future__ import annotations

import base64
import datetime
import os
import pickle
import re
import subprocess
import sys
import sysconfig

import pytest
import torch.distributed as dist

from megatron_tts import compat
from megatron_tts.compat.elastic import rendezvous_round

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITE = sysconfig.get_paths()["purelib"]


@pytest.mark.parametrize("w", compat.WORKAROUNDS, ids=lambda w: w.upstream)
def test_each_workaround_still_answers_its_upstream_line(w):
    """An upgrade that moves or fixes the upstream code fails here: re-check the row, then update it."""
    path, line = w.upstream.rsplit(":", 1)
    with open(os.path.join(SITE, path)) as f:
        lines = f.read().splitlines()
    text = lines[int(line) - 1]
    assert w.anchor and w.anchor in text, f"{w.upstream} now reads {text.strip()!r}, not {w.anchor!r}: {w.name}"


@pytest.mark.parametrize("w", compat.WORKAROUNDS, ids=lambda w: w.upstream)
def test_each_workaround_names_a_real_test_and_module(w):
    file, _, name = w.test.partition("::")
    with open(os.path.join(REPO, file)) as f:
        source = f.read()
    if name:
        assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{w.test} does not exist"
    module, _, attr = ("megatron_tts." + w.where).rpartition(".")
    assert hasattr(__import__(module, fromlist=["x"]), attr), f"{w.where} does not exist"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_megatron_imports_without_triton():
    """Without triton, megatron.core's pipeline schedules do not import at all (the stand-in is
    still needed); through compat.mcore they do, and nothing in torch.cuda is patched."""
    try:
        import triton  # noqa: F401

        pytest.skip("triton is installed: the stand-in is not used")
    except ImportError:
        pass
    bare = _python("import megatron.core.pipeline_parallel")
    assert bare.returncode != 0 and "No module named 'triton'" in bare.stderr
    ours = _python("import torch; before = torch.cuda.current_device\n"
                   "from megatron_tts.compat.mcore import get_forward_backward_func\n"
                   "assert torch.cuda.current_device is before, 'patched'\nprint('ok')")
    assert ours.returncode == 0 and ours.stdout.strip() == "ok", ours.stderr[-2000:]


def test_megatron_import_time_costs_are_deferred():
    """Bare, `import megatron.core` pulls in torch._dynamo/_inductor (jit_fuser = torch.compile)
    and wandb (timers); through compat.mcore neither, torch.compile is the real one afterwards,
    wandb still imports for our own sink, and a jit_fuser'd megatron function computes as before."""
    probe = "import sys; print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'wandb') if m in sys.modules))"
    bare = _python("from megatron_tts.compat.cpu import prepare_import; prepare_import()\n"
                   "import megatron.core\n" + probe)
    assert bare.returncode == 0 and "torch._dynamo" in bare.stdout and "wandb" in bare.stdout, bare.stderr[-2000:]
    ours = _python("import os; os.environ['TORCHDYNAMO_DISABLE'] = '1'  # compiled = eager: no C++ build here\n"
                   "import torch; real = torch.compile\n"
                   "import megatron_tts.compat.mcore\n" + probe + "\n"
                   "assert torch.compile is real\n"
                   "from megatron.core.fusions.fused_bias_swiglu import swiglu\n"
                   "x = torch.randn(3, 8)\n"
                   "a, b = torch.chunk(x, 2, -1)\n"
                   "assert torch.allclose(swiglu(x), torch.nn.functional.silu(a) * b)\n"
                   "import wandb\nprint('ok')")
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert ours.stdout.split("\n")[:2] == ["[]", "ok"], ours.stdout


def test_loading_a_config_has_no_side_effects():
    r = _python("import torch; names = ['current_device', 'synchronize', 'current_stream', 'Stream', 'Event']\n"
                "before = {n: getattr(torch.cuda, n) for n in names}\n"
                "from megatron_tts.config import load_config\n"
                "load_config('configs/tiny.yaml', ['parallel.tp=2'])\n"
                "assert {n: getattr(torch.cuda, n) for n in names} == before\n"
                "from torch.overrides import _get_current_function_mode_stack\n"
                "assert not _get_current_function_mode_stack()\nprint('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_only_compat_imports_megatron():
    """Every other module takes megatron names from megatron_tts.compat.mcore."""
    offenders = []
    for root in ("megatron_tts", "launch", "data_pipeline", "monitoring", "storage"):
        for dirpath, _dirs, files in os.walk(os.path.join(REPO, root)):
            if os.sep + "compat" in dirpath:
                continue
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        if re.search(r"^\s*(from|import) megatron(\.|\s)", f.read(), re.M):
                            offenders.append(os.path.relpath(path, REPO))
    assert not offenders


def test_the_rendezvous_round_is_read_from_torchruns_store():
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    store = dist.HashStore()
    assert rendezvous_round(store, "job") is None  # no c10d rendezvous: the caller falls back
    state = dr._RendezvousState()
    state.round = 7
    node = dr._NodeDesc("host", 123, 0)
    state.participants[node] = 0
    state.last_heartbeats[node] = datetime.datetime.now(datetime.timezone.utc)
    store.set("torch.rendezvous.job", base64.b64encode(pickle.dumps(state)))
    assert rendezvous_round(store, "job") == 7


def test_a_rendezvous_state_with_foreign_objects_is_not_unpickled():
    store = dist.HashStore()
    store.set("torch.rendezvous.job", base64.b64encode(pickle.dumps(subprocess.Popen)))
    assert rendezvous_round(store, "job") is None
