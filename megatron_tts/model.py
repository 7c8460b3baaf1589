"""The speech LM: megatron-core's GPTModel with the Llama architecture, per pipeline stage."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Optional

import torch

from megatron_tts.compat.mcore import (
    GPTModel,
    ShardedTensor,
    ShardedTensorFactory,
    TransformerBlockSubmodules,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_num_layers_to_build,
    parallel_state as ps,
)
from megatron_tts.config import Config, ConfigError, padded_vocab_size, real_vocab_size
from megatron_tts.norm import LocalRMSNorm

log = logging.getLogger(__name__)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE install raises more than ImportError
        return False
    return torch.cuda.is_available()


def uses_transformer_engine(cfg: Config) -> bool:
    """Transformer-engine layers when TE imports (and CUDA is there), megatron's local ones otherwise."""
    choice = cfg.model.layer_spec
    if choice == "te" and not have_transformer_engine():
        raise ConfigError(["model.layer_spec=te but transformer_engine does not import (or there is no "
                           "CUDA); install the [gpu] extra on a CUDA machine or set model.layer_spec=local"],
                          "layer spec")
    return choice == "te" or (choice == "auto" and have_transformer_engine())


def layer_spec(cfg: Config):
    if uses_transformer_engine(cfg):
        return get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if cfg.model.core_attention == "sdpa":
        from megatron_tts.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _local_block_spec(cfg: Config, layer, vp_stage):
    """The local layer spec as a whole block, with our SP-capable RMSNorm everywhere."""
    layer.submodules.input_layernorm = LocalRMSNorm
    layer.submodules.pre_mlp_layernorm = LocalRMSNorm
    n = get_num_layers_to_build(cfg.model.transformer, vp_stage=vp_stage,
                                pp_rank=ps.get_pipeline_model_parallel_rank())
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=LocalRMSNorm)


def build_model_chunks(cfg: Config, device: Optional[torch.device] = None) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (one without interleaving)."""
    spec = layer_spec(cfg)
    local = not uses_transformer_engine(cfg)
    vpp = cfg.parallel.vpp
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=cfg.model.transformer,
            transformer_layer_spec=_local_block_spec(cfg, spec, stage) if local else spec,
            vocab_size=padded_vocab_size(cfg),
            max_sequence_length=cfg.data.seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.model.share_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            rope_scaling=cfg.model.rope_scaling,
            rope_scaling_factor=cfg.model.rope_scaling_factor,
            vp_stage=stage,
        )
        model = model.to(device or _device())
        if model.post_process and cfg.model.mask_padded_vocab:
            mask_padded_vocab(model, real_vocab_size(cfg), padded_vocab_size(cfg))
        chunks.append(model)
    if cfg.model.init == "layout_invariant":
        for chunk in chunks:
            init_layout_invariant(chunk, cfg)
    return chunks


def mask_padded_vocab(model: torch.nn.Module, real: int, padded: int) -> None:
    """Logits of the embedding's padding rows (real vocab .. padded vocab, there so that the rows
    split evenly over TP) never take probability mass: the softmax, loss and sampling are over the
    real vocabulary only, exactly as in the exported model without those rows."""
    if real >= padded:
        return
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    per_rank = padded // tp
    lo = max(real - rank * per_rank, 0)
    if lo >= per_rank:
        return  # this TP rank holds real rows only

    def hook(_module, _inputs, output):
        logits, bias = output
        # in place (no copy of the largest activation); the linear saved its input, not this output
        logits[..., lo:] = -1e9  # finite: the vocab-parallel softmax subtracts the max
        return logits, bias

    model.output_layer.register_forward_hook(hook)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _seed_for(seed: int, key: str, prefix: tuple[int, ...]) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{prefix}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_value(key: str, shape: tuple[int, ...], seed: int, cfg: Config) -> torch.Tensor:
    t = cfg.model.transformer
    if key.endswith("layer_norm_weight") or "layernorm" in key.rsplit(".", 1)[0] or key.endswith("norm.weight"):
        return torch.ones(shape)
    if key.endswith("bias"):
        return torch.zeros(shape)
    std = t.init_method_std
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        std = std / math.sqrt(2.0 * t.num_layers)  # megatron's scaled init for residual outputs
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


@torch.no_grad()
def init_layout_invariant(model: torch.nn.Module, cfg: Config) -> None:
    """Set every weight to a function of (seed, checkpoint key, layer), whatever the TP/PP layout.

    Uses the same sharded view as dist_checkpointing: for each local shard we draw the full
    (per-layer) tensor from a generator seeded by its key, then copy the slice this rank
    holds. So a TP=2 x PP=2 model starts from exactly the weights of the single-process one.
    """
    seed = cfg.train.seed
    sharded = model.sharded_state_dict()
    items = []
    for value in sharded.values():
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            items.extend(built if isinstance(built, list) else list(built.values()) if isinstance(built, dict) else [built])
        elif isinstance(value, ShardedTensor):
            items.append(value)
    for st in items:
        if st.data is None or st.flattened_range is not None or not st.data.is_floating_point():
            continue
        n = st.prepend_axis_num
        full_shape = tuple(st.global_shape[n:])
        full = _init_value(st.key, full_shape, _seed_for(seed, st.key, tuple(st.global_offset[:n])), cfg)
        # local_shape omits the prepended (layer) axes that global_offset carries
        index = tuple(slice(o, o + s) for o, s in zip(st.global_offset[n:], st.local_shape[-len(full_shape):]))
        local = full[index].reshape(st.data.shape)
        st.data.copy_(local.to(dtype=st.data.dtype, device=st.data.device))


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """This rank's share of the model's parameters, such that the sum over the model-parallel
    group is the model's size: TP-replicated ones (norms) count on TP rank 0 only, and the last
    stage's copy of tied embeddings not at all."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    n = 0
    for c in chunks:
        for p in c.parameters():
            if getattr(p, "shared_embedding", False) and not ps.is_pipeline_first_stage(ignore_virtual=True):
                continue
            if tp_rank == 0 or getattr(p, "tensor_model_parallel", False):
                n += p.numel()
    return n
