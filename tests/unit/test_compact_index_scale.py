"""bench/index_scale.py's simulation at CI scale, through the same code: a rank's start-up reads
O(shards) of the index, planning reads the slices of the shards it reaches, and an epoch's
assignment to 1,024 ranks x 8 workers is disjoint and complete."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import index_scale as sim  # noqa: E402


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("scale") / "ds")
    sim.write_synthetic(d, 10**6, 10**3, seed=1)
    return d


def test_a_rank_reads_the_header_and_the_shards_it_plans_not_the_corpus(big: str) -> None:
    ld = sim.make_loader(big, rank=777)
    ix = ld._src.datasets[0].index
    size = Path(big, "index.cidx").stat().st_size
    opened = ld.index_bytes_read
    assert ld.n_samples == 10**6
    assert opened < 100_000 < size / 100  # the header and the shard table: ~70 bytes a shard
    plan = ld.read_plan(2)  # 2 steps of 2,048 packs: ~13 windows of the 1,000-sample shards
    assert len(plan) == 2 and all(plan)
    touched = len(ld._info._lengths._d)
    per_shard = 1000 * (2 + 2)  # text_bytes, n_frames: u2 each (offsets and sizes only for this rank's reads)
    assert touched < 60
    assert ld.index_bytes_read - opened <= touched * per_shard + 64 * 1000 * 8
    assert ix.reads < 200
    ld.close()


def test_an_epoch_over_1024_ranks_x_8_workers_is_disjoint_and_complete(tmp_path: Path) -> None:
    d = str(tmp_path / "ds")
    sim.write_synthetic(d, 200_000, 200, seed=2)
    got = sim.check_assignment(d, procs=1)
    assert got["disjoint"] and got["complete"], got
    assert got["max_count"] == 1 and got["counted_once"] + got["too_long"] == 200_000
    assert got["slots_used"] == 1024 * 8  # every rank's every worker has work in the epoch
    assert sim.cross_check_ranks(d, [0, 5, 1023], steps=2)
