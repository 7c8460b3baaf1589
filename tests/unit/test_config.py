"""The typed config tree: recipes, overrides, validation (one ConfigError listing every problem),
the resolved dump's round trip, and the absence of side effects."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from megatron_tts.config import (
    Config,
    ConfigError,
    build_config,
    dump_yaml,
    load_config,
    padded_vocab_size,
    validate_world,
    vocab_layout,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def recipe(name: str) -> str:
    return os.path.join(REPO, "configs", f"{name}.yaml")


def problems(overrides: list[str], path: str = TINY) -> list[str]:
    """The problems of the single ConfigError that loading raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    err = info.value
    # The message carries every problem, one per line, with the count in its first line.
    text = str(err)
    assert text.startswith(f"{len(err.problems)} problem(s) in ")
    for p in err.problems:
        assert f"  - {p}" in text
    return err.problems


def one(problem_list: list[str], *needles: str) -> str:
    """The one problem that mentions every needle."""
    hits = [p for p in problem_list if all(n in p for n in needles)]
    assert len(hits) == 1, f"{needles} not reported exactly once in {problem_list}"
    return hits[0]


# ------------------------------------------------------------------------------------ recipes


def test_recipes_are_there():
    names = {os.path.basename(r) for r in RECIPES}
    assert {"tiny.yaml", "llasa-1b.yaml", "llasa-3b.yaml", "llasa-8b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads(path):
    cfg = load_config(path)  # first: importing megatron.core needs the CPU layer's triton stand-in
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    assert isinstance(cfg, Config)
    t = cfg.model.transformer
    assert isinstance(t, TransformerConfig)
    assert isinstance(cfg.parallel.ddp, DistributedDataParallelConfig)
    assert isinstance(cfg.optim.optimizer, OptimizerConfig)
    # the fields our tree owns are filled in from it
    assert t.tensor_model_parallel_size == cfg.parallel.tp
    assert t.pipeline_model_parallel_size == cfg.parallel.pp
    assert t.sequence_parallel == cfg.parallel.sequence_parallel
    assert t.calculate_per_token_loss is True
    assert cfg.parallel.ddp.use_distributed_optimizer == cfg.optim.distributed
    assert cfg.optim.optimizer.use_distributed_optimizer == cfg.optim.distributed
    with open(path) as f:
        raw = yaml.safe_load(f)
    for k, v in raw["model"]["transformer"].items():
        if k != "activation_func":
            assert getattr(t, k) == v, k
    assert padded_vocab_size(cfg) % (128 * max(cfg.parallel.tp, 8)) == 0
    assert padded_vocab_size(cfg) >= vocab_layout(cfg).vocab_size


@pytest.mark.parametrize("name", ["llasa-1b", "llasa-3b", "llasa-8b"])
def test_llasa_recipes_vocab(name):
    # tokenizer.kind=hf with a path that does not exist here: the path is only opened when the
    # loader starts, so the recipe still loads.
    cfg = load_config(recipe(name))
    assert cfg.data.tokenizer.kind == "hf"
    assert cfg.data.tokenizer.path and not os.path.exists(cfg.data.tokenizer.path)
    assert cfg.model.vocab.text_vocab_size == 128256
    assert cfg.model.vocab.codebook_size == 65536
    lay = vocab_layout(cfg)
    assert lay.vocab_size == 128256 + 8 + 65536 == 193800
    assert lay.speech_offset == 128264
    assert padded_vocab_size(cfg) == 194560


def test_llasa_hf_tokenizer_needs_a_path():
    errs = problems(["data.tokenizer.path=null"], recipe("llasa-1b"))
    one(errs, "data.tokenizer.path", "required")


def test_tiny_vocab():
    cfg = load_config(TINY)
    assert vocab_layout(cfg).vocab_size == 256 + 8 + 256
    assert padded_vocab_size(cfg) == 1024  # a multiple of 128 x 8: reshards over any TP <= 8


# ---------------------------------------------------------------------------------- overrides


def test_dotted_overrides():
    cfg = load_config(TINY, [
        "model.transformer.hidden_size=32",
        "model.transformer.ffn_hidden_size=96",
        "data.paths=[/a/b, s3://bucket/ds]",
        "model.loss_segments=[text, speech, speech_end]",
        "train.steps=7",
        "optim.optimizer.lr=0.5",
        "optim.schedule.decay_style=linear",
        "parallel.ddp.bucket_size=1234",  # a megatron section the recipe does not have
        "checkpoint.dir=",  # empty value = None
        "data.tokenizer.kind=byte",
    ])
    assert cfg.model.transformer.hidden_size == 32
    assert cfg.model.transformer.ffn_hidden_size == 96
    assert cfg.model.transformer.num_layers == 4  # the rest of the section stays
    assert cfg.data.paths == ["/a/b", "s3://bucket/ds"]
    assert cfg.model.loss_segments == ["text", "speech", "speech_end"]
    assert cfg.train.steps == 7
    assert cfg.optim.optimizer.lr == 0.5
    assert cfg.optim.schedule.decay_style == "linear"
    assert cfg.parallel.ddp.bucket_size == 1234
    assert cfg.checkpoint.dir is None
    assert cfg.checkpoint_dir == os.path.join(cfg.train.run_dir, "checkpoints")


def test_overrides_of_parallel_sizes_reach_megatron():
    cfg = load_config(TINY, ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2", "parallel.sequence_parallel=true",
                             "optim.distributed=true", "train.dtype=bf16"])
    import torch

    t = cfg.model.transformer
    assert (t.tensor_model_parallel_size, t.pipeline_model_parallel_size) == (2, 2)
    assert t.virtual_pipeline_model_parallel_size == 2
    assert t.sequence_parallel and t.bf16 and t.params_dtype == torch.bfloat16
    assert cfg.parallel.ddp.use_distributed_optimizer and cfg.optim.optimizer.use_distributed_optimizer


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(TINY, ["train.steps"])
    with pytest.raises(ConfigError, match="'steps' is a value, not a section"):
        load_config(TINY, ["train.steps.x=1"])


