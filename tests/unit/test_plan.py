"""launch.plan: the llasa-8b recipe on 1,024 GPUs through the CLI (numbers checked against an
analytic count), invalid, wasteful and over-budget layouts, and the fake-process-group meta
shard against the shard a real 2-process gloo run builds."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest
import torch

from launch import plan as P
from tests.helpers import REPO, env

LLASA_8B = os.path.join(REPO, "configs", "llasa-8b.yaml")
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def llama_layer_params(h, heads, groups, ffn, tp):
    """One Llama block on one TP rank: QKV, output projection, SwiGLU MLP (split over TP) and two
    RMSNorm weights (replicated)."""
    d = h // heads
    return ((heads * d + 2 * groups * d) * h + heads * d * h + 3 * ffn * h) // tp + 2 * h


@pytest.fixture(scope="module", autouse=True)
def cli_1024():
    """The CLI run, started with the module so that its imports overlap the in-process tests'
    (the last test collects it)."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.plan", "--config", LLASA_8B, "--gpus", "1024",
                             "parallel.tp=8", "parallel.pp=4", "--ranks", "0,1023", "--json", "-"],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_invalid_layout_names_every_problem(capsys):
    code = P.main(["--config", LLASA_8B, "--gpus", "1000", "parallel.tp=3", "parallel.pp=4",
                   "parallel.ddp.average_in_collective=true"])
    err = capsys.readouterr().err
    assert code == P.EXIT_INVALID
    expected = [
        "num_attention_heads=32 is not divisible by parallel.tp=3; choose tp from [1, 2, 4, 8, 16, 32]",
        "num_query_groups=8 is not divisible by parallel.tp=3; choose tp from [1, 2, 4, 8]",
        "world size 1000 is not divisible by tp x pp = 12; launch a multiple of 12 processes",
        "data.seq_len=2048 is not divisible by parallel.tp=3",
        "average_in_collective=true conflicts with the per-token loss",
    ]
    assert f"{len(expected)} problem(s)" in err
    for problem in expected:
        assert problem in err, err


def test_the_plan_and_training_refuse_the_same_layouts(capsys):
    """One function validates a layout (megatron_tts.config.layout_problems): the planner and the
    training entry point (megatron_tts.parallel.init_distributed -> validate_world) agree."""
    from megatron_tts.config import ConfigError, load_config, validate_world

    cases = [
        (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=321"], 2,
         "data.seq_len=321 is not divisible by parallel.tp=2"),
        (["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=12"], 4,
         "micro-batches per step (3) to be a multiple of parallel.pp=2"),
        (["parallel.tp=2", "model.vocab.padded_size=1152"], 2, "not a multiple of 128 x tp = 256"),
    ]
    for overrides, gpus, needle in cases:
        assert P.main(["--config", TINY, "--gpus", str(gpus), *overrides]) == P.EXIT_INVALID
        assert needle in capsys.readouterr().err
        try:
            cfg = load_config(TINY, overrides)
            validate_world(cfg, gpus)
        except ConfigError as e:
            assert needle in str(e)
        else:
            raise AssertionError(f"training accepts {overrides}")


def test_default_vocab_padding_splits_over_any_tp():
    from megatron_tts.config import load_config, padded_vocab_size

    for tp in (1, 2, 3, 4, 6, 8, 16):
        cfg = load_config(LLASA_8B, ["parallel.tp=8"])
        cfg.parallel.tp = tp  # the padding alone (heads may not split over every tp)
        v = padded_vocab_size(cfg)
        assert v % (128 * tp) == 0 and v >= 193_800
    assert padded_vocab_size(load_config(LLASA_8B, ["parallel.tp=8"])) == 194_560  # unchanged for TP <= 8


def test_batches_that_do_not_split_are_invalid(capsys):
    code = P.main(["--config", TINY, "--gpus", "6", "parallel.tp=2", "parallel.dp=3", "train.global_batch_size=8"])
    err = capsys.readouterr().err
    assert code == P.EXIT_INVALID
    assert "1 problem(s)" in err  # found by the config's and the world's checks alike: listed once
    assert "global_batch_size=8 is not divisible by micro_batch_size x dp = 2 x 3 = 6; use 6 or 12" in err
    code = P.main(["--config", TINY, "--gpus", "4", "parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=12"])
    err = capsys.readouterr().err
    assert code == P.EXIT_INVALID
    assert "micro-batches per step (3) to be a multiple of parallel.pp=2 (megatron raises otherwise); use " \
           "train.global_batch_size=8 or 16" in err


