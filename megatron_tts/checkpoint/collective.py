"""The two collectives checkpoints agree through (no-ops in a world of one)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def agree(error: Optional[str], device: torch.device) -> Optional[str]:
    """All ranks learn whether any failed: None everywhere, or the same text naming the failed
    ranks everywhere."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    by_text: dict[str, list[int]] = {}
    for r, e in enumerate(errors):
        if e is not None:
            by_text.setdefault(e, []).append(r)
    if len(by_text) == 1 and len(next(iter(by_text.values()))) == dist.get_world_size():
        return next(iter(by_text))  # the same (already agreed) failure everywhere
    parts = [f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs[:8]))}: {e}"
             for e, rs in list(by_text.items())[:3]]
    return "; ".join(parts) + (f"; and {len(by_text) - 3} more" if len(by_text) > 3 else "")


def bcast(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
