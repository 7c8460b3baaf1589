"""Loading: a YAML recipe plus ``dotted.key=value`` overrides, coerced into the typed tree, the
megatron-core sections built from their own classes, every problem reported at once; and the
dump of the resolved config (it loads back as a recipe). No side effects: nothing is created on
disk, no process group touched, nothing in torch patched.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import torch
import torch.nn.functional as F
import yaml

from megatron_tts.compat import batch_p2p_supported
from megatron_tts.compat.mcore import DistributedDataParallelConfig, OptimizerConfig, TransformerConfig
from megatron_tts.config.derived import resolve_backend, resolve_dtype
from megatron_tts.config.schema import AUTO_FIELDS, Config, ConfigError, auto_fields, mark_auto
from megatron_tts.config.validate import validate

_MEGATRON_SECTIONS: dict[tuple[str, str], type] = {
    ("model", "transformer"): TransformerConfig,
    ("parallel", "ddp"): DistributedDataParallelConfig,
    ("optim", "optimizer"): OptimizerConfig,
}
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


# Fields of the megatron configs that this tree owns; a recipe must not set them there.
_OWNED = {
    ("model", "transformer"): {
        "tensor_model_parallel_size": "parallel.tp",
        "pipeline_model_parallel_size": "parallel.pp",
        "virtual_pipeline_model_parallel_size": "parallel.vpp",
        "sequence_parallel": "parallel.sequence_parallel",
        "params_dtype": "train.dtype",
        "bf16": "train.dtype",
        "fp16": "train.dtype",
        "pipeline_dtype": "train.dtype",
        "calculate_per_token_loss": "(fixed: every target token weighs the same)",
        "batch_p2p_comm": "parallel.backend (derived)",
    },
    ("parallel", "ddp"): {"use_distributed_optimizer": "optim.distributed"},
    ("optim", "optimizer"): {
        "use_distributed_optimizer": "optim.distributed",
        "bf16": "train.dtype",
        "fp16": "train.dtype",
        "params_dtype": "train.dtype",
    },
}


def _plain_type(typ: Any) -> Any:
    """int, float, bool or str when a megatron field's type is one of them (or Optional of one)."""
    if get_origin(typ) is Union:
        args = [a for a in get_args(typ) if a is not type(None)]
        typ = args[0] if len(args) == 1 else None
    return typ if typ in (int, float, bool, str) else None


def _build_megatron(path: tuple[str, str], raw: dict, cfg: Config, problems: list[str]) -> Any:
    cls = _MEGATRON_SECTIONS[path]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    names = set(types)
    where = ".".join(path)
    kwargs: dict[str, Any] = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of {cls.__name__} fields, got {raw!r}")
        raw = {}
    for k, v in raw.items():
        if k not in names:
            problems.append(f"{where}.{k}: not a field of {cls.__name__}; check the spelling")
        elif k in _OWNED[path]:
            problems.append(f"{where}.{k}: set it through {_OWNED[path][k]} instead")
        elif k == "activation_func":
            if v not in _ACTIVATIONS:
                problems.append(f"{where}.activation_func: '{v}' unknown; use one of {sorted(_ACTIVATIONS)}")
            else:
                kwargs[k] = _ACTIVATIONS[v]
        elif _plain_type(types[k]) is not None:
            n = len(problems)  # a mistyped value is reported here, not deep inside megatron later
            value = _coerce(v, types[k], f"{where}.{k}", problems)
            if len(problems) == n:
                kwargs[k] = value
        else:
            kwargs[k] = v
    bf16 = resolve_dtype(cfg) == "bf16"
    if path == ("model", "transformer"):
        kwargs.update(
            tensor_model_parallel_size=cfg.parallel.tp,
            pipeline_model_parallel_size=cfg.parallel.pp,
            virtual_pipeline_model_parallel_size=cfg.parallel.vpp,
            sequence_parallel=cfg.parallel.sequence_parallel,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
            # Loss = sum over target tokens / their global count, identical under any layout.
            calculate_per_token_loss=True,
            batch_p2p_comm=batch_p2p_supported(resolve_backend(cfg)),
        )
    elif path == ("parallel", "ddp"):
        kwargs["use_distributed_optimizer"] = cfg.optim.distributed
    else:
        kwargs.update(use_distributed_optimizer=cfg.optim.distributed, bf16=bf16,
                      params_dtype=torch.bfloat16 if bf16 else torch.float32)
    return cls, kwargs



# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError([f"override '{item}': write it as dotted.key=value"], "command line")
        key, _, value = item.partition("=")
        out.append((key.strip(), yaml.safe_load(value) if value != "" else None))
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([f"override '{key}': '{p}' is a value, not a section"], "command line")
        node = nxt
    node[parts[-1]] = value


