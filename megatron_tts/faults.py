"""Fault injection for tests and drills, off (and free) unless MEGATRON_TTS_FAULT is set.

Grammar: MEGATRON_TTS_FAULT="KIND[:key=value]...[;KIND...]" where a spec matches when every
given key equals the call's value (`step` and `attempt` also take ranges `a-b` and lists
`a,b,c`). `attempt` counts train steps run by this process, rollbacks included, so a fault
keyed on it does not recur when a rollback replays the same step numbers.

Kinds:
    nan_loss   multiply the loss of the matching step by NaN (gradients become NaN too)
    nan_grad   put a NaN into the first gradient buffer after backward
    hang       sleep forever at the matching phase boundary. The training loop calls
               maybe_inject(phase, step, rank) right after each watchdog heartbeat, at the
               phases data, forward_backward, optimizer (step = the step being computed),
               logging, checkpoint (step = the step just completed); without `phase`, a hang
               keyed on a step stops at its first boundary, `data`, so the stuck rank's last
               heartbeat is `data` while its peers go on into forward_backward and wait in
               the gradient all-reduce (tests/integration/test_hang.py)

    slow       sleep `seconds` (default 0.2) at the matching phase boundary: a straggler for
               monitoring (tests/integration/test_monitoring.py). Without `phase`, at `data`,
               inside the timed step, so that its peers wait for it in the gradient sync

Keys other than the match keys: `seconds` (slow).

Examples: "nan_loss:step=3-4", "nan_loss:attempt=5-7", "nan_grad:step=7:rank=1",
"hang:rank=1:step=3:phase=forward_backward", "slow:rank=1,seconds=0.2" (every step),
"slow:rank=1:step=5-9:seconds=0.5:phase=optimizer".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

ENV = "MEGATRON_TTS_FAULT"


# Keys that parameterise a fault instead of selecting when it fires.
PARAMS = {"seconds"}


@dataclass
class Spec:
    kind: str
    match: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def matches(self, **context) -> bool:
        for key, want in self.match.items():
            have = context.get(key)
            if have is None:
                return False
            if key in ("step", "attempt"):
                if int(have) not in _steps(want):
                    return False
            elif str(have) != want:
                return False
        return True


def _steps(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return out


def parse(text: str) -> list[Spec]:
    specs = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        kind, *pairs = item.split(":")
        match, params = {}, {}
        for pair in pairs:
            # "rank=1,seconds=0.2": a comma before a parameter separates it too
            head, sep, rest = pair.partition(",")
            if sep and rest.partition("=")[0] in PARAMS:
                pairs.append(rest)
                pair = head
            key, _, value = pair.partition("=")
            (params if key in PARAMS else match)[key] = value
        if kind == "slow":
            match.setdefault("phase", "data")
        specs.append(Spec(kind, match, params))
    return specs


_SPECS = parse(os.environ.get(ENV, ""))


def enabled() -> bool:
    """Whether any fault is configured (the training loop installs its fault hook only then)."""
    return bool(_SPECS)


def active(kind: str, **context) -> bool:
    """True when a spec of this kind matches the context (step=, rank=, phase=, ...)."""
    return any(s.kind == kind and s.matches(**context) for s in _SPECS)


def maybe_inject(phase: str, step: int, rank: int, **context) -> None:
    """Phase-boundary faults (hang, slow)."""
    if not _SPECS:
        return
    if active("hang", phase=phase, step=step, rank=rank, **context):
        while True:  # a rank that never returns, as a wedged collective or a dead GPU would
            time.sleep(3600)
    for s in _SPECS:
        if s.kind == "slow" and s.matches(phase=phase, step=step, rank=rank, **context):
            time.sleep(float(s.params.get("seconds", 0.2)))  # a slow rank, as a throttled GPU would be
