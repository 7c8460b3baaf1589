"""Stop signals: SIGTERM, SIGINT and SIGUSR1 ask for a requeue-stop.

A stop signal never interrupts anything. The handler only sets a flag; the training loop
carries this rank's flag in the one per-step all-reduce of the step statistics (train_step),
so every rank sees the same answer at the same step, even when only one rank got the signal.
At that step boundary every rank saves a committed checkpoint (unless that step is already
saved) and the process exits with EXIT_REQUEUE (75). A signal that lands while the last step
(`train.steps` or `train.stop_after`) is in flight ends the run as done (0): nothing is left
to requeue.

Idempotent: only the first stop signal counts. Every later SIGTERM/SIGINT/SIGUSR1 is reported
and ignored, however many arrive, so a save in progress is never cut short and the exit code
stays 75. Duplicates are routine: under Slurm a worker gets SIGTERM from slurmstepd and again
from torchrun, after perhaps a USR1 warning from the batch script; a rule such as "the third
signal exits at once" would turn that ordinary sequence into a lost checkpoint. The hard stops
are the ones that cannot be caught and need no rule: SIGKILL (what Slurm sends after KillWait
and torchrun after --shutdown-timeout) and, from a terminal, SIGQUIT (Ctrl-\\), whose default
action ends the process without a checkpoint (the newest committed one stays valid).

A Python signal handler runs in the main thread between bytecodes. A rank blocked inside a
collective for a hung peer runs it only when the collective returns; that case belongs to the
hang watchdog (megatron_tts/watchdog.py), not to the signal path.

Delivery (see README "Signals, hangs and exit codes"):
- SIGTERM to torchrun is forwarded to every worker (torchrun then exits 1, whatever the
  workers' codes; read RUN_DIR/exit/rank_XXXXX.json for them).
- SIGUSR1 kills a default torchrun. Either launch it with
  `--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1` (then it forwards USR1 like
  SIGTERM), or send USR1 to the worker processes themselves (e.g. Slurm
  `--signal=B:USR1@300`, with the batch script's `trap` forwarding it to the workers).
- torchrun starts each worker in its own session, so a terminal's Ctrl-C reaches only
  torchrun, which forwards SIGINT once.

SIGUSR2 is not a stop: it asks for a torch.profiler trace of the next steps on the worker that
receives it (monitoring/profiling.py). A default torchrun dies on USR2 like on USR1: send it to
the worker processes (e.g. `pkill -USR2 -P <torchrun pid>`).

This module imports nothing heavy: launch/pretrain.py installs the handlers before importing
torch, so a signal during start-up is not lost either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Not a stop: SIGUSR2 asks for a torch.profiler trace of the next steps (monitoring/profiling.py).
PROFILE_SIGNAL = signal.SIGUSR2


class _State:
    signum: Optional[int] = None  # the first stop signal
    received_at: Optional[float] = None  # its wall-clock time
    count: int = 0  # stop signals received, the first included
    installed: bool = False
    profile_requests: int = 0  # SIGUSR2s received (a counter: the reader compares, never resets)


_state = _State()


def install() -> bool:
    """Install the stop handlers (idempotent). Only the main thread can; returns whether installed."""
    if _state.installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    signal.signal(PROFILE_SIGNAL, _profile_handler)
    _state.installed = True
    return True


def _handler(signum: int, frame) -> None:
    _state.count += 1
    name = signal.Signals(signum).name
    if _state.signum is None:
        _state.signum = signum
        _state.received_at = time.time()
        _say(f"{name} received: will save a committed checkpoint at the next step boundary, "
             f"then exit 75 (requeue)")
    else:
        _say(f"{name} received (stop signal #{_state.count}): already stopping; ignored "
             f"(SIGKILL or SIGQUIT end the process without a checkpoint)")


def _profile_handler(signum: int, frame) -> None:
    _state.profile_requests += 1
    _say("SIGUSR2 received: tracing the next profiling.trigger_steps steps with the torch profiler "
         "(RUN_DIR/profile/)")


def profile_requests() -> int:
    """SIGUSR2s received so far; a change since the last look asks for a profile."""
    return _state.profile_requests


def _say(text: str) -> None:
    # os.write, not print/logging: a handler that runs while the main thread is inside a
    # buffered write to stderr would hit "reentrant call" (or a logging lock).
    rank = os.environ.get("RANK")
    prefix = f"[{time.strftime('%Y-%m-%d %H:%M:%S')} r{rank}] " if rank is not None else ""
    try:
        os.write(2, f"{prefix}WARNING megatron_tts.signals: {text}\n".encode())
    except OSError:
        pass


@contextlib.contextmanager
def helpers_shielded():
    """Threads and processes started inside never take a stop signal; the process still does.

    The stop signals are blocked in the calling thread meanwhile: threads created inside inherit
    the blocked mask for their lifetime, and so do processes they or this thread start (a blocked
    mask survives fork and exec). That matters because torchrun stops a worker with
    os.killpg(SIGTERM/SIGINT/SIGUSR1), which also reaches the worker's helper processes (e.g.
    megatron-core's checkpoint write-results Manager, spawned in the background): a helper killed
    by it breaks the very checkpoint the stop is about to write. Shielded helpers still die by
    SIGKILL, and by their parent's shutdown. A stop signal that arrives meanwhile stays pending
    and is handled when the block ends: nothing is lost.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # multiprocessing's resource tracker, started on first use by whichever thread spawns a
        # process, SIG_UNBLOCKs SIGINT and SIGTERM in that thread once it is up (CPython
        # resource_tracker.ensure_running), which would undo the shield for every helper that
        # thread starts afterwards. Start it here, shielded too, and block again.
        with contextlib.suppress(Exception):
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_from_now() -> None:
    """Ignore stop signals for the rest of the process: call once its exit code is decided.
    Python resets its handlers to the default action while the interpreter shuts down, so a
    late duplicate SIGTERM (torchrun relays one as soon as another worker has exited) would
    otherwise kill a process that is exiting 75 and turn its status into -15; an ignored signal
    stays ignored through shutdown. SIGKILL still ends a shutdown that hangs."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS + (PROFILE_SIGNAL,):
            signal.signal(sig, signal.SIG_IGN)


def requested() -> bool:
    """This rank got a stop signal. The loop turns it into a decision shared by every rank."""
    return _state.signum is not None


def signal_name() -> Optional[str]:
    return signal.Signals(_state.signum).name if _state.signum is not None else None


def received_at() -> Optional[float]:
    return _state.received_at


def count() -> int:
    return _state.count


def request(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop from code (as if the signal had arrived)."""
    _handler(signum, None)


def reset() -> None:
    """Forget a stop request (tests)."""
    _state.signum = None
    _state.received_at = None
    _state.count = 0
