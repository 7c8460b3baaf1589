"""The load side of the Checkpointer: find the newest checkpoint that verifies (each rank hashes a
share of its files), fall back past damaged ones, load model, optimizer, components and RNG
without running pickled code. Collective: every method runs on all ranks."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tts.checkpoint import format as fmt
from megatron_tts.checkpoint.errors import SAVE_ERRORS, CheckpointError, UnsafeCheckpointError, error_text
from megatron_tts.checkpoint.rng import reseed, set_rng_state
from megatron_tts.compat import dist_ckpt
from megatron_tts.compat.mcore import dist_checkpointing, unwrap
from megatron_tts.compat.optimizer import init_optimizer_states, unshare_adam_steps

log = logging.getLogger("megatron_tts.checkpoint.checkpointer")


@dataclass
class LoadedCheckpoint:
    step: int
    path: str
    trainer_state: dict


class Restoring:
    """Mixed into Checkpointer (which provides layout, model, optimizer, components, seed, root,
    the collectives _agree/_bcast, _sharded, _finalize and the set of verified paths)."""

    # ---- load ----
    def latest(self, root: Optional[str] = None, quarantine: bool = True,
               extra_ledger: Optional[str] = None) -> Optional[tuple[int, str]]:
        """(step, path) of the newest checkpoint that verifies, falling back to older ones with a
        warning (failed ones are renamed ``*.corrupt`` when ``quarantine``); None when nothing
        was ever committed under root. Raises CheckpointError when checkpoints were committed
        but none verifies. ``extra_ledger``: a commit record kept outside root (the run
        directory's), so that deleting root with its own ledger is not mistaken for a fresh start."""
        if self._pending is not None:
            self._finalize(block=True, retry_step=None)
        root = root or self.root
        listing = None
        if self._rank0:
            outside = fmt.ledger_steps(os.path.dirname(extra_ledger), os.path.basename(extra_ledger)) \
                if extra_ledger else []
            listing = (fmt.list_checkpoints(root), fmt.ever_committed(root), fmt.ledger_steps(root) or outside,
                       bool(outside) and not os.path.isdir(root))
        infos, ever, ledger, root_gone = self._bcast(listing)
        ever = ever or bool(ledger)
        if root_gone:
            raise CheckpointError(f"{extra_ledger} records checkpoints committed up to step {max(ledger)}, but the "
                                  f"checkpoint directory {root} is gone. Refusing to restart from step 1 into a run "
                                  "directory with history: restore it, or set train.resume=never to start over (the "
                                  "old metrics and records are archived, not overwritten)")
        failed: list[tuple[str, str]] = []
        for info in reversed(infos):
            if not info.committed:
                if self._rank0:
                    log.warning("skipping %s: no %s marker (the save never finished); it is never loaded",
                                info.path, fmt.COMMITTED)
                continue
            reason = self._verify_collective(info.path)
            if reason is None:
                if self._rank0 and ledger and max(ledger) > info.step and not failed and not any(
                        n.startswith(fmt.step_dir_name(max(ledger))) for n in os.listdir(root)):
                    log.warning("%s lists step %d as committed but its checkpoint is gone; using step %d",
                                fmt.LEDGER, max(ledger), info.step)
                self._verified.add(os.path.abspath(info.path))
                return info.step, info.path
            failed.append((info.path, reason))
            if self._rank0:
                log.warning("checkpoint %s failed verification: %s; falling back to an older one", info.path, reason)
                if quarantine:
                    self._quarantine(info.path)
        if failed or ever:
            what = "; ".join(f"{p}: {r}" for p, r in failed) or (
                f"{fmt.LEDGER} records committed steps up to {max(ledger)} but no checkpoint is left"
                if ledger else "committed markers exist but no step directory")
            raise CheckpointError(f"no checkpoint under {root} verifies ({what}). Refusing to start from scratch "
                                  "silently: restore a checkpoint, or set train.resume=never to start over")
        return None

    def _quarantine(self, path: str) -> None:
        target = path + fmt.QUARANTINE
        n = 1
        while os.path.exists(target):
            target = f"{path}{fmt.QUARANTINE}.{n}"
            n += 1
        try:
            os.rename(path, target)
            log.warning("moved %s to %s (kept for inspection; never loaded)", path, target)
        except OSError as e:
            log.warning("could not move %s aside: %s", path, e)

    def _verify_collective(self, path: str) -> Optional[str]:
        """Verify one checkpoint on all ranks: rank 0 checks the marker and file list, each rank
        hashes its share of the files; every rank gets the same answer. A checkpoint this process
        committed or verified already gets the marker, file list and sizes checked, not hashed
        again (a rollback or a stop signal must not re-read the whole checkpoint)."""
        entries, reason = None, None
        known = os.path.abspath(path) in self._verified
        if self._rank0:
            manifest, reason = fmt.read_commit(path)
            entries = manifest["files"] if manifest else None
            if known and reason is None:
                for e in entries:
                    p = os.path.join(path, e["path"])
                    if not os.path.isfile(p) or os.path.getsize(p) != e["size"]:
                        reason = f"{e['path']}: size changed since it was committed"
                        break
        entries, reason = self._bcast((entries, reason))
        if reason or known:
            if reason:
                self._verified.discard(os.path.abspath(path))
            return reason
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        by_size = sorted(entries, key=lambda e: -e["size"])
        return self._agree(fmt.verify_files(path, by_size[rank::world]))

    def is_committed(self, step: int) -> bool:
        return os.path.isfile(os.path.join(self.root, fmt.step_dir_name(step), fmt.COMMITTED))

    def resolve(self, path: str) -> str:
        """A checkpoint root given as train.resume: its newest verified checkpoint."""
        looks_like_root = (not os.path.exists(os.path.join(path, fmt.COMMITTED)) and
                           not os.path.exists(os.path.join(path, fmt.MANIFEST)) and
                           (bool(fmt.list_checkpoints(path)) or os.path.exists(os.path.join(path, fmt.LEDGER))))
        if not self._bcast(looks_like_root if self._rank0 else None):
            return path
        latest = self.latest(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint under {path}")
        return latest[1]

    def load(self, path: str, skip: tuple[str, ...] = ()) -> LoadedCheckpoint:
        """Load a checkpoint (or a checkpoint root's newest); the components named in ``skip`` keep
        their current state (train.reset_data: the loader)."""
        if self._pending is not None:
            self._finalize(block=True, retry_step=None)
        path = self.resolve(path)
        if os.path.abspath(path) not in self._verified:
            reason = self._verify_collective(path)
            if reason:
                raise CheckpointError(f"checkpoint {path} does not verify: {reason}; it is not loaded. Use "
                                      "train.resume=auto to take the newest one that verifies")
            self._verified.add(os.path.abspath(path))
        trainer_state, loaded = self._read(path)
        for i, m in enumerate(self.model):
            unwrap(m).load_state_dict(loaded["model"] if len(self.model) == 1 else loaded[f"model{i}"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        if self.distributed_optimizer:
            unshare_adam_steps(self.optimizer)
        for name, comp in self.components.items():
            if name in trainer_state["components"] and name not in skip:
                comp.load_state_dict(trainer_state["components"][name])
        if self.extension is not None:
            self.extension.after_load(loaded.get(self.extension.name), trainer_state)
        self._load_rng(path, trainer_state)
        return LoadedCheckpoint(step=trainer_state["step"], path=path, trainer_state=trainer_state)

    def _read(self, path: str) -> tuple[dict, dict]:
        """trainer_state.json and the sharded model + optimizer state, never running pickled code.
        Every rank learns whether any failed."""
        error, unsafe = None, False
        trainer_state: dict = {}
        loaded: dict = {}
        try:
            with open(os.path.join(path, fmt.STATE_FILE)) as f:
                trainer_state = json.load(f)
            if self.distributed_optimizer:
                init_optimizer_states(self.optimizer)
            sharded = self._sharded(is_loading=True, trainer_state=trainer_state)
            with dist_ckpt.safe_unpickling() as refusals:
                try:
                    loaded = dist_checkpointing.load(sharded, path)
                except SAVE_ERRORS as e:  # noqa: BLE001 - DCP wraps our refusal; report it plainly
                    if refusals:
                        unsafe = True
                        raise UnsafeCheckpointError(refusals[0]) from e
                    raise
        except SAVE_ERRORS as e:  # noqa: BLE001
            error = error_text(e)
        unsafe_any = self._agree("unsafe" if unsafe else None)
        error = self._agree(error)
        if error:
            if unsafe_any:
                raise UnsafeCheckpointError(f"refusing to load {path}: {error}")
            raise CheckpointError(f"loading {path} failed: {error}")
        return trainer_state, loaded

    def _load_rng(self, path: str, trainer_state: dict) -> None:
        """The saved per-rank RNG streams under the layout that wrote them; otherwise they do not
        map onto the new ranks, and every rank reseeds from (seed, step, rank)."""
        lay = self.layout
        saved = trainer_state.get("layout") or {}
        same = (trainer_state.get("world_size") == lay.world_size and
                (saved.get("tp"), saved.get("pp"), saved.get("dp")) == (lay.tp, lay.pp, lay.dp))
        rng_path = os.path.join(path, "rng", f"rank_{lay.rank:05d}.pt")
        if same and os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
            return
        step = trainer_state["step"]
        reseed(self.seed, step, lay.rank)
        if self._rank0:
            was = f"tp={saved.get('tp')} pp={saved.get('pp')} dp={saved.get('dp')}" if saved else \
                f"{trainer_state.get('world_size')} ranks"
            log.warning("checkpoint %s was written under %s; now tp=%d pp=%d dp=%d: the per-rank RNG streams do "
                        "not map onto the new ranks, so every rank reseeded from (train.seed=%d, step=%d, rank)",
                        path, was, lay.tp, lay.pp, lay.dp, self.seed, step)
