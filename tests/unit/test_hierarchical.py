"""parallel.hierarchical without processes: config validation, the group split, the outer step."""

from __future__ import annotations

import pytest
import torch

from megatron_tts.config import ConfigError, layout_problems, load_config
from megatron_tts.hierarchical import nodes_straddled, outer_update, split_dp_group

TINY = "configs/tiny.yaml"
ON = ["parallel.hierarchical.enabled=true"]


def test_every_problem_at_once_with_its_fix():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ON + ["parallel.hierarchical.inner=0", "parallel.hierarchical.outer_interval=0",
                                "parallel.hierarchical.outer_optimizer.kind=adam",
                                "parallel.hierarchical.outer_optimizer.lr=0",
                                "parallel.hierarchical.outer_optimizer.momentum=1.0", "optim.distributed=true"])
    text = str(e.value)
    assert "6 problem(s)" in text, text
    for needle in ("inner=0: use 'node'", "outer_interval=0: must be an int >= 1", "kind: 'adam' unknown",
                   "lr=0.0: must be > 0", "momentum=1.0: must be in [0, 1)", "set optim.distributed=false"):
        assert needle in text, text


def test_layout_problems():
    cfg = load_config(TINY, ON + ["parallel.hierarchical.inner=3"])
    assert "3 DP ranks per inner group does not divide DP=4; use a divisor of 4" in layout_problems(cfg, 4)[0]
    cfg = load_config(TINY, ON + ["parallel.hierarchical.inner=4"])
    assert "nothing to synchronise" in layout_problems(cfg, 4)[0]
    cfg = load_config(TINY, ON + ["parallel.tp=2"])  # inner=node
    assert layout_problems(cfg, 8, ranks_per_node=4) == []  # 2 nodes x 2 DP ranks
    cfg = load_config(TINY, ON + ["parallel.tp=2", "train.global_batch_size=24"])
    assert "3 ranks per node is not a multiple of parallel.tp=2" in layout_problems(cfg, 12, ranks_per_node=3)[0]
    assert "nothing to synchronise" in layout_problems(cfg, 8, ranks_per_node=8)[0]  # one node


def test_group_split():
    # one DP group of 8 (global ranks 0, 2, ..., 14 with TP=2), 4 DP ranks per inner group
    dp = list(range(0, 16, 2))
    inner, outer = split_dp_group(dp, 4)
    assert inner == [[0, 2, 4, 6], [8, 10, 12, 14]]
    assert outer == [[0, 8], [2, 10], [4, 12], [6, 14]]
    assert nodes_straddled(inner, ranks_per_node=8) == []
    assert nodes_straddled(split_dp_group(dp, 2)[0], ranks_per_node=2) == [[0, 2], [4, 6], [8, 10], [12, 14]]
    with pytest.raises(ValueError):
        split_dp_group(dp, 3)


def test_outer_steps():
    anchor = torch.tensor([1.0, 2.0])
    nodes = torch.tensor([[0.5, 2.5], [0.7, 1.5]])
    delta = (anchor - nodes).mean(0)
    a = anchor.clone()
    outer_update(a, delta, None, "average", 1.0, 0.0)
    assert torch.allclose(a, nodes.mean(0))  # plain averaging
    # nesterov (DiLoCo): m = mu m + d; p = anchor - lr (d + mu m); twice, by hand
    a, m = anchor.clone(), torch.zeros(2)
    outer_update(a, delta, m, "nesterov", 0.7, 0.9)
    assert torch.allclose(m, delta) and torch.allclose(a, anchor - 0.7 * (delta + 0.9 * delta))
    before = a.clone()
    outer_update(a, delta, m, "nesterov", 0.7, 0.9)
    m2 = 0.9 * delta + delta
    assert torch.allclose(m, m2) and torch.allclose(a, before - 0.7 * (delta + 0.9 * m2))
    a, m = anchor.clone(), torch.full((2,), 0.5)
    outer_update(a, delta, m, "sgd", 0.5, 0.9)  # heavy ball
    assert torch.allclose(a, anchor - 0.5 * (0.9 * 0.5 + delta))


def test_plan_inter_node_bytes():
    """launch.plan's dp_sync on a hand-made shard: 1,000 bf16 parameters, 16 GPUs of 8 per node,
    TP=2 -> DP=8 = 2 nodes x 4 DP ranks."""
    from launch import plan as P

    buf = P.Buffer(chunk=0, param_dtype="bfloat16", grad_dtype="bfloat16", numel=1000, numel_unpadded=1000,
                   buckets=[1000], param_bytes=2, grad_bytes=2)
    r = P.RankPlan(rank=0, tp_rank=0, pp_rank=0, dp_rank=0, stage="only", layers=[0], parameters=1000,
                   embedding_parameters=0, bucket_size=None, buffers=[buf], in_flight=1, memory={}, comm={},
                   build_s=0.0)
    cfg = load_config(TINY, ["parallel.tp=2", "parallel.hierarchical.outer_interval=8"])
    d = P.dp_sync(cfg, r, dp=8, gpus_per_node=8)
    assert (d["nodes"], d["dp_per_node"], d["inner"], d["enabled"]) == (2, 4, 4, False)
    # flat: all-reduce of 2,000 bytes of grads, each GPU exchanging its quarter across 2 nodes
    assert d["flat_inter_node_bytes_per_gpu_per_step"] == int(2 * 1 / 2 * 2000 / 4) == 500
    # hierarchical: the fp32 delta (4,000 bytes), a quarter per GPU, every 8 steps
    assert d["hierarchical_inter_node_bytes_per_gpu_per_step"] == int(2 * 1 / 2 * 4000 / 4 / 8) == 125
    assert d["reduction"] == 4.0
