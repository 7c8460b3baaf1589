"""One typed config tree, loaded from a YAML recipe plus ``dotted.key=value`` overrides.

- ``schema``: our sections (dataclasses, a docstring per field) and ConfigError;
- ``load``: reading, coercing, building the nested megatron-core configs, dumping;
- ``validate``: every problem at once with its fix, and ``layout_problems`` for a launch layout;
- ``derived``: backend, dtype, vocabulary layout and padding.

megatron-core's own TransformerConfig, DistributedDataParallelConfig and OptimizerConfig are
nested as they are (``model.transformer``, ``parallel.ddp``, ``optim.optimizer``); fields they
share with our tree (parallel sizes, dtypes, the distributed-optimizer switch) are filled in from
ours, so a recipe states each fact once. Building the config has no side effects.
"""

from megatron_tts.config.derived import (  # noqa: F401
    checkpoint_bytes,
    checkpoint_space_bytes,
    padded_vocab_size,
    parameter_count,
    real_vocab_size,
    resolve_backend,
    resolve_dtype,
    vocab_layout,
    vocab_padding_multiple,
)
from megatron_tts.config.load import build_config, dump_yaml, load_config, parse_overrides, to_dict  # noqa: F401
from megatron_tts.config.schema import *  # noqa: F401,F403 - the sections
from megatron_tts.config.schema import Config, ConfigError, watchdog_longest  # noqa: F401
from megatron_tts.config.validate import layout_problems, validate_world  # noqa: F401