def test_wasteful_layout_warns(capsys):
    code = P.main(["--config", LLASA_8B, "--gpus", "64", "parallel.tp=8", "parallel.pp=8",
                   "train.global_batch_size=8"])
    out = capsys.readouterr().out
    assert code == P.EXIT_OK, out
    assert "DP=1" in out and "micro-batches per step: 8" in out
    assert "warning: pipeline bubble (pp-1)/(vpp x m) = (8-1)/(1 x 8) = 88%" in out
    assert "warning: optim.distributed=true with DP=1 shards nothing" in out
    assert "warning: 8 micro-batch(es)" not in out  # m == pp fills the pipeline


def test_over_memory_budget(capsys):
    code = P.main(["--config", LLASA_8B, "--gpus", "1", "parallel.tp=1", "parallel.sequence_parallel=false"])
    out = capsys.readouterr().out
    assert code == P.EXIT_OVER_MEMORY
    assert "error: rank 0 (only stage) needs" in out and "over 90% of 80 GB" in out


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_activation_formula_equals_what_a_real_layer_saves(dtype):
    """One transformer layer of the local spec, run forward on CPU: the bytes of the tensors
    autograd saves for backward (parameters aside) are what the formula says."""
    import torch

    s, b, h = 128, 2, 256
    cfg = P.load_plan_config(TINY, [f"train.dtype={dtype}", f"data.seq_len={s}", f"train.micro_batch_size={b}",
                                    "train.global_batch_size=2", f"model.transformer.hidden_size={h}",
                                    "model.transformer.ffn_hidden_size=704", "model.transformer.num_attention_heads=8",
                                    "model.transformer.num_query_groups=2"], 1)
    saved = {}

    def pack(x):
        base = x if x._base is None else x._base
        if not isinstance(base, torch.nn.Parameter):
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with P.fake_world(cfg, 1, 0), P._quiet():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from megatron_tts.model import build_model_chunks

        model_parallel_cuda_manual_seed(0)
        (model,) = build_model_chunks(cfg)  # real CPU tensors (no meta device here)
        layer = model.decoder.layers[0]
        x = torch.randn(s, b, h, dtype=layer.mlp.linear_fc1.weight.dtype, requires_grad=True)
        mask = torch.ones(b, 1, s, s, dtype=torch.bool).triu(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            layer(x, attention_mask=mask)
    assert sum(saved.values()) == P.activation_bytes_per_layer(cfg)


# ------------------------------------------------------------------ fake meta shard == real shard


def _real_shard(rank: int, port: int, overrides: list[str], out) -> None:
    """A real rank of a 2-process gloo world, built as launch.pretrain builds it."""
    try:
        import torch

        # A forked child must not enter the OpenMP pool the parent's matmuls started (GNU
        # libgomp hangs there); one thread keeps torch's ops inline.
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        from megatron_tts.config import load_config
        from megatron_tts.model import build_model_chunks
        from megatron_tts.parallel import destroy_distributed, init_distributed

        cfg = load_config(TINY, overrides)
        layout = init_distributed(cfg)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.train.seed)
        shapes = {n: tuple(q.shape) for c in build_model_chunks(cfg) for n, q in c.named_parameters()}
        out.put((rank, (layout.tp_rank, layout.pp_rank), shapes))
        destroy_distributed()
    except BaseException as e:  # the parent reports it
        out.put((rank, None, repr(e)))


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp2", "pp2"])
def test_fake_meta_shard_equals_a_real_gloo_shard(layout):
    overrides = layout + ["train.global_batch_size=8"]
    cfg = P.load_plan_config(TINY, overrides, 2)
    fake = {}
    for rank in (0, 1):
        with P.fake_world(cfg, 2, rank) as ps, torch.device("meta"), P._quiet():
            from megatron_tts.model import build_model_chunks

            chunks = build_model_chunks(cfg, device=torch.device("meta"))
            assert {q.device.type for c in chunks for q in c.parameters()} == {"meta"}
            fake[rank] = ((ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()),
                          {n: tuple(q.shape) for c in chunks for n, q in c.named_parameters()})
        assert P.plan_rank(cfg, 2, rank).parameters == sum(map(math.prod, fake[rank][1].values()))

    # fork: the children reuse this process's imports (a spawn would re-import megatron, ~10 s)
    ctx = multiprocessing.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctx.Queue()
    procs = [ctx.Process(target=_real_shard, args=(rank, port, overrides, out), daemon=True) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    results = {}
    try:
        for _ in procs:
            rank, coords, shapes = out.get(timeout=120)
            assert coords is not None, shapes
            results[rank] = (coords, shapes)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert results == fake
    assert fake[0][0] != fake[1][0]
    if "parallel.pp=2" in layout:
        assert "embedding.word_embeddings.weight" in fake[0][1] and "output_layer.weight" in fake[1][1]


def test_llasa_8b_on_1024_gpus_through_the_cli(cli_1024):
    out, err = cli_1024.communicate(timeout=300)
    assert cli_1024.returncode == P.EXIT_OK, err
    plan = json.loads(out)
    assert (plan["tp"], plan["pp"], plan["dp"], plan["micro_batches"]) == (8, 4, 32, 512 // 32)
    assert plan["bubble"] == pytest.approx(3 / 16)
    first, last = plan["ranks"]
    assert (first["tp_rank"], first["pp_rank"], first["dp_rank"], first["stage"]) == (0, 0, 0, "first")
    assert (last["tp_rank"], last["pp_rank"], last["dp_rank"], last["stage"]) == (7, 3, 31, "last")
    assert first["layers"] == list(range(0, 8)) and last["layers"] == list(range(24, 32))

    h, vocab, tp = 4096, 194_560, 8
    layers = 8 * llama_layer_params(h, 32, 8, 14336, tp)
    embedding = vocab // tp * h
    assert plan["padded_vocab"] == vocab
    assert first["parameters"] == layers + embedding  # + input embedding
    assert last["parameters"] == layers + embedding + h  # + LM head and the final norm
    assert first["embedding_parameters"] == last["embedding_parameters"] == embedding
    total = 32 * llama_layer_params(h, 32, 8, 14336, 1) + 2 * vocab * h + h
    assert plan["total_parameters"] == total  # 8.57B: Llama-3.1-8B with the speech vocabulary
    assert 1.0 < first["parameters"] / (total / (tp * 4)) < 1.3  # the embedding sits on the end stages

    for r in (first, last):
        mem, n = r["memory"], r["parameters"]
        # bf16 weights and bf16 DDP grads (grad_reduce_in_fp32 is off), fp32 norms; bucket padding
        assert 2 * n <= mem["weights"] < 2.01 * n and 2 * n <= mem["grads"] < 2.01 * n
        assert mem["optimizer"] == pytest.approx(12 * n / 32, rel=0.01)  # fp32 master + 2 moments, /DP
        assert mem["total"] == sum(mem[k] for k in ("weights", "grads", "optimizer", "activations"))
        assert r["comm"]["dp_grads"] == pytest.approx(31 / 32 * mem["grads"], rel=1e-6)
        assert r["comm"]["tp"] > 0 and r["comm"]["pp"] > 0
    # 1F1B: the first stage holds pp = 4 micro-batches, the last one. Per layer and token
    # (module docstring): (16h + 8 + 2ah)/t + (a(3q + k + 5f) + 4 heads)/t + a s = 35,857 bytes
    assert (first["in_flight"], last["in_flight"]) == (4, 1)
    per_layer = 2048 * ((16 * h + 8 + 4 * h) // tp + (2 * (3 * h + h // 2 + 5 * 14336) + 4 * 32) // tp + 2 * 2048)
    stage_input = 2048 * h * 2 // tp
    assert per_layer == 2048 * 35_857
    assert first["memory"]["activations"] == 4 * (8 * per_layer + stage_input)
    assert last["memory"]["activations"] == 8 * per_layer + stage_input + 2048 * (5 * h // 4 + vocab // tp * 6)
    # megatron's buckets: 40M-element buckets on stage 0, one per buffer on later stages
    assert first["bucket_size"] == 40_000_000 and last["bucket_size"] is None
    assert len([b for x in first["buffers"] for b in x["buckets"]]) > 2
    assert all(len(x["buckets"]) == 1 for x in last["buffers"])
    assert first["memory"]["total"] < 0.9 * 80e9 and plan["over_memory"] == []
    # parallel.hierarchical (off in the recipe: its defaults inner=node, outer_interval=8): 32 nodes
    # of one DP rank per TP x PP position (8 GPUs = one TP group). Flat: reduce-scatter of the bf16
    # grads + all-gather of the bf16 params across the nodes; hierarchical: the fp32 delta every 8.
    d = plan["dp_sync"]
    assert (d["enabled"], d["nodes"], d["dp_per_node"], d["inner"], d["outer_interval"]) == (False, 32, 1, 1, 8)
    numel = sum(x["numel"] for x in first["buffers"])
    params = sum(x["numel"] * x["param_bytes"] for x in first["buffers"])  # bf16 weights, fp32 norms
    assert d["flat_inter_node_bytes_per_gpu_per_step"] == int(31 / 32 * (first["memory"]["grads"] + params))
    assert d["hierarchical_inter_node_bytes_per_gpu_per_step"] == int(2 * 31 / 32 * 4 * numel / 8)
    assert first["comm"]["outer_sync"] == 0
