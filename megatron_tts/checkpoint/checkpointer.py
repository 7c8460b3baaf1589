"""The Checkpointer: save / poll / wait / load orchestration over every rank.

**Save** (all ranks, collectively) runs named phases, each ending in one agreement (an
all-reduce of a failure flag) so that no rank commits a partial checkpoint: ``_prepare`` (rank 0:
a fresh ``.tmp.step_X`` after a space check), ``_write_small_files`` (per-rank RNG, rank 0's
trainer_state.json), ``_write_shards`` (model + optimizer through dist_checkpointing, by a forked
writer when async), ``_commit`` (rank 0: manifest, fsync, rename, COMMITTED, ledger). Any failure
(ENOSPC, EIO, EACCES, an exception inside dist_checkpointing) deletes the partial directory,
prunes per the retention policy and retries once; then an ALERT is logged, a
``checkpoint_failed`` event is written and training continues. A failed save never touches
committed checkpoints.

With ``checkpoint.async_save`` the shards are written by a forked process; ``poll()`` (every
step) finalizes and commits once every rank's writer is done, ``wait()`` blocks for it.

**Load** takes the newest checkpoint that verifies (marker, sizes, hashes: each rank hashes a
share), falling back to older ones with a warning (failed ones are renamed ``*.corrupt``). If
checkpoints were committed but none verifies it is fatal (CheckpointError, exit 3): never a
silent restart from scratch. Loading never runs pickled code (compat.dist_ckpt.safe_unpickling).
Per-rank RNG states are restored when the layout (TP, PP, DP) is the one that saved them, and
reseeded as a function of (seed, step, rank) otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_tts.checkpoint import format as fmt
from megatron_tts.checkpoint.collective import agree, bcast
from megatron_tts.checkpoint.errors import SAVE_ERRORS, Stateful, error_text
from megatron_tts.checkpoint.mirror import Mirror
from megatron_tts.checkpoint.restore import Restoring
from megatron_tts.checkpoint.rng import rng_state
from megatron_tts.compat import dist_ckpt
from megatron_tts.compat.mcore import unwrap
from storage.durable import fsync_dir, fsync_tree, write_durable

log = logging.getLogger(__name__)


@dataclass
class _Save:
    """One save request, from save() to its commit (or failure)."""

    step: int
    attempt: int
    extra: Optional[dict]
    t_start: float  # perf_counter at save()
    blocking_s: float = 0.0  # time the training loop spent inside save/poll/wait for it


class Checkpointer(Restoring):
    """Saves and restores the model chunks, the optimizer and the named JSON-able components.

    Every public method is collective (call it on all ranks) except ``close``."""

    def __init__(self, root: str, layout, model: list, optimizer, components: dict[str, Stateful], config,
                 distributed_optimizer: bool, seed: int, on_event: Optional[Callable[[dict], None]] = None,
                 fail: Optional[Callable[[int, int, int], bool]] = None, fingerprint: Optional[dict] = None,
                 on_commit: Optional[Callable[[int, str], None]] = None, config_text: Optional[str] = None,
                 extension: Optional[Any] = None) -> None:
        """``config``: the CheckpointConfig section. ``fail(rank, step, attempt)``: fault injection
        of a write error (megatron_tts.faults; None when off). ``fingerprint``: what the weights
        mean, saved with every checkpoint (megatron_tts.resume). ``on_commit(step, path)``: rank 0,
        after each commit (the run directory's own record of commits). ``config_text``: the resolved
        recipe, saved as config.yaml in every checkpoint (a checkpoint describes itself: export,
        generation). ``extension``: more sharded state beside the model and optimizer (e.g.
        megatron_tts.hierarchical.OuterSync): ``name``, ``sharded_state_dict(sd, is_loading,
        trainer_state) -> sd`` (it may add entries under its name and change the storage keys or
        replicas of sd's), ``after_load(loaded[name], trainer_state)``; its JSON state is a
        component of the same name."""
        self.root = root
        self.extension = extension
        self.layout = layout
        self.model = model
        self.optimizer = optimizer
        self.components = components
        self.distributed_optimizer = distributed_optimizer
        self.seed = seed
        self.keep_last = config.keep_last
        self.keep_every = config.keep_every
        self.async_save = bool(config.async_save)
        self.mirror_url = config.mirror
        self.mirror_retries = config.mirror_retries
        self.on_event = on_event  # metrics sink (set on the logging rank)
        self.fail = fail
        self.fingerprint = fingerprint
        self.on_commit = on_commit
        self.config_text = config_text
        self.last_save_blocking_s = 0.0
        self.failures = 0  # saves that failed after their retry (checkpoint_failures)
        self.mirror_failures = 0
        self._pending: Optional[_Save] = None  # an async save written but not yet committed
        self._calls = None  # megatron AsyncCallsQueue, created on the first async save
        self._strategy = None  # one save strategy for the run (its save plans are cached)
        self._deleting: list[threading.Thread] = []  # background deletions of pruned checkpoints
        self._verified: set[str] = set()
        self.pinned: set[str] = set()  # checkpoints being read by a side process: never pruned
        self._mirror: Optional[Mirror] = None
        self._last_size: Optional[int] = None
        # megatron's writers report through a spawn-context Manager queue whose start takes ~2 s;
        # start it now, in the background, instead of in the first save. Not a daemon: an exit
        # while the Manager is half started would otherwise hang in multiprocessing's atexit join.
        self._warmup = threading.Thread(target=dist_ckpt.results_queue_warmup, name="ckpt-warmup", daemon=False)
        self._warmup.start()

    @property
    def _rank0(self) -> bool:
        return self.layout.rank == 0

    # ---- collectives ----
    def _agree(self, error: Optional[str]) -> Optional[str]:
        return agree(error, self.layout.device)

    def _bcast(self, obj: Any) -> Any:
        return bcast(obj)

    def _agreed(self, fn: Callable[[], Any], rank0_only: bool = False) -> Optional[str]:
        """Run ``fn`` here (on rank 0 only with ``rank0_only``); every rank learns whether it failed
        anywhere. ``fn`` may also return an error text instead of raising."""
        error = None
        if self._rank0 or not rank0_only:
            try:
                result = fn()
                error = result if isinstance(result, str) else None
            except SAVE_ERRORS as e:  # noqa: BLE001 - any failure must reach every rank
                error = error_text(e)
        return self._agree(error)

    def _event(self, record: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(record)
            except SAVE_ERRORS:  # noqa: BLE001 - metrics must not break checkpointing
                log.exception("could not record checkpoint event %s", record.get("event"))

    # ---- sharded state ----
    def _sharded(self, is_loading: bool, trainer_state: Optional[dict] = None) -> dict:
        if len(self.model) == 1:
            model_sd = {"model": unwrap(self.model[0]).sharded_state_dict()}
        else:
            model_sd = {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(self.model)}
        kwargs = {}
        if self.distributed_optimizer:
            # fully_reshardable stores optimizer state in model space: loadable under any
            # TP/PP/DP layout (dp_reshardable only across DP).
            kwargs["metadata"] = {"distrib_optim_sharding_type": "fully_reshardable"}
        sd = dict(model_sd)
        sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, **kwargs)
        if self.extension is not None:
            sd = self.extension.sharded_state_dict(sd, is_loading, trainer_state)
        return sd

    # ---- save ----
    def _paths(self, step: int) -> tuple[str, str]:
        return (os.path.join(self.root, fmt.TMP_PREFIX + fmt.step_dir_name(step)),
                os.path.join(self.root, fmt.step_dir_name(step)))

    def save(self, step: int, extra: Optional[dict] = None) -> Optional[str]:
        """Save the current state as checkpoint ``step``. Returns its final path: committed (sync),
        or to be committed by poll()/wait() (async); None when the save failed (after its retry,
        with an ALERT). Never raises for an I/O or dist_checkpointing failure."""
        t0 = time.perf_counter()
        if self._pending is not None:  # one save in flight at a time (counted as the older one's)
            self._finalize(block=True, retry_step=None)
        save = _Save(step=step, attempt=1, extra=extra, t_start=time.perf_counter())
        ok = self._run_attempts(save)
        if ok and not self.async_save:
            self._committed(save)
        elif ok:
            save.blocking_s = time.perf_counter() - save.t_start
        self.last_save_blocking_s = time.perf_counter() - t0
        self._report_mirror()
        return self._paths(step)[1] if ok else None

    def _run_attempts(self, save: _Save) -> bool:
        """Try to save (async: to schedule) ``save``; on failure clean up, prune and retry once."""
        while True:
            error = self._attempt(save)
            if error is None:
                return True
            error = self._failed_attempt(save, error)
            if save.attempt >= 2:
                self._alert(save, error)
                return False
            save.attempt += 1

    def _attempt(self, save: _Save) -> Optional[str]:
        tmp = self._paths(save.step)[0]
        for phase, rank0_only in ((self._prepare, True), (self._write_small_files, False),
                                  (self._write_shards, False)):
            error = self._agreed(lambda: phase(save, tmp), rank0_only)
            if error:
                dist_ckpt.kill_async_writers(self._calls)
                return error
        if self.async_save:
            self._pending = save
            return None
        return self._agreed(lambda: self._commit(save), rank0_only=True)

    def _prepare(self, save: _Save, tmp: str) -> None:
        """Rank 0: clear what a crash left, check the space (pruning early if short), create tmp."""
        os.makedirs(self.root, exist_ok=True)
        final = self._paths(save.step)[1]
        if os.path.isfile(os.path.join(final, fmt.COMMITTED)):
            raise RuntimeError(f"checkpoint step {save.step} is already committed at {final}; a committed "
                               "checkpoint is never replaced (is another job writing to this run directory?)")
        for name in os.listdir(self.root):  # left by a crash: partial saves, a re-save's old copy
            path = os.path.join(self.root, name)
            if name.startswith(fmt.TMP_PREFIX) or (name.startswith(fmt.TRASH_PREFIX) and not self._deleting):
                shutil.rmtree(path, ignore_errors=True)
            elif name.endswith(fmt.REPLACED):  # an older version's re-save, interrupted
                original = path[:-len(fmt.REPLACED)]
                if os.path.exists(original):
                    fmt.remove_checkpoint(path)
                else:
                    os.rename(path, original)
        self._ensure_space(save.step)
        os.makedirs(tmp)

    def _ensure_space(self, step: int) -> None:
        need = int(self._expected_bytes() * fmt.SPACE_FACTOR)
        free = shutil.disk_usage(self.root).free
        if free < need and self._deleting:
            self._deletions_done()  # space still being freed
            free = shutil.disk_usage(self.root).free
        if free < need:
            log.warning("checkpoint step %d: %.1f MB free under %s, about %.1f MB wanted; pruning per the "
                        "retention policy first", step, free / 1e6, self.root, need / 1e6)
            self._prune(reserve=1)
            self._deletions_done()
            free = shutil.disk_usage(self.root).free
            if free < need:
                log.warning("checkpoint step %d: still only %.1f MB free (policy keep_last=%d keep_every=%d); "
                            "trying anyway", step, free / 1e6, self.keep_last, self.keep_every)

    def _write_small_files(self, save: _Save, tmp: str) -> None:
        """Per-rank RNG states and rank 0's trainer state, captured now (an async save commits later)."""
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{self.layout.rank:05d}.pt"))
        if self._rank0:
            lay = self.layout
            state = {"step": save.step, "world_size": lay.world_size,
                     "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp},
                     "components": {name: c.state_dict() for name, c in self.components.items()},
                     **({"fingerprint": self.fingerprint} if self.fingerprint is not None else {}),
                     **(save.extra or {})}
            write_durable(os.path.join(tmp, fmt.STATE_FILE), json.dumps(state, indent=1).encode())
            if self.config_text is not None:
                write_durable(os.path.join(tmp, "config.yaml"), self.config_text.encode())

    def _write_shards(self, save: _Save, tmp: str) -> None:
        """Model and optimizer through dist_checkpointing (a forked writer when async)."""
        self._warmup.join()
        # megatron's results queue is process-wide: a result that is not this save's would be
        # written into its .metadata (an unloadable checkpoint that verifies). Seen when a
        # killed writer's result was left behind (bench/ckpt_kill_trials.py).
        dist_ckpt.drain_write_results()
        if self._strategy is None:
            self._strategy = dist_ckpt.save_strategy()
        rank_fail = self.fail
        self._strategy.fail = (None if rank_fail is None else
                               (lambda rank, s=save.step, a=save.attempt: rank_fail(rank, s, a)))
        request = dist_ckpt.save_request(self._sharded(is_loading=False), tmp, self._strategy)
        if self.async_save:
            if self._calls is None:
                self._calls = dist_ckpt.async_calls_queue()
            self._calls.schedule_async_request(request)
        else:
            request.execute_sync()

    def _expected_bytes(self) -> int:
        if self._last_size is None:
            for info in reversed(fmt.list_checkpoints(self.root)):
                try:
                    with open(os.path.join(info.path, fmt.MANIFEST)) as f:
                        self._last_size = int(json.load(f)["total_bytes"])
                    break
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        if self._last_size is not None:
            return self._last_size
        # No checkpoint yet: fp32 weights + main copy + two Adam moments of every model-parallel shard.
        local = sum(p.numel() * 4 for m in self.model for p in m.parameters())
        return local * 4 * self.layout.tp * self.layout.pp

    def _commit(self, save: _Save) -> Optional[str]:
        """Rank 0: manifest, fsync, rename, COMMITTED, ledger. Returns an error text or None."""
        tmp, final = self._paths(save.step)
        manifest, manifest_sha = self._seal_tmp(tmp)
        error = self._publish(save.step, tmp, final, manifest_sha)
        if error:
            return error
        # Committed. What follows is best effort: it must not turn a commit into a failure.
        self._last_size = manifest["total_bytes"]
        try:
            with open(os.path.join(self.root, fmt.LEDGER), "a") as f:
                f.write(json.dumps({"step": save.step, "path": fmt.step_dir_name(save.step),
                                    "manifest_sha256": manifest_sha, "bytes": manifest["total_bytes"],
                                    "time": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.warning("checkpoint step %d committed, but %s could not be appended: %s", save.step, fmt.LEDGER, e)
        if self.on_commit is not None:
            self.on_commit(save.step, final)
        return None

    def _seal_tmp(self, tmp: str) -> tuple[dict, str]:
        """megatron's format marker, the writers' hashes merged into MANIFEST.json, a structural
        check of .metadata, everything fsynced."""
        dist_ckpt.write_format_marker(tmp)
        known = {}
        hash_dir = os.path.join(tmp, fmt.HASH_DIR)
        if os.path.isdir(hash_dir):
            for name in os.listdir(hash_dir):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(hash_dir, name)) as f:
                        known.update({k: tuple(v) for k, v in json.load(f).items()})
            shutil.rmtree(hash_dir)
        problem = dist_ckpt.dcp_metadata_problem(tmp)
        if problem:
            raise RuntimeError(f"refusing to commit: {problem}")
        manifest = fmt.build_manifest(tmp, known)
        manifest_sha = fmt.write_manifest(tmp, manifest)
        fsync_tree(tmp)
        return manifest, manifest_sha

    def _publish(self, step: int, tmp: str, final: str, manifest_sha: str) -> Optional[str]:
        """The commit point: rename into place, then COMMITTED. A committed checkpoint is never
        replaced; a never-committed directory of the same step (a crash between rename and
        marker) is."""
        if os.path.isfile(os.path.join(final, fmt.COMMITTED)):
            return (f"checkpoint step {step} is already committed at {final}; a committed checkpoint is never "
                    "replaced (is another job writing to this run directory?)")
        try:
            if os.path.exists(final):
                fmt.remove_checkpoint(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            fmt.write_committed(final, step, manifest_sha)
        except SAVE_ERRORS as e:  # noqa: BLE001
            return error_text(e)
        return None

    def _committed(self, save: _Save) -> None:
        """After a commit every rank agreed on: retention, mirror, event."""
        t0 = time.perf_counter()
        final = self._paths(save.step)[1]
        self._verified.add(os.path.abspath(final))
        if self._rank0:
            try:
                self._prune()
            except SAVE_ERRORS as e:  # noqa: BLE001 - pruning is housekeeping
                log.warning("pruning %s failed: %s", self.root, error_text(e))
        if self.mirror_url and self.layout.is_logging_rank:
            if self._mirror is None:
                self._mirror = Mirror(self.mirror_url, self.mirror_retries)
            self._mirror.submit(save.step, final)
        if self.async_save:
            save.blocking_s += time.perf_counter() - t0
        else:  # a sync save blocks from its start until now
            save.blocking_s = time.perf_counter() - save.t_start
        total = time.perf_counter() - save.t_start
        if self._rank0:
            log.info("checkpoint step %d committed: %s (loop blocked %.3f s, %s save took %.3f s)", save.step, final,
                     save.blocking_s, "async" if self.async_save else "sync", total)
        self._event({"event": "checkpoint", "step": save.step, "path": final, "async": self.async_save,
                     "blocking_s": round(save.blocking_s, 4), "total_s": round(total, 4),
                     "attempts": save.attempt})

    def _failed_attempt(self, save: _Save, error: str) -> str:
        """Every rank, after an agreed failure: kill writers, delete the partial directory, prune.
        Returns the error text with the free space under the root appended."""
        dist_ckpt.kill_async_writers(self._calls)
        tmp, final = self._paths(save.step)
        with contextlib.suppress(OSError):
            error += f" [{shutil.disk_usage(self.root).free / 1e6:.1f} MB free under {self.root}]"
        if self._rank0:
            log.warning("checkpoint step %d: attempt %d failed: %s", save.step, save.attempt, error)
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.isdir(final) and fmt.read_commit(final)[1] is not None:
                fmt.remove_checkpoint(final)  # renamed but never (fully) committed
            try:
                self._prune(reserve=1)
            except SAVE_ERRORS as e:  # noqa: BLE001
                log.warning("pruning %s failed: %s", self.root, error_text(e))
        if dist.is_initialized():
            dist.barrier()
        return error

    def _alert(self, save: _Save, error: str) -> None:
        self.failures += 1
        if self._rank0:
            newest = fmt.committed_checkpoints(self.root)
            log.error("ALERT checkpoint save failed: step %d after %d attempt(s): %s; training continues; last "
                      "committed checkpoint: %s", save.step, save.attempt, error,
                      newest[-1][1] if newest else "none")
        self._event({"event": "checkpoint_failed", "step": save.step, "error": error, "attempts": save.attempt,
                     "checkpoint_failures": self.failures})

    def _prune(self, reserve: int = 0) -> None:
        """Rank 0: delete committed checkpoints the policy does not keep, and never-committed step
        directories older than the newest committed one."""
        infos = fmt.list_checkpoints(self.root)
        committed = [i.step for i in infos if i.committed]
        keep = fmt.retained_steps(committed, self.keep_last, self.keep_every, reserve)
        busy = (self._mirror.busy() if self._mirror is not None else set()) | self.pinned
        newest = max(committed) if committed else None
        for info in infos:
            if info.path in busy:
                continue
            if (info.committed and info.step not in keep) or \
                    (not info.committed and newest is not None and info.step < newest):
                log.info("pruning %s", info.path)
                fmt.remove_checkpoint(info.path, self._deleting)
        self._deleting = [t for t in self._deleting if t.is_alive()]

    def _deletions_done(self) -> None:
        for t in self._deleting:
            t.join()
        self._deleting = []

    # ---- async completion ----
    def poll(self, step: Optional[int] = None) -> None:
        """Call every step on all ranks: commits an async save once every rank's writer is done
        (one small all-reduce while one is in flight; nothing otherwise). If it failed, retries
        once by saving the current state as ``step``."""
        if self._pending is not None:
            self._finalize(block=False, retry_step=step)
        self._report_mirror()

    def wait(self, step: Optional[int] = None, mirror_timeout_s: float = 300.0) -> None:
        """Block until the in-flight save is committed or has failed (retrying as ``step``), then
        until the mirror has copied what is committed (rank 0 / logging rank only)."""
        while self._pending is not None:
            self._finalize(block=True, retry_step=step)
        if self._mirror is not None and not self._mirror.drain(mirror_timeout_s):
            log.warning("checkpoint mirror still busy after %.0f s; leaving it", mirror_timeout_s)
        self._report_mirror()

    def _finalize(self, block: bool, retry_step: Optional[int]) -> None:
        save = self._pending
        t0 = time.perf_counter()
        error = None
        try:
            done = bool(self._calls.maybe_finalize_async_calls(blocking=block))  # collective
        except SAVE_ERRORS as e:  # noqa: BLE001 - raised on every rank by the finalize
            done, error = True, error_text(e)
        if not done:
            save.blocking_s += time.perf_counter() - t0
            return
        self._pending = None
        error = self._agree(error) or self._agreed(lambda: self._commit(save), rank0_only=True)
        save.blocking_s += time.perf_counter() - t0
        if error is None:
            self._committed(save)
            return
        error = self._failed_attempt(save, error)
        if save.attempt >= 2 or retry_step is None:
            self._alert(save, error)
            return
        # Retry once with the current state (the failed one's snapshot is gone).
        t1 = time.perf_counter()
        retry = _Save(step=retry_step, attempt=2, extra=save.extra, t_start=t1)
        err = self._attempt(retry)
        retry.blocking_s += time.perf_counter() - t1
        if err is not None:
            self._alert(retry, self._failed_attempt(retry, err))

    def _report_mirror(self) -> None:
        if self._mirror is None:
            return
        while True:
            try:
                record = self._mirror.results.get_nowait()
            except queue.Empty:
                return
            if record["event"] == "checkpoint_mirror_failed":
                self.mirror_failures += 1  # apart from save failures: the local checkpoint is intact
                record["checkpoint_mirror_failures"] = self.mirror_failures
            self._event(record)

    def close(self) -> None:
        """Local, on any exit path: kill an uncommitted writer (nothing is committed) and stop the
        mirror thread (a copy in progress is abandoned; its remote COMMITTED is never written)."""
        if self._pending is not None:
            dist_ckpt.kill_async_writers(self._calls)
            self._pending = None
        if self._mirror is not None:
            self._mirror.close()
        self._warmup.join(timeout=60)  # a helper process killed while it starts prints a traceback