def test_missing_and_invalid_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


# --------------------------------------------------------------------------------- validation


def test_all_problems_in_one_error():
    errs = problems([
        "parallel.tp=3",  # heads 4 and query groups 2 not divisible
        "parallel.pp=3",  # 4 layers not divisible
        "parallel.dp=2", "train.global_batch_size=7",  # 7 % (2 x 2)
        "model.vocab.padded_size=1000",  # not a multiple of 128 x 3
        "bogus.key=1",  # unknown section
        "model.bogus=1",  # unknown key in our section
        "model.transformer.hidden_sizee=64",  # unknown key in a megatron section
        "model.transformer.tensor_model_parallel_size=2",  # owned by parallel.tp
        "train.steps=abc",  # wrong type
        "model.layout=weird",  # bad enum
        "train.dtype=fp8",  # bad enum
    ])
    assert len(errs) == 12, errs
    one(errs, "num_attention_heads=4", "parallel.tp=3", "choose tp from [1, 2, 4]")
    one(errs, "num_query_groups=2", "parallel.tp=3", "choose tp from [1, 2]")
    one(errs, "num_layers=4", "pp*vpp=3", "choose pp*vpp from [1, 2, 4]")
    one(errs, "global_batch_size=7", "2 x 2 = 4", "use 4 or 8")
    one(errs, "padded_size=1000", "128 x tp = 384", "use 1152")
    one(errs, "bogus: unknown section", "valid sections are model, parallel")
    one(errs, "model.bogus: unknown key", "valid keys are transformer")
    one(errs, "model.transformer.hidden_sizee", "not a field of TransformerConfig", "spelling")
    one(errs, "model.transformer.tensor_model_parallel_size", "set it through parallel.tp")
    one(errs, "train.steps", "expected int", "'abc'")
    one(errs, "model.layout", "'weird'", "use llasa or flattened")
    one(errs, "train.dtype", "'fp8'", "use auto, bf16 or fp32")


