"""Model in, model out, on real processes: checkpoints trained under TP=2, and PP=2 x DP=2 with
the distributed optimizer, export to Hugging Face models whose logits equal the project's model's
(fp32, 1e-5); a run started from an HF model has transformers' first-step loss; greedy sampling on
a checkpoint equals transformers.generate on its export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from megatron_tts.config import load_config  # noqa: E402
from tests.helpers import REPO, SMALL, pretrain, world_of_one  # noqa: E402
from tests.hf_models import recipe_overrides, save_random_llama  # noqa: E402

pytestmark = pytest.mark.slow
TINY = os.path.join(REPO, "configs", "tiny.yaml")
BASE = SMALL + ["train.steps=2", "checkpoint.interval=2", "logging.console=false", "train.dtype=fp32"]
LAYOUTS = {  # name: (processes, overrides)
    "tp2_tied_llama3": (2, ["parallel.tp=2"] + recipe_overrides(tied=True, scaled=True)),
    # PP=2 x DP=2 with the distributed optimizer in one run: its checkpoint holds pipeline stages
    # and optimizer shards at once (one 4-process run costs less than two 2-process ones)
    "pp2_dp2_distopt_untied": (4, ["parallel.pp=2", "optim.distributed=true"] + recipe_overrides(tied=False,
                                                                                                 scaled=False)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, (nproc, overrides) in LAYOUTS.items():
        r = pretrain(str(tmp_path_factory.mktemp(name) / "run"), BASE + overrides, nproc=nproc)
        assert r.returncode == 0, r.output[-3000:]
        hf = os.path.join(os.path.dirname(r.run_dir), "hf")
        from megatron_tts.hf.__main__ import main as hf_main

        assert hf_main(["export", r.run_dir, "--out", hf]) == 0
        out[name] = (r.run_dir, hf, overrides)
    return out


@pytest.fixture(scope="module")
def world():
    with world_of_one(load_config(TINY, SMALL)):
        yield


def project_logits(run_dir: str, overrides: list[str], ids: torch.Tensor) -> torch.Tensor:
    """The megatron model's logits (TP=1, PP=1 here) with the checkpoint's weights, resharded."""
    from megatron_tts.checkpoint import format as fmt
    from megatron_tts.compat.dist_ckpt import safe_unpickling
    from megatron_tts.compat.mcore import dist_checkpointing, model_parallel_cuda_manual_seed
    from megatron_tts.model import build_model_chunks

    model_parallel_cuda_manual_seed(0)  # the model-parallel RNG tracker init uses
    cfg = load_config(TINY, SMALL + overrides + ["parallel.tp=1", "parallel.pp=1", "train.dtype=fp32"])
    (model,) = build_model_chunks(cfg)
    ckpt = fmt.committed_checkpoints(os.path.join(run_dir, "checkpoints"))[-1][1]
    with safe_unpickling():
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(loaded["model"])
    model.eval()
    s = ids.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        return model(ids, torch.arange(s)[None], mask)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exported_logits_equal_the_projects(world, runs, name):
    from transformers import AutoModelForCausalLM

    run_dir, hf, overrides = runs[name]
    model, info = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = json.load(open(os.path.join(hf, "config.json")))
    assert cfg["vocab_size"] == 520 and cfg["tie_word_embeddings"] == ("untied" not in name)
    ids = torch.randint(0, 520, (2, 300), generator=torch.Generator().manual_seed(0))
    ours = project_logits(run_dir, overrides, ids)[..., :520]
    with torch.no_grad():
        theirs = model.eval()(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit difference| = {diff:.2e}")
    assert diff <= 1e-5


def test_greedy_sampling_on_a_checkpoint_equals_transformers_on_its_export(runs):
    from transformers import AutoModelForCausalLM

    from megatron_tts.generate.model import load, prompt_ids
    from megatron_tts.generate.sample import Sampling, generate

    run_dir, hf, _ = runs["tp2_tied_llama3"]
    lm = load(run_dir)
    prompt = prompt_ids(lm, "The birch canoe slid on the smooth planks.")
    ours, _ = generate(lm, prompt, Sampling(greedy=True, max_tokens=40, speech_only=False))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                         eos_token_id=lm.special("<|SPEECH_GENERATION_END|>"), pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    if theirs and theirs[-1] == lm.special("<|SPEECH_GENERATION_END|>"):
        theirs = theirs[:-1]
    assert ours == theirs and len(ours) > 0
    hf_lm = load(hf)  # the exported directory samples the same
    assert generate(hf_lm, prompt_ids(hf_lm, "The birch canoe slid on the smooth planks."),
                    Sampling(greedy=True, max_tokens=40, speech_only=False))[0] == ours


# (one process is the special case of both: every rank would load whole tensors)
@pytest.mark.parametrize("nproc,layout", [(2, ["parallel.tp=2"]),
                                          (2, ["parallel.pp=2", "parallel.vpp=2", "model.transformer.num_layers=4"])],
                         ids=["tp2", "pp2_vpp2"])
def test_a_run_from_an_hf_model_starts_at_transformers_loss(tmp_path, nproc, layout):
    """train.init_from=hf: the first step's loss is transformers' loss of that model on the same
    batch, the documents unpacked and framed the same way, under any layout (every rank loads
    only its slices)."""
    from transformers import AutoModelForCausalLM

    from data_pipeline.layouts import build_layout
    from data_pipeline.shards import DatasetIndex, read_shard
    from data_pipeline.tokenizer import ByteTokenizer
    from megatron_tts.config import vocab_layout
    from megatron_tts.hf.tokenizer import export_tokenizer

    hf = str(tmp_path / "hf")
    save_random_llama(hf, 520, tied=True, scaled=True)
    from data_pipeline.layouts import LLASA_SPECIAL_TOKENS, VocabLayout

    export_tokenizer(hf, VocabLayout(256, list(LLASA_SPECIAL_TOKENS), 1, 256), None)
    overrides = recipe_overrides() + ["train.steps=1", "logging.ledger=true", "train.dtype=fp32",
                                      f"train.init_from=hf:{hf}", "checkpoint.interval=100"] + layout
    r = pretrain(str(tmp_path / "run"), SMALL + overrides, nproc=nproc)
    assert r.returncode == 0, r.output[-3000:]
    assert "train.init_from: initialised from" in r.output and "extended model" not in r.output
    loss = r.losses()[1]
    # the documents of step 1, from the ledger
    rows = [json.loads(x) for x in open(os.path.join(r.run_dir, "ledger", "rank_00000.jsonl"))][0]["rows"]
    keys = [k for row in rows for k in row["keys"]]
    demo = os.path.join(REPO, "data", "demo")
    samples = {f"{os.path.basename(u)}:{s.key}": s for u in DatasetIndex.load(demo).shard_urls() for s in read_shard(u)}
    cfg = load_config(TINY, SMALL + overrides)
    layout = build_layout("llasa", vocab_layout(cfg), cfg.model.loss_segments)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for k in keys:
        s = samples[k]
        enc = layout.encode(ByteTokenizer().encode(s.text), s.codes)
        ids = torch.tensor(enc.ids)[None]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        target = torch.tensor(enc.target_mask[1:])
        ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float(ce[target].sum())
        count += int(target.sum())
    print(f"first-step loss {loss:.8f}, transformers {total / count:.8f}")
    assert abs(loss - total / count) <= 1e-5, (loss, total / count)
    assert np.isfinite(loss)


def test_generate_cli_speaks_with_the_runs_codec_and_continues_a_voice(runs, tmp_path):
    import subprocess
    import sys
    import wave

    from data_pipeline.codecs import load_codec
    from data_pipeline.shards import DatasetIndex, read_shard
    from megatron_tts.generate.audio import write_wav
    from tests.helpers import env

    run_dir = runs["tp2_tied_llama3"][0]
    demo = os.path.join(REPO, "data", "demo")
    ref = next(read_shard(DatasetIndex.load(demo).shard_urls()[0]))
    codec = load_codec("mel-kmeans", demo)
    prompt_wav = str(tmp_path / "prompt.wav")
    write_wav(prompt_wav, codec.decode(ref.codes), codec.sample_rate)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "megatron_tts.generate", "--checkpoint", run_dir, *args],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)

    out = str(tmp_path / "speech.wav")
    r = cli("--text", "Hello there.", "--out", out, "--greedy", "--max-tokens", "30", "--print-ids")
    assert r.returncode == 0, r.stderr[-2000:]
    codes = [int(c) for c in r.stdout.split()]
    assert 0 < len(codes) <= 30 and all(0 <= c < 256 for c in codes)
    with wave.open(out) as w:
        assert w.getframerate() == codec.sample_rate
        assert abs(w.getnframes() / w.getframerate() - len(codes) / 50.0) < 0.05  # 50 frames per second
    r2 = cli("--text", "Hello there.", "--out", out, "--greedy", "--max-tokens", "30", "--print-ids",
             "--prompt-audio", prompt_wav, "--prompt-text", ref.text)
    assert r2.returncode == 0, r2.stderr[-2000:]
    bad = cli("--text", "x", "--out", out, "--codec-path", str(tmp_path))
    assert bad.returncode == 3 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr, bad.stderr
