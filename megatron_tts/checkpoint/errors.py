"""Checkpoint errors and the one-line text of a failure (shared by every checkpoint module)."""

from __future__ import annotations

from typing import Protocol

from torch.distributed.checkpoint.api import CheckpointException

# What a failed save may raise: torch DCP's CheckpointException derives from BaseException.
SAVE_ERRORS = (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """Checkpoints were committed but none can be used, or one must not be loaded: fatal (exit 3)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asked the unpickler for something other than plain data."""


class WriteFailed(RuntimeError):
    """A dist_checkpointing write failure, with the same text on every rank."""


class Stateful(Protocol):
    """The one convention of every checkpointed component."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def error_text(e: BaseException) -> str:
    """One line naming the root cause; torch DCP's CheckpointException carries per-rank failures."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in list(failures.items())[:3]:
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            while isinstance(inner, BaseException) and inner.__cause__ is not None:
                inner = inner.__cause__
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        op = e.args[0] if e.args and isinstance(e.args[0], str) and len(e.args[0]) < 40 else "operation"
        text = f"dist_checkpointing {op} failed: " + "; ".join(parts)
    elif isinstance(e, WriteFailed):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:600] + "..."