def _coerce(value: Any, typ: Any, where: str, problems: list[str]) -> Any:
    origin = get_origin(typ)
    if origin is Union:
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, problems)
    if typ is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, get_args(typ)[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):
        return _build_section(typ, value, where, problems)
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        problems.append(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _build_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {raw!r}")
        raw = {}
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            problems.append(f"{where}.{k}: unknown key; valid keys are {', '.join(names)}" if where else
                            f"{k}: unknown section; valid sections are {', '.join(names)}")
    kwargs = {}
    for k, v in raw.items():
        if k in names:
            n = len(problems)
            value = _coerce(v, hints[k], f"{where}.{k}" if where else k, problems)
            # A wrongly typed value is reported and replaced by its default, so that the checks
            # after it still run (and list their own problems) instead of crashing on it.
            if len(problems) == n or dataclasses.is_dataclass(hints[k]):
                kwargs[k] = value
    return cls(**kwargs)


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a recipe, apply overrides, validate, and build the typed tree (raises ConfigError)."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError([f"recipe {path} does not exist; see configs/ for the recipes"], path)
        except IsADirectoryError:
            raise ConfigError([f"--config {path} is a directory; give a recipe file, e.g. configs/tiny.yaml"], path)
        except (PermissionError, UnicodeDecodeError) as e:
            raise ConfigError([f"recipe {path} cannot be read ({e})"], path)
        except yaml.YAMLError as e:
            raise ConfigError([f"recipe {path} is not valid YAML: {e}"], path)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    return build_config(raw, source=path or "config")


def _take_auto(raw: dict) -> tuple[dict, tuple[str, ...]]:
    """The AUTO_FIELDS set to 'auto', and a copy of ``raw`` without them: the typed tree holds the
    field's default as a placeholder (valid for every check) until the start-up sweep resolves it."""
    found = []
    for dotted in AUTO_FIELDS:
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf].strip().lower() == "auto":
            found.append(dotted)
    if not found:
        return raw, ()
    import copy

    raw = copy.deepcopy(raw)  # the caller's mapping is left as it was
    for dotted in found:
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        del node[leaf]
    return raw, tuple(found)


def build_config(raw: dict, source: str = "config") -> Config:
    problems: list[str] = []
    raw, auto = _take_auto(raw)
    cfg = _build_section(Config, raw, "", problems)
    mark_auto(cfg, auto)
    if cfg.model.transformer is None:
        problems.append("model.transformer: missing; give at least num_layers, hidden_size, num_attention_heads")
    validate(cfg, problems)
    # The megatron sections' keys are checked with ours, so that one error lists both.
    built = {}
    for path in _MEGATRON_SECTIONS:
        section = getattr(cfg, path[0])
        raw_section = getattr(section, path[1])
        built[path] = _build_megatron(path, {} if raw_section is None else raw_section, cfg, problems)
    # Only a tree free of problems is handed to megatron's constructors, whose
    # __post_init__ asserts would otherwise report one problem at a time.
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), source)  # (a few are found by two checks)
    for path, (cls, kwargs) in built.items():
        try:
            obj = cls(**kwargs)
        except (AssertionError, ValueError, TypeError) as e:
            raise ConfigError([f"{'.'.join(path)}: megatron-core rejected it: {e}"], source) from e
        # Remember what the recipe set: the dump writes those back, not the values megatron
        # derived from them (kv_channels, ...), which would go stale under a later override.
        object.__setattr__(obj, _USER_FIELDS, tuple(k for k in kwargs if k not in _OWNED[path]))
        setattr(getattr(cfg, path[0]), path[1], obj)
    return cfg




# --------------------------------------------------------------------------------------------
# Saving the resolved config.
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if callable(value):
        return getattr(value, "__name__", repr(value))
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


_USER_FIELDS = "_megatron_tts_user_fields"


def to_dict(obj: Any, owned: dict = None) -> dict:
    """Our sections in full; nested megatron configs as the fields the recipe set (else their
    non-default fields), without the fields our tree owns, so the dump loads back as a recipe."""
    out = {}
    is_megatron = type(obj).__module__.startswith("megatron.")
    user = getattr(obj, _USER_FIELDS, None) if is_megatron else None
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if user is not None:
            if f.name in user:
                out[f.name] = _plain(value)
            continue
        if dataclasses.is_dataclass(value) and type(value).__module__.startswith("megatron."):
            path = next(p for p in _MEGATRON_SECTIONS if p[1] == f.name)
            out[f.name] = to_dict(value, _OWNED[path])
            continue
        if is_megatron:
            if f.name in (owned or {}) or (callable(value) and f.name != "activation_func"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            try:
                if value is default or value == default:
                    continue
            except Exception:  # tensors and other types without a plain ==
                pass
            if not f.init:
                continue
        out[f.name] = _plain(value)
    return out


def dump_yaml(cfg: Config) -> str:
    """The resolved config as a recipe; fields set to 'auto' are written as 'auto' (what the sweep
    chose is in RUN_DIR/autotune.json), so that a resume reads the same recipe and reuses it."""
    d = to_dict(cfg)
    for dotted in auto_fields(cfg):
        *parents, leaf = dotted.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = "auto"
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)