@pytest.mark.parametrize("overrides, needles", [
    (["parallel.tp=3"], ["num_attention_heads=4 is not divisible by parallel.tp=3", "choose tp from [1, 2, 4]"]),
    (["model.transformer.num_attention_heads=6", "model.transformer.num_query_groups=3", "parallel.tp=2"],
     ["num_query_groups=3 is not divisible by parallel.tp=2", "choose tp from [1, 3]"]),
    (["model.transformer.num_query_groups=3"], ["num_attention_heads=4 is not divisible by num_query_groups=3"]),
    (["model.transformer.num_layers=3", "parallel.pp=2"], ["num_layers=3 is not divisible by parallel.pp*vpp=2",
                                                           "choose pp*vpp from [1, 3]"]),
    (["parallel.pp=2", "parallel.vpp=4"], ["num_layers=4 is not divisible by parallel.pp*vpp=8"]),
    (["parallel.vpp=2"], ["parallel.vpp", "needs parallel.pp >= 2"]),
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "needs parallel.tp >= 2"]),
    (["parallel.dp=2", "train.global_batch_size=6"], ["global_batch_size=6 is not divisible by micro_batch_size x dp",
                                                      "2 x 2 = 4", "use 4 or 8"]),
    (["model.vocab.padded_size=512"], ["padded_size=512 is smaller than the vocab (520)", "use 640"]),
    (["parallel.tp=2", "model.vocab.padded_size=640"], ["padded_size=640 is not a multiple of 128 x tp = 256",
                                                         "use 768 or omit it"]),
    (["parallel.tp=0"], ["parallel.tp: must be >= 1, got 0"]),
    (["parallel.dp=0"], ["parallel.dp: must be >= 1 or omitted"]),
    (["train.global_batch_size=0"], ["train.global_batch_size: must be >= 1"]),
    (["model.vocab.n_codebooks=7"], ["n_codebooks", "use model.layout=flattened"]),
    (["model.vocab.text_vocab_size=300"], ["text_vocab_size=300 but the byte tokenizer has 256 ids"]),
    (["data.paths=[]"], ["data.paths: empty"]),
    (["optim.schedule.decay_style=WSD"], ["wsd_decay_steps: required with decay_style=WSD"]),
    (["model.transformer.activation_func=tanh"], ["activation_func: 'tanh' unknown", "['gelu', 'relu', 'silu']"]),
    (["model.transformer=null"], ["model.transformer: missing"]),
])
def test_each_validation(overrides, needles):
    errs = problems(overrides)
    one(errs, *needles)


@pytest.mark.parametrize("overrides, needles", [
    (["parallel.backend=mpi"], ["parallel.backend: 'mpi' unknown", "auto, nccl or gloo"]),
    (["model.layer_spec=fast"], ["model.layer_spec: 'fast' unknown", "auto, te or local"]),
    (["model.core_attention=flash"], ["model.core_attention: 'flash' unknown", "sdpa or megatron"]),
    (["model.init=zeros"], ["model.init: 'zeros' unknown", "layout_invariant or megatron"]),
    (["data.tokenizer.kind=sentencepiece"], ["data.tokenizer.kind: 'sentencepiece' unknown", "byte or hf"]),
    (["optim.schedule.decay_style=fancy"], ["decay_style: 'fancy' unknown", "cosine, linear, constant or WSD"]),
    (["model.loss_segments=[speech, noise]"], ["model.loss_segments: ['noise'] unknown", "choose from"]),
])
def test_bad_enum_strings(overrides, needles):
    one(problems(overrides), *needles)


