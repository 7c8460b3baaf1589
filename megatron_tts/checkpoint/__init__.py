"""Checkpoints: model and optimizer through megatron-core dist_checkpointing (torch_dist),
everything else (scheduler, loader, train state, RNG) beside them, committed in two phases.

- ``format``: the checkpoint on disk (names, manifest, COMMITTED, listing, verify, retention);
- ``errors``: CheckpointError and the one-line text of a failure;
- ``rng``: per-rank RNG state as tensors;
- ``mirror``: the background copy to an object store;
- ``checkpointer``: the Checkpointer (save / poll / wait / load over every rank);
- ``python -m megatron_tts.checkpoint verify PATH``: offline verification.

Every stateful component follows one convention: ``state_dict() -> dict`` and
``load_state_dict(dict)``. The megatron / torch DCP internals these use live in
megatron_tts.compat.dist_ckpt. (The Checkpointer is imported from ``.checkpointer``: this
package's top stays free of megatron so that compat can import the errors.)
"""

from megatron_tts.checkpoint.errors import CheckpointError, Stateful, UnsafeCheckpointError  # noqa: F401
from megatron_tts.checkpoint.format import (  # noqa: F401
    COMMITTED,
    LEDGER,
    MANIFEST,
    STATE_FILE,
    committed_checkpoints,
    list_checkpoints,
    read_commit,
    seal,
    step_dir_name,
    verify,
)
