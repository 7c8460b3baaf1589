"""python -m data_pipeline tokenize as users run it, on real speech (espeak-ng): kill -9 of one
worker and a rerun (same keys, each once, same codes), two ranks under torchrun, a Slurm array of
two tasks, and training `tiny` on the result (SNAC -> flattened layout, the demo codec -> llasa)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline.shards import DatasetIndex, read_shard
from tests import apt
from tests.helpers import REPO, SMALL, env, pretrain
from tests.integration.slurm_cluster import slurm  # noqa: F401 (the session fixture)

pytestmark = pytest.mark.slow
CODEBOOK = os.path.join(REPO, "data", "demo", "codebook.npy")
SNAC_CFG = {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 64,
            "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
            "vq_strides": [4, 2, 1], "noise": True, "depthwise": True}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 espeak-ng utterances, 2 voices, in the fish-speech layout (VOICE/NNNNN.wav + .lab)."""
    try:
        apt.install(["espeak-ng"], lambda: shutil.which("espeak-ng"))
    except apt.CannotInstall as e:
        pytest.skip(str(e))
    from data_pipeline import demo

    root = tmp_path_factory.mktemp("speech") / "espeak"
    plan = demo.plan_utterances(16, 5, ("en-us", "en-gb"))
    for u in demo.synthesize(plan, demo.find_espeak()):
        d = root / demo.speaker_slug(u.voice)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{u.index:05d}.wav").write_bytes(u.wav)
        (d / f"{u.index:05d}.lab").write_text(u.text)
    return root


@pytest.fixture(scope="module")
def snac_dir(tmp_path_factory):
    from data_pipeline.codecs.snac import save_random_snac

    return save_random_snac(str(tmp_path_factory.mktemp("snac") / "snac_24khz"), SNAC_CFG)


def cmd(codec, path, corpus, out, *settings):
    return [sys.executable, "-m", "data_pipeline", "tokenize", "--codec", codec, "--codec-path", str(path),
            "--input", str(corpus), "--out", str(out), "progress=false", *settings]


def contents(out) -> dict:
    """key -> codes over every finished shard; asserts no key appears twice."""
    seen: dict = {}
    for tar in sorted(os.listdir(out)):
        if tar.endswith(".tar"):
            for s in read_shard(os.path.join(out, tar)):
                assert s.key not in seen, f"{s.key} written twice"
                seen[s.key] = s.codes
    return seen


@pytest.fixture(scope="module")
def snac_reference(corpus, snac_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "snac"
    p = subprocess.run(cmd("snac", snac_dir, corpus, out, "shard_size=2", "rank=0", "world_size=1"),
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokenize summary (dataset" in p.stderr and "16 utterances" in p.stderr
    return out


def test_kill_9_one_worker_then_rerun(corpus, snac_dir, snac_reference, tmp_path):
    out = tmp_path / "out"
    # Two workers as an array of two would run them; kill -9 worker 0 once it finished a unit.
    procs = [subprocess.Popen(cmd("snac", snac_dir, corpus, out, "shard_size=2", f"rank={r}", "world_size=2"),
                              cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    deadline = time.monotonic() + 120
    while not (out / "shard-000000.report.json").exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, "worker 0 finished no unit"
        time.sleep(0.02)
    procs[0].send_signal(signal.SIGKILL)
    assert procs[0].wait(30) == -signal.SIGKILL
    assert procs[1].wait(120) == 0, procs[1].stderr.read()[-3000:]
    assert not (out / "index.json").exists()  # worker 0's units are not all done
    done_before = sorted(p.name for p in out.glob("*.report.json"))
    assert "shard-000006.report.json" not in done_before  # (the kill came mid-run)
    p = subprocess.run(cmd("snac", snac_dir, corpus, out, "shard_size=2", "rank=0", "world_size=2"),
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = contents(snac_reference), contents(out)
    assert sorted(got) == sorted(ref) and len(got) == 16
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert DatasetIndex.load(str(out)).n_samples == 16
    assert not list(out.glob(".*.tmp"))


def test_two_ranks_under_torchrun(corpus, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--log-dir", str(tmp_path / "tr"), "-m", "data_pipeline", "tokenize", "--codec", "mel-kmeans",
                        "--codec-path", CODEBOOK, "--input", str(corpus), "--out", str(out), "progress=false",
                        "shard_size=3"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "worker 0/2 (torchrun)" in p.stderr + p.stdout and "worker 1/2 (torchrun)" in p.stderr + p.stdout
    by_shard = {t: {s.key for s in read_shard(str(out / t))} for t in sorted(os.listdir(out)) if t.endswith(".tar")}
    assert len(by_shard) == 6  # 16 items / 3 per unit
    keys = [k for ks in by_shard.values() for k in ks]
    assert len(keys) == len(set(keys)) == 16
    assert DatasetIndex.load(str(out)).n_samples == 16


def test_slurm_array_of_two_tasks(corpus, slurm, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    job_env = {**env(), "CODEC": "mel-kmeans", "CODEC_PATH": CODEBOOK, "INPUT": str(corpus), "OUT": str(out),
               "SETTINGS": "shard_size=4", "PYTHON": sys.executable, "REPO": REPO}
    log = str(tmp_path / "slurm-%A_%a.out")
    job = slurm.sbatch(["--array=0-1", f"--output={log}", "slurm/tokenize.sh"], env=job_env, cwd=REPO)
    deadline = time.monotonic() + 240
    while not (out / "index.json").exists() or len(list(out.glob("*.report.json"))) < 4:
        assert time.monotonic() < deadline, "\n".join(open(p).read()[-2000:] for p in tmp_path.glob("slurm-*.out"))
        time.sleep(0.5)
    logs = "\n".join(open(p).read() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert "worker 0/2 (slurm array)" in logs and "worker 1/2 (slurm array)" in logs, logs[-3000:]
    got = contents(out)
    assert len(got) == 16 and DatasetIndex.load(str(out)).n_samples == 16
    del job


def test_train_tiny_on_snac_flattened_and_demo_codec_llasa(corpus, snac_reference, tmp_path):
    mel = tmp_path / "mel"
    p = subprocess.run(cmd("mel-kmeans", CODEBOOK, corpus, mel, "rank=0", "world_size=1"), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    base = SMALL + ["train.steps=3", "checkpoint.interval=100", "train.global_batch_size=2"]
    snac = pretrain(str(tmp_path / "run_snac"), base + [f"data.paths=[{snac_reference}]", "model.layout=flattened",
                                                         "model.vocab.n_codebooks=7", "model.vocab.codebook_size=4096",
                                                         "data.codec.name=snac", "data.codec.n_q=7"])
    assert snac.returncode == 0, snac.output[-3000:]
    llasa = pretrain(str(tmp_path / "run_mel"), base + [f"data.paths=[{mel}]", "model.layout=llasa"])
    assert llasa.returncode == 0, llasa.output[-3000:]
    for r in (snac, llasa):
        losses = r.losses()
        assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    # the recipe names a codec the data were not tokenized with: refused, naming the field
    bad = pretrain(str(tmp_path / "run_bad"), base + [f"data.paths=[{mel}]", "data.codec.name=xcodec2",
                                                       "data.codec.sample_rate=16000"])
    # (torchrun itself exits 1 when a worker fails; the worker's own code is in RUN_DIR/exit/)
    with open(tmp_path / "run_bad" / "exit" / "rank_00000.json") as f:
        assert json.load(f)["code"] == 3, bad.output[-3000:]
    assert "name: data.codec has 'xcodec2', the datasets 'mel-kmeans'" in bad.output
    assert "sample_rate: data.codec has 16000.0" in bad.output