@pytest.mark.parametrize("overrides, needles", [
    (["parallel.tp=abc"], ["parallel.tp: expected int, got 'abc'"]),
    (["parallel.dp=abc"], ["parallel.dp: expected int, got 'abc'"]),
    (["parallel.vpp=x"], ["parallel.vpp: expected int, got 'x'"]),
    (["train.steps=1.5"], ["train.steps: expected int, got 1.5"]),
    (["train.seed=true"], ["train.seed: expected int, got True"]),
    (["train.global_batch_size=abc"], ["train.global_batch_size: expected int"]),
    (["model.vocab.codebook_size=abc"], ["model.vocab.codebook_size: expected int"]),
    (["parallel.timeout_s=soon"], ["parallel.timeout_s: expected float"]),
    (["logging.console=3"], ["logging.console: expected bool, got 3"]),
    (["data.paths=data/demo"], ["data.paths: expected a list"]),
    (["data.paths=[1]"], ["data.paths[0]: expected str, got 1"]),
    (["model.loss_segments=speech"], ["model.loss_segments: expected a list"]),
    (["model.vocab.special_tokens=3"], ["model.vocab.special_tokens: expected a list"]),
    (["data.tokenizer=5"], ["data.tokenizer: expected a mapping"]),
    (["parallel=3"], ["parallel: expected a mapping"]),
    (["model.transformer.num_layers=abc"], ["model.transformer.num_layers: expected int, got 'abc'"]),
    (["model.transformer=5"], ["model.transformer: expected a mapping of TransformerConfig fields"]),
    (["parallel.ddp=5"], ["parallel.ddp: expected a mapping of DistributedDataParallelConfig fields"]),
    (["optim.optimizer=[1]"], ["optim.optimizer: expected a mapping of OptimizerConfig fields"]),
])
def test_wrong_types_are_problems_not_crashes(overrides, needles):
    # exactly one problem: a wrongly typed value must not also trip the checks that use it
    errs = problems(overrides)
    assert len(errs) == 1, errs
    one(errs, *needles)


def test_wrong_types_listed_with_other_problems():
    errs = problems(["parallel.tp=abc", "model.transformer.num_layers=x", "model.transformer.hidden_sizee=1",
                     "train.dtype=fp8"])
    assert len(errs) == 4, errs


@pytest.mark.parametrize("overrides, needles", [
    (["model.transformer.tensor_model_parallel_size=2"], ["set it through parallel.tp"]),
    (["model.transformer.pipeline_model_parallel_size=2"], ["set it through parallel.pp"]),
    (["model.transformer.sequence_parallel=true"], ["set it through parallel.sequence_parallel"]),
    (["model.transformer.bf16=true"], ["set it through train.dtype"]),
    (["model.transformer.calculate_per_token_loss=false"], ["calculate_per_token_loss", "fixed"]),
    (["parallel.ddp.use_distributed_optimizer=true"], ["set it through optim.distributed"]),
    (["optim.optimizer.use_distributed_optimizer=true"], ["set it through optim.distributed"]),
    (["optim.optimizer.params_dtype=float32"], ["set it through train.dtype"]),
])
def test_owned_fields_inside_megatron_sections(overrides, needles):
    one(problems(overrides), *needles)


@pytest.mark.parametrize("key, needles", [
    ("wandb.project=x", ["wandb: unknown section"]),
    ("train.stepz=3", ["train.stepz: unknown key", "valid keys are steps"]),
    ("data.tokenizer.vocab=3", ["data.tokenizer.vocab: unknown key", "valid keys are kind, path"]),
    ("model.vocab.size=3", ["model.vocab.size: unknown key"]),
    ("optim.schedule.warmup=3", ["optim.schedule.warmup: unknown key"]),
    ("model.transformer.num_layer=3", ["model.transformer.num_layer: not a field of TransformerConfig"]),
    ("parallel.ddp.bucket=3", ["parallel.ddp.bucket: not a field of DistributedDataParallelConfig"]),
    ("optim.optimizer.learning_rate=3", ["optim.optimizer.learning_rate: not a field of OptimizerConfig"]),
])
def test_unknown_keys_at_every_level(key, needles):
    one(problems([key]), *needles)


