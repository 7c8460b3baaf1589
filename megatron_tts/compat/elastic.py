"""A process-group store that survives torchrun restarts.

torchrun (c10d rendezvous, torch >= 2.4) hands its workers the agents' own rendezvous TCPStore
(``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps it across restarts. torch assumes a new store
per retry (torch/distributed/rendezvous.py:189), so a restarted worker's process group reads the
previous round's keys: gloo connects to the dead workers' addresses ("connectFullMesh failed ...
Connection refused") and every later round times out (pytorch#135712, #167288). Keying the
process group by the rendezvous round, which every agent agrees on, gives each round a clean
namespace in the same store. ``TORCHELASTIC_RESTART_COUNT`` is no such key: each agent counts its
own restarts, and an agent restarted by a peer's failure does not count one.
"""

from __future__ import annotations

import base64
import datetime
import io
import logging
import os
import pickle
from typing import Any, Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

_STATE_KEY = "torch.rendezvous."  # + run id: c10d_rendezvous_backend.py's key for the pickled state


def _allowed() -> dict[tuple[str, str], Any]:
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    allowed: dict[tuple[str, str], Any] = {(dr.__name__, n): getattr(dr, n) for n in ("_RendezvousState", "_NodeDesc")}
    for n in ("datetime", "timedelta", "timezone"):
        allowed[("datetime", n)] = getattr(datetime, n)
    allowed[("builtins", "set")] = set
    return allowed


class _StateUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BytesIO) -> None:
        super().__init__(f)
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"rendezvous state names {module}.{name}: not plain rendezvous data")
        return obj


def rendezvous_round(store: dist.Store, run_id: str) -> Optional[int]:
    """The round of torchrun's c10d rendezvous recorded in its store, or None when there is none
    (static or etcd rendezvous, a plain launcher)."""
    key = _STATE_KEY + run_id
    try:
        if not store.check([key]):
            return None
        raw = store.get(key)
        state = _StateUnpickler(io.BytesIO(base64.b64decode(raw))).load()
        return int(state.round)
    except Exception as e:  # noqa: BLE001 - any surprise falls back to the restart count
        log.warning("could not read the rendezvous round from torchrun's store (%s: %s); keying the process "
                    "group by TORCHELASTIC_RESTART_COUNT", type(e).__name__, e)
        return None


def worker_store(world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """Under torchrun with the agents' shared store: a PrefixStore of that store unique to this
    rendezvous round, for ``init_process_group(store=...)``. None otherwise (use env://)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    rnd = rendezvous_round(store, run_id)
    generation = f"round{rnd}" if rnd is not None else f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"megatron_tts/{run_id}/{generation}/", store)
