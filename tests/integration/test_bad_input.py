"""Bad input through the real training CLI.

Unusable input (missing dataset, missing or corrupt sidecar index, a tokenizer that does not match
the vocab, a bad config) stops the run with exit code 3 (EXIT_FATAL) and one clear error naming the
file or key, with no Python traceback and nothing raised from inside megatron-core. A shard damaged
after it was indexed, a sample whose codes fall outside the codebook and a sample longer than
data.seq_len are skipped, logged with their name and counted in metrics.jsonl; the run completes.

The fatal cases run `python -m launch.pretrain` directly (a world of one): torchrun reports a failed
worker with its own exit code 1 and traceback, so it would hide the code (see test_torchrun_reports_*).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass

import numpy as np
import pytest

from data_pipeline.shards import (
    DatasetIndex,
    Sample,
    ShardSummary,
    build_shard_index,
    index_path_for,
    load_shard_index,
    read_shard,
    write_dataset,
)
from megatron_tts.exit_codes import EXIT_FATAL
from tests.forkcli import CliResult, run_many
from tests.helpers import REPO, SMALL, env, pretrain

pytestmark = pytest.mark.slow

DEMO = os.path.join(REPO, "data", "demo")
SEQ_LEN = 320  # SMALL's data.seq_len
RUN = SMALL + ["train.steps=3", "checkpoint.interval=1000"]

# A path or logger name of megatron-core in a failed run's output: something escaped from inside it.
_MEGATRON = re.compile(r"megatron[./]core")
# What `python -m launch.pretrain` imports before it reads the config (tests/forkcli.py)
PRELOAD = ("torch", "megatron_tts.train", "data_pipeline.loader")  # megatron_tts first: its CPU shims


# ------------------------------------------------------------------------------------ helpers


def cli(run_dir: str, overrides: list[str], config: str = "configs/tiny.yaml") -> CliResult:
    """`python -m launch.pretrain` in a world of one (no torchrun): the process's own exit code."""
    cmd = [sys.executable, "-m", "launch.pretrain", "--config", config, f"train.run_dir={run_dir}", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    return CliResult(p.returncode, p.stdout, p.stderr)


def clis(*calls: tuple) -> list[CliResult]:
    """`cli(run_dir, overrides[, config])` for each call, in order, each its own process but forked
    from one that paid the imports once (tests/forkcli.py)."""
    argvs = {f"call{i}": ["--config", call[2] if len(call) > 2 else "configs/tiny.yaml", f"train.run_dir={call[0]}",
                          *call[1]] for i, call in enumerate(calls)}
    results = run_many("launch.pretrain", argvs, setup=("launch.pretrain:quiet_imports",), preload=PRELOAD)
    return [results[k] for k in argvs]


def assert_fatal(r: CliResult, *needles: str) -> str:
    """Exit 3, one error line carrying every needle, no traceback, nothing from megatron-core."""
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_FATAL, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    start = r.stderr.index(errors[0])
    message = r.stderr[start:]
    for n in needles:
        assert n in message, f"{n!r} not in {message!r}"
    from_megatron = [line for line in out.splitlines() if _MEGATRON.search(line)]
    assert not from_megatron, from_megatron
    return message


def demo_samples(n: int, skip: int = 0) -> list[Sample]:
    out: list[Sample] = []
    for i in range(5):
        for s in read_shard(os.path.join(DEMO, f"shard-{i:06d}.tar")):
            if skip:
                skip -= 1
                continue
            out.append(s)
            if len(out) == n:
                return out
    raise AssertionError("not enough demo samples")


def demo_codec() -> dict:
    return DatasetIndex.load(DEMO).codec


def rekey(samples: list[Sample], prefix: str) -> list[Sample]:
    """Fresh keys (so log lines name exactly one sample) and no codec in meta (the writer adds its own)."""
    out = []
    for i, s in enumerate(samples):
        meta = {k: v for k, v in s.meta.items() if k not in ("codec", "n_frames", "duration_s")}
        out.append(Sample(key=f"{prefix}/{i:03d}", codes=s.codes, text=s.text, meta=meta))
    return out


def write_raw_shard(path: str, samples: list[Sample], meta_codec: dict | None) -> None:
    """A tar written without ShardWriter (so nothing validates the codes)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(s.codes, dtype=np.uint16), version=(1, 0))
            meta = {"n_frames": int(s.codes.shape[1]), "speaker": "", "language": "en"}
            if meta_codec is not None:
                meta["codec"] = meta_codec
            for ext, data in (("codes.npy", buf.getvalue()), ("txt", s.text.encode()),
                              ("json", json.dumps(meta).encode())):
                ti = tarfile.TarInfo(f"{s.key}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def last_step(metrics: list[dict]) -> dict:
    steps = [r for r in metrics if "loss" in r]
    assert steps, metrics
    return steps[-1]


def warned_keys(output: str, what: str) -> set[str]:
    """Keys of 'sample KEY of shard URL <what>' log lines."""
    return set(re.findall(r"sample (\S+) of shard \S+ " + re.escape(what), output))


# ----------------------------------------------------------------------------------- datasets


@dataclass
class Datasets:
    root: str
    good: str  # 16 demo samples, 2 shards
    damaged: str  # 5 shards x 3 samples: ok, tar missing, 0 bytes, header overwritten, truncated
    bad_codes: str  # codec codebook 256, samples 1 and 4 hold codes >= 256 (written without ShardWriter)
    codec_1024: str  # codec codebook 1024 (config: 256); samples 0, 2, 4 use codes >= 256
    too_long: str  # 4 samples, sample 2 longer than data.seq_len
    other_codec: str  # 8 demo samples under another 256-entry codec (16 kHz, other weights)
    expect: dict


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Datasets:
    root = str(tmp_path_factory.mktemp("bad_input_data"))
    codec = demo_codec()
    pool = demo_samples(60)
    expect: dict = {}

    good = os.path.join(root, "good")
    write_dataset(good, rekey(pool[:16], "good"), codec, samples_per_shard=8, name="good")

    damaged = os.path.join(root, "damaged")
    write_dataset(damaged, rekey(pool[16:31], "dmg"), codec, samples_per_shard=3, name="damaged")
    shard = [os.path.join(damaged, f"shard-{i:06d}.tar") for i in range(5)]
    entries = [load_shard_index(s).samples for s in shard]
    os.remove(shard[1])  # the tar is gone, its sidecar stays
    open(shard[2], "wb").close()  # 0 bytes
    with open(shard[3], "r+b") as f:  # garbage over the tar header of the middle sample
        f.seek(entries[3][1].offset)
        f.write(b"\xab" * 512)
    with open(shard[4], "r+b") as f:  # cut inside the middle sample
        f.truncate(entries[4][1].offset + entries[4][1].length // 2)
    expect["missing_tar"] = shard[1]
    expect["missing_tar_keys"] = {e.key for e in entries[1]}
    expect["damaged_keys"] = {e.key for e in entries[2]} | {entries[3][1].key} | {e.key for e in entries[4][1:]}
    expect["ok_damaged_keys"] = {e.key for e in entries[0]} | {entries[3][0].key, entries[3][2].key, entries[4][0].key}

    bad_codes = os.path.join(root, "bad_codes")
    os.makedirs(bad_codes)
    samples = rekey(pool[31:37], "badcode")
    samples[1].codes = samples[1].codes.copy()
    samples[1].codes[0, 5] = 300
    samples[4].codes = samples[4].codes.copy()
    samples[4].codes[0, -1] = 65535
    tar = os.path.join(bad_codes, "shard-000000.tar")
    write_raw_shard(tar, samples, meta_codec=None)
    # build_shard_index checks codes against the codec it is given: index under a wide codec,
    # then declare the real one (what a buggy external tokenizer pipeline could produce)
    idx = build_shard_index(tar, codec={**codec, "codebook_size": 65536})
    idx.codec = codec
    with open(index_path_for(tar), "w") as f:
        f.write(idx.to_json())
    DatasetIndex(name="bad_codes", codec=codec,
                 shards=[ShardSummary.from_index("shard-000000.tar", "shard-000000.idx.json", idx)]).save(bad_codes)
    expect["bad_code_keys"] = {samples[1].key, samples[4].key}

    codec_1024 = os.path.join(root, "codec_1024")
    wide = {**codec, "name": "wide", "codebook_size": 1024}
    samples = rekey(pool[37:43], "wide")
    for i in (0, 2, 4):
        samples[i].codes = samples[i].codes.astype(np.int64) + 256 * (1 + i % 3)  # within [0, 1024)
    write_dataset(codec_1024, samples, wide, samples_per_shard=6, name="codec_1024")
    expect["wide_keys"] = {samples[i].key for i in (0, 2, 4)}

    too_long = os.path.join(root, "too_long")
    samples = rekey(pool[43:47], "long")
    samples[2].codes = np.tile(samples[2].codes, (1, 4))[:, :SEQ_LEN + 10]
    write_dataset(too_long, samples, codec, samples_per_shard=4, name="too_long")
    expect["too_long_key"] = samples[2].key

    other_codec = os.path.join(root, "other_codec")
    other = {**codec, "sample_rate": 16000, "checkpoint_sha256": "0" * 64}
    write_dataset(other_codec, rekey(pool[47:55], "other"), other, samples_per_shard=8, name="other_codec")

    return Datasets(root, good, damaged, bad_codes, codec_1024, too_long, other_codec, expect)


def copy_dataset(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- fatal: exit 3


def _tokenizer(path: str) -> int:
    """A small BPE tokenizer.json trained on the demo transcripts; returns its vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([s.text for s in demo_samples(200)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    tok.save(path)
    return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def fatal(data) -> dict:
    """Every fatal case, prepared here and run as `python -m launch.pretrain` processes forked from
    one that imported torch and megatron-core once (tests/forkcli.py: each case is mostly that
    start-up). Maps case name -> (CliResult, facts the test checks)."""
    root = os.path.join(data.root, "fatal")
    os.makedirs(root)
    cases: dict[str, tuple[list[str], dict]] = {}

    missing = os.path.join(root, "no_such_dataset")
    cases["missing_path"] = ([f"data.paths=[{missing}]"], {"path": missing})

    ds = copy_dataset(data.good, os.path.join(root, "no_index"))
    os.remove(os.path.join(ds, "index.json"))
    cases["missing_index"] = ([f"data.paths=[{ds}]"], {"path": ds})

    # (with its compact index a dataset's sidecars are not read at start-up: these two cases are
    # datasets without one, read the old way)
    ds = copy_dataset(data.good, os.path.join(root, "no_sidecar"))
    os.remove(os.path.join(ds, "index.cidx"))
    os.remove(os.path.join(ds, "shard-000001.idx.json"))
    cases["missing_sidecar"] = ([f"data.paths=[{ds}]"], {"shard": os.path.join(ds, "shard-000001.tar")})

    ds = copy_dataset(data.good, os.path.join(root, "bad_sidecar"))
    os.remove(os.path.join(ds, "index.cidx"))
    with open(os.path.join(ds, "shard-000000.idx.json"), "r+b") as f:
        f.truncate(len(f.read()) // 2)  # cut mid-way: no longer JSON
    cases["corrupt_sidecar"] = ([f"data.paths=[{ds}]"], {"shard": os.path.join(ds, "shard-000000.tar")})

    cases["codec_mismatch"] = ([f"data.paths=[{data.codec_1024}]"], {"path": data.codec_1024})

    cases["bad_config"] = (["parallel.tp=3", "train.global_batch_size=7", "parallel.dp=2", "model.vocab.padded_size=1000",
                            "train.stepz=3", "model.transformer.hidden_sizee=8", "train.dtype=fp8"], {})

    tok = os.path.join(root, "tokenizer.json")
    size = _tokenizer(tok)
    assert size != 256
    cases["tokenizer"] = (["data.tokenizer.kind=hf", f"data.tokenizer.path={tok}", "model.vocab.text_vocab_size=256"],
                          {"path": tok, "size": size})

    cases["two_codecs"] = ([f"data.paths=[{data.good},{data.other_codec}]"], {})
    cases["data_settings"] = (["data.pack_window=0", "data.num_workers=0", "data.prefetch=-1"], {})
    cases["megatron_types"] = (["model.transformer.ffn_hidden_size=abc", "optim.optimizer.lr=fast"], {})
    cases["all_too_long"] = ([f"data.paths=[{data.good}]", "data.seq_len=16"], {})
    cases["config_is_dir"] = ([], {"config": "configs"})
    run_file = os.path.join(root, "run_dir_is_a_file")
    with open(run_file, "w") as f:
        f.write("not a directory")
    cases["run_dir_is_file"] = ([], {"run_dir": run_file})

    for name, (_, facts) in cases.items():
        facts.setdefault("run_dir", os.path.join(root, f"run_{name}"))
    results = clis(*[(f["run_dir"], RUN + o, f.get("config", "configs/tiny.yaml")) for o, f in cases.values()])
    return {name: (r, facts) for (name, (_, facts)), r in zip(cases.items(), results)}


def test_missing_dataset_path(fatal):
    r, facts = fatal["missing_path"]
    msg = assert_fatal(r, f"dataset path {facts['path']} does not exist")
    assert msg.count("\n") == 1  # one line


def test_missing_dataset_index(fatal):
    r, facts = fatal["missing_index"]
    assert_fatal(r, f"cannot load dataset index of {facts['path']}", "missing dataset index",
                 f"python -m data_pipeline index {facts['path']}/*.tar --dataset {facts['path']}")


def test_two_codecs_of_the_same_size_do_not_train_together(fatal, data):
    r, _ = fatal["two_codecs"]
    assert_fatal(r, f"datasets {data.good} and {data.other_codec} were tokenized by different codecs",
                 "sample_rate: 22050.0 vs 16000.0", "checkpoint_sha256:", "must not share token ids")


def test_data_settings_out_of_range(fatal):
    r, _ = fatal["data_settings"]
    assert_fatal(r, "3 problem(s)", "data.pack_window=0: must be >= 1", "data.num_workers=0: must be in [1, 64]",
                 "data.prefetch=-1: must be in [0, 64]")


def test_megatron_fields_of_the_wrong_type(fatal):
    r, _ = fatal["megatron_types"]
    assert_fatal(r, "model.transformer.ffn_hidden_size: expected int, got 'abc'",
                 "optim.optimizer.lr: expected float, got 'fast'")


def test_every_sample_longer_than_seq_len_is_one_line(fatal):
    r, _ = fatal["all_too_long"]
    msg = assert_fatal(r, "a whole epoch produced no packs: every sample is longer than seq_len=16")
    assert msg.count("\n") == 1
    assert len(re.findall(r"tokens > seq_len=16; skipped", r.stderr)) <= 5  # not one warning per sample


def test_config_that_is_a_directory(fatal):
    r, _ = fatal["config_is_dir"]
    assert_fatal(r, "--config configs is a directory; give a recipe file")


def test_run_dir_that_is_a_file(fatal):
    r, facts = fatal["run_dir_is_file"]
    assert_fatal(r, f"train.run_dir={facts['run_dir']} is a file, not a directory")
    with open(facts["run_dir"]) as f:
        assert f.read() == "not a directory"  # untouched


def test_missing_sidecar_index(fatal):
    r, facts = fatal["missing_sidecar"]
    msg = assert_fatal(r, f"cannot load the sidecar index of shard {facts['shard']}", "missing shard index")
    assert msg.count("\n") == 1


def test_corrupt_sidecar_index(fatal):
    r, facts = fatal["corrupt_sidecar"]
    msg = assert_fatal(r, f"cannot load the sidecar index of shard {facts['shard']}", "corrupt shard index")
    assert msg.count("\n") == 1


def test_bad_config_lists_every_problem(fatal):
    r, facts = fatal["bad_config"]
    msg = assert_fatal(r, "7 problem(s) in configs/tiny.yaml",
                       "num_attention_heads=4 is not divisible by parallel.tp=3",
                       "num_query_groups=2 is not divisible by parallel.tp=3",
                       "global_batch_size=7 is not divisible", "padded_size=1000 is not a multiple",
                       "train.stepz: unknown key", "model.transformer.hidden_sizee: not a field",
                       "train.dtype: 'fp8' unknown")
    assert msg.count("\n  - ") == 7
    assert not os.path.exists(facts["run_dir"])  # nothing was created


def test_tokenizer_vocab_mismatch(fatal):
    r, facts = fatal["tokenizer"]
    msg = assert_fatal(r, facts["path"], f"has vocab_size {facts['size']}",
                       "configured text vocab size (expected_vocab_size) is 256")
    assert msg.count("\n") == 1


def test_torchrun_reports_the_fatal_exit_code_of_every_rank(tmp_path):
    """Under torchrun every rank prints the error; the agent itself exits 1 but names exit code 3."""
    r = pretrain(str(tmp_path / "run"), RUN + ["parallel.tp=3"], nproc=2)
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] error: 2 problem(s) in configs/tiny.yaml" in r.output, r.output[-3000:]
    assert re.search(r"exitcode\s*:\s*3\b", r.output), r.output[-3000:]


# ------------------------------------------------------------------- skipped and counted


@pytest.fixture(scope="module")
def skip_run(data, tmp_path_factory):
    """One 3-step run over every dataset with skippable damage (plus good data)."""
    paths = ",".join([data.good, data.damaged, data.bad_codes, data.too_long])
    # ~26 packs per epoch: 3 steps of 16 packs go past its end
    overrides = RUN + ["train.global_batch_size=16", "train.micro_batch_size=2", f"data.paths=[{paths}]"]
    r = pretrain(str(tmp_path_factory.mktemp("skip_run") / "run"), overrides, nproc=1)
    assert r.returncode == 0, r.output[-3000:]
    assert "Traceback" not in r.output
    rec = last_step(r.metrics())
    # every sample was visited at least once: the run went past the end of epoch 0
    assert rec["step"] == 3 and rec["epoch"] >= 1, rec
    assert all(x["loss"] == x["loss"] for x in r.metrics() if "loss" in x)  # no NaN
    return r, rec


def test_missing_tar_is_skipped_and_counted(skip_run, data):
    r, rec = skip_run
    exp = data.expect
    # one error naming the shard; its samples count as skipped_bad_shard
    assert re.search(rf"shard {re.escape(exp['missing_tar'])} is unreadable .*its samples are skipped", r.output)
    assert rec["skipped_bad_shard"] >= len(exp["missing_tar_keys"])
    assert not warned_keys(r.output, "is damaged") & exp["missing_tar_keys"]


def test_damaged_tars_are_skipped_and_counted(skip_run, data):
    """0-byte, overwritten and truncated tars: exactly their damaged samples are named and counted
    (as skipped_bad_sample: the file opens, its byte ranges do not parse)."""
    r, rec = skip_run
    exp = data.expect
    damaged = warned_keys(r.output, "is damaged") - exp["bad_code_keys"]
    assert damaged == exp["damaged_keys"], (damaged, exp["damaged_keys"])
    assert not warned_keys(r.output, "is damaged") & exp["ok_damaged_keys"]
    for reason in ("truncated range", "bad tar header"):
        assert reason in r.output, reason
    assert rec["skipped_bad_sample"] >= len(exp["damaged_keys"] | exp["bad_code_keys"])


def test_codes_outside_the_codebook_are_skipped_and_counted(skip_run, data):
    """Codec 256 with codes >= 256 (written without ShardWriter's check): per-sample skips."""
    r, rec = skip_run
    exp = data.expect
    outside = set(re.findall(r"sample (\S+) of shard \S+ is damaged \(code \d+ at \(codebook 0, frame \d+\) "
                             r"outside the codebook range \[0, 256\)", r.output))
    assert outside == exp["bad_code_keys"], outside
    assert rec["skipped_bad_sample"] >= len(outside)


def test_codec_larger_than_the_vocab_is_fatal(fatal):
    """A whole dataset tokenized with a bigger codebook is a configuration error, not bad samples."""
    r, facts = fatal["codec_mismatch"]
    msg = assert_fatal(r, f"dataset {facts['path']} has codec codebook_size 1024 > model.vocab.codebook_size=256",
                       "set model.vocab.codebook_size=1024")
    assert msg.count("\n") == 1


def test_too_long_sample_is_skipped_and_counted(skip_run, data):
    r, rec = skip_run
    key = data.expect["too_long_key"]
    found = re.findall(rf"sample {re.escape(key)} of shard \S+ is (\d+) tokens > seq_len={SEQ_LEN}; skipped", r.output)
    assert len(found) == 1 and int(found[0]) > SEQ_LEN, r.output[-3000:]
    assert len(re.findall(r"tokens > seq_len=", r.output)) == 1  # no other sample
    # counted once per epoch plan
    assert rec["skipped_too_long"] in (rec["epoch"], rec["epoch"] + 1), rec