def test_megatron_key_problems_listed_with_ours():
    errs = problems(["model.foo=1", "model.transformer.hidden_sizee=2", "parallel.ddp.bucket=1",
                     "optim.optimizer.lrr=1", "parallel.tp=3"])
    assert len(errs) == 6, errs  # tp=3 breaks heads and query groups


def test_megatron_rejection_is_a_config_error():
    # a problem only megatron-core's own __post_init__ knows about is still one ConfigError
    with pytest.raises(ConfigError, match="model.transformer: megatron-core rejected it"):
        load_config(TINY, ["model.transformer.num_moe_experts=0"])


def test_validate_world_derives_dp():
    cfg = load_config(TINY, ["train.global_batch_size=6", "train.micro_batch_size=2"])  # fine until DP is known
    validate_world(cfg, 1)
    validate_world(cfg, 3)
    with pytest.raises(ConfigError) as info:
        validate_world(cfg, 2)
    (p,) = info.value.problems
    assert "global_batch_size=6 is not divisible by micro_batch_size x dp = 2 x 2 = 4" in p and "use 4 or 8" in p
    with pytest.raises(ConfigError, match="2 x 4 = 8; use 8$"):
        validate_world(cfg, 4)


def test_validate_world_layout():
    cfg = load_config(TINY, ["parallel.tp=2"])
    validate_world(cfg, 2)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tp x pp = 2"):
        validate_world(cfg, 3)
    cfg = load_config(TINY, ["parallel.dp=2"])
    validate_world(cfg, 2)
    with pytest.raises(ConfigError, match="parallel.dp=2 but world size 4 / \\(tp x pp\\) = 4; omit parallel.dp"):
        validate_world(cfg, 4)


# --------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_resolved_dump_round_trips(path, tmp_path):
    overrides = ["model.transformer.hidden_size=256", "parallel.tp=2"] if path == TINY else []
    cfg = load_config(path, overrides)
    text = dump_yaml(cfg)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(text)
    again = load_config(str(dumped))
    assert dump_yaml(again) == text
    assert again.model.transformer.hidden_size == cfg.model.transformer.hidden_size
    assert again.parallel == cfg.parallel  # megatron configs compare by value
    assert padded_vocab_size(again) == padded_vocab_size(cfg)
    assert again.data == cfg.data and again.train == cfg.train and again.optim.schedule == cfg.optim.schedule
    # the megatron sections leave out what our tree owns, so the dump is a valid recipe
    raw = yaml.safe_load(text)
    assert "tensor_model_parallel_size" not in raw["model"]["transformer"]
    assert "use_distributed_optimizer" not in (raw["parallel"]["ddp"] or {})
    assert raw["model"]["transformer"]["activation_func"] == "silu"


# ------------------------------------------------------------------------------- side effects


def test_building_has_no_side_effects(tmp_path, monkeypatch):
    import torch.distributed as dist

    with open(TINY) as f:
        raw = yaml.safe_load(f)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, ["train.run_dir=runs/here", "checkpoint.dir=ckpt"])
    build_config(raw)
    with pytest.raises(ConfigError):
        load_config(TINY, ["parallel.tp=3"])
    dump_yaml(cfg)
    assert os.listdir(tmp_path) == []
    assert not dist.is_initialized()


def test_parameter_count_matches_a_built_model():
    """config.parameter_count (what preflight sizes checkpoints by) against megatron's own modules,
    built on the meta device in a fake world (launch.plan)."""
    from launch.plan import total_parameters
    from megatron_tts.config import parameter_count

    for overrides in ([], ["model.share_embeddings=false", "model.transformer.add_bias_linear=true"]):
        cfg = load_config(TINY, overrides + ["model.layer_spec=local", "model.init=megatron",
                                             "model.transformer.perform_initialization=false",
                                             "model.transformer.use_cpu_initialization=true"])
        assert parameter_count(cfg) == total_parameters(cfg), overrides
