"""Hugging Face in and out, in-process (a world of one, gloo): a random HF Llama built with
transformers imports into the model and exports back bit for bit; the extension rows are drawn as
transformers' mean resizing draws them; every bad checkpoint is named."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
if torch.cuda.is_available():
    pytest.skip("in-process CPU world", allow_module_level=True)

from megatron_tts.checkpoint.checkpointer import Checkpointer  # noqa: E402
from megatron_tts.config import ConfigError, dump_yaml, load_config, real_vocab_size  # noqa: E402
from megatron_tts.hf.exporter import export  # noqa: E402
from megatron_tts.hf.importer import extend_rows, load_hf  # noqa: E402
from megatron_tts.train.build import TrainState, build_model_and_optimizer  # noqa: E402
from megatron_tts.compat.mcore import unwrap  # noqa: E402
from megatron_tts.hf.tokenizer import byte_tokenizer, export_tokenizer  # noqa: E402
from data_pipeline.layouts import LLASA_SPECIAL_TOKENS, VocabLayout  # noqa: E402
from tests.helpers import REPO, SMALL, world_of_one  # noqa: E402
from tests.hf_models import recipe_overrides, save_random_llama  # noqa: E402

TINY = os.path.join(REPO, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def world():
    with world_of_one(load_config(TINY, SMALL)):
        yield


def hf_dir(tmp_path, name: str, vocab: int, **shape) -> tuple[str, dict]:
    d = str(tmp_path / name)
    tensors = save_random_llama(d, vocab, **shape)
    tok = byte_tokenizer()
    if vocab == 256:
        tok.save(os.path.join(d, "tokenizer.json"))
    else:  # an extended model carries the extended tokenizer
        export_tokenizer(d + "_tok", VocabLayout(256, list(LLASA_SPECIAL_TOKENS), 1, 256), None)
        shutil.copy(os.path.join(d + "_tok", "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    return d, tensors


def import_save_export(tmp_path, src: str, overrides: list[str]) -> tuple[dict, object]:
    from safetensors.torch import load_file

    cfg = load_config(TINY, SMALL + overrides + [f"train.run_dir={tmp_path / 'run'}", "train.dtype=fp32"])
    model, optimizer, _ = build_model_and_optimizer(cfg)
    summary = load_hf([unwrap(m) for m in model], cfg, src)
    assert "initialised from" in summary
    from megatron_tts.compat.mcore import parallel_state
    from megatron_tts.parallel import Layout

    lay = Layout(0, 1, 0, 1, 1, 1, 0, 0, 0, torch.device("cpu"))
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"), lay, model, optimizer, {"train": TrainState()},
                      config=cfg.checkpoint, distributed_optimizer=False, seed=0, config_text=dump_yaml(cfg))
    try:
        assert ck.save(1)
    finally:
        ck.close()
    out = str(tmp_path / "exported")
    export(str(tmp_path / "run"), out)
    return load_file(os.path.join(out, "model.safetensors")), cfg


@pytest.mark.parametrize("tied,scaled", [(True, True), (False, False)], ids=["tied_llama3", "untied_plain"])
def test_an_extended_model_imports_and_exports_bit_for_bit(world, tmp_path, tied, scaled):
    src, want = hf_dir(tmp_path, "hf", 520, tied=tied, scaled=scaled)  # 256 text + 8 specials + 256 codes
    got, _ = import_save_export(tmp_path, src, recipe_overrides(tied=tied, scaled=scaled))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_base_model_keeps_its_text_rows_and_grows_mean_resized_rows(world, tmp_path):
    src, want = hf_dir(tmp_path, "hf", 256)
    got, cfg = import_save_export(tmp_path, src, recipe_overrides())
    emb = got["model.embed_tokens.weight"]
    assert emb.shape == (real_vocab_size(cfg), 64)
    assert torch.equal(emb[:256], want["model.embed_tokens.weight"])  # text rows exactly
    for k in want:
        if k != "model.embed_tokens.weight":
            assert torch.equal(got[k], want[k]), k
    new = emb[256:]
    mean = want["model.embed_tokens.weight"].mean(dim=0)
    assert torch.allclose(new, mean.expand_as(new), atol=1e-3)  # mean + N(0, 1e-9 cov): within noise
    assert not torch.equal(new[0], new[1])  # sampled, not the bare mean
    again = extend_rows(want["model.embed_tokens.weight"], 264, seed=7)
    assert torch.equal(again, extend_rows(want["model.embed_tokens.weight"], 264, seed=7))  # seeded


def test_bad_checkpoints_are_named(world, tmp_path):
    cfg = load_config(TINY, SMALL + recipe_overrides())
    model, _, _ = build_model_and_optimizer(cfg)
    chunks = [unwrap(m) for m in model]

    def problem(path) -> str:
        with pytest.raises(ConfigError) as info:
            load_hf(chunks, cfg, path)
        return str(info.value)

    src, _ = hf_dir(tmp_path, "hf", 256)
    assert "rope_theta=500000.0 but the recipe's model.rotary_base=10000.0" in problem_for(cfg, src, tmp_path)
    wrong_vocab, _ = hf_dir(tmp_path, "v300", 300)
    assert "vocab_size=300 matches neither the recipe's text vocabulary (256" in problem(wrong_vocab)
    unscaled, _ = hf_dir(tmp_path, "unscaled", 256, scaled=False)
    assert "has no rope scaling but the recipe sets model.rope_scaling=true" in problem(unscaled)
    mistral = str(tmp_path / "mistral")
    shutil.copytree(src, mistral)
    c = json.load(open(os.path.join(mistral, "config.json")))
    c.update(architectures=["MistralForCausalLM"], model_type="mistral")
    json.dump(c, open(os.path.join(mistral, "config.json"), "w"))
    assert "describes ['MistralForCausalLM'], not a LlamaForCausalLM" in problem(mistral)
    sharded = str(tmp_path / "sharded")
    shutil.copytree(src, sharded)
    os.rename(os.path.join(sharded, "model.safetensors"), os.path.join(sharded, "model-00001-of-00002.safetensors"))
    from safetensors import safe_open

    names = list(safe_open(os.path.join(sharded, "model-00001-of-00002.safetensors"), "pt").keys())
    json.dump({"weight_map": {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}},
              open(os.path.join(sharded, "model.safetensors.index.json"), "w"))
    assert "model-00002-of-00002.safetensors listed in model.safetensors.index.json are missing" in problem(sharded)
    ext, _ = hf_dir(tmp_path, "ext", 520)
    byte_tokenizer().save(os.path.join(ext, "tokenizer.json"))  # the base tokenizer beside extended weights
    assert "lacks the special tokens of an extended model" in problem(ext)


def problem_for(cfg, path, tmp_path) -> str:
    other = load_config(TINY, SMALL + recipe_overrides() + ["model.rotary_base=10000"])
    model, _, _ = build_model_and_optimizer(other)
    with pytest.raises(ConfigError) as info:
        load_hf([unwrap(m) for m in model], other, path)
    return str(info.value)
