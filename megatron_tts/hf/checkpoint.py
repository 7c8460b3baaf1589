"""A local Hugging Face Llama checkpoint: config.json, safetensors (one file, or shards with
their index) and the tokenizer files, read lazily one tensor at a time, with every problem a user
can hit named (a missing shard, another architecture, an unreadable file)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_tts.config import ConfigError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class HFCheckpointError(ConfigError):
    """An HF checkpoint that cannot be used as given (a user error: exit 3)."""

    def __init__(self, problems: list[str] | str, where: str) -> None:
        super().__init__([problems] if isinstance(problems, str) else problems, where)


@dataclass
class LlamaShape:
    """What config.json says about the model, normalised across transformers' config formats."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    tie_embeddings: bool
    rope_theta: float
    rope_scaling: Optional[dict]  # llama3 scaling parameters, None without scaling
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str


def read_shape(config: dict, where: str) -> LlamaShape:
    archs = config.get("architectures") or []
    if config.get("model_type") not in (None, "llama") or (archs and "LlamaForCausalLM" not in archs):
        raise HFCheckpointError(f"{where}/config.json describes {archs or config.get('model_type')}, not a "
                                "LlamaForCausalLM; only Llama-architecture checkpoints load into this model", where)
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return LlamaShape(
            vocab_size=int(config["vocab_size"]), hidden_size=hidden, num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), ffn_hidden_size=int(config["intermediate_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)), rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None, attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)), hidden_act=str(config.get("hidden_act", "silu")))
    except (KeyError, TypeError, ValueError) as e:
        raise HFCheckpointError(f"{where}/config.json lacks or mistypes a Llama field ({type(e).__name__}: {e})",
                                where) from None


class HFCheckpoint:
    """Tensors by name from a local HF directory; only the tensors asked for are read."""

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        if not os.path.isdir(self.path):
            raise HFCheckpointError(f"{self.path} is not a directory (train.init_from=hf:DIR takes a local Hugging "
                                    "Face model directory; nothing is downloaded)", self.path)
        try:
            with open(os.path.join(self.path, "config.json")) as f:
                self.config = json.load(f)
        except FileNotFoundError:
            raise HFCheckpointError(f"{self.path}/config.json is missing", self.path) from None
        except ValueError as e:
            raise HFCheckpointError(f"{self.path}/config.json is not valid JSON ({e})", self.path) from None
        self.shape = read_shape(self.config, self.path)
        self._files = self._weight_map()
        self._open: dict[str, Any] = {}

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, WEIGHTS_INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise HFCheckpointError(f"{index} is unreadable ({e})", self.path) from None
            missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(self.path, f))})
            if missing:
                raise HFCheckpointError(f"{self.path}: safetensors shard(s) {', '.join(missing)} listed in "
                                        f"{WEIGHTS_INDEX} are missing (an incomplete copy?)", self.path)
            return dict(weight_map)
        single = os.path.join(self.path, WEIGHTS)
        if not os.path.exists(single):
            raise HFCheckpointError(f"{self.path} holds neither {WEIGHTS} nor {WEIGHTS_INDEX} (pytorch_model.bin "
                                    "is not read: it is a pickle; convert it to safetensors)", self.path)
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: WEIGHTS for k in f.keys()}

    def names(self) -> list[str]:
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files.get(name)
        if file is None:
            raise HFCheckpointError(f"{self.path}: tensor {name} is not in the checkpoint", self.path)
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._open[file].get_tensor(name)

    def close(self) -> None:
        self._open.clear()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)
