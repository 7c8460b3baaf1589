"""The outcome of a launch, from the workers' exit records (RUN_DIR/exit/rank_XXXXX.json).

A torchrun agent exits 1 whenever a worker exits non-zero (75 and 3 included) or the agent was
signalled, so a supervisor cannot read the outcome from the agent's code; each worker writes its
own. `slurm/pretrain.sh` runs this after the agents have exited and acts on its code:

    python -m launch.job_status RUN_DIR [--since EPOCH_SECONDS]

prints one line per outcome seen, then `verdict: <done|requeue|fatal|crash> (<code>)`, and exits
with that code (megatron_tts.exit_codes):

    3   fatal    any rank reported fatal: retrying cannot help, never requeue
    0   done     otherwise, any rank reached the end of training
    1   crash    otherwise, any rank crashed; or no rank of this launch left a record
    75  requeue  every rank of this launch that left a record stopped to be requeued

Fatal wins over everything: a fatal rank must never be requeued, even next to ranks that stopped
cleanly. Done beats crash and requeue because all ranks finish a run together, so a done record
means the run reached its last step; the others can only be left from an earlier elastic round of
the same launch (a rank beyond a later, smaller world size). Ranks that left no record (a lost
node, SIGKILL) do not block a requeue: a 75 means a committed checkpoint exists to resume from.

--since drops records older than the launch: a worker removes its previous record only once its
config has loaded, and ranks beyond a shrunk world size never do, so without it a previous
incarnation's 75 could stand for this one. Give the time taken just before starting the agents
(`date +%s.%N`); records carry the worker host's wall-clock time.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from megatron_tts.exit_codes import EXIT_CRASH, EXIT_DONE, EXIT_FATAL, EXIT_REQUEUE, REASONS, read_exit_records


def verdict(records: dict[int, dict]) -> tuple[int, str]:
    """(exit code, why) for the records of one launch (see the module docstring)."""
    if not records:
        return EXIT_CRASH, "no rank of this launch left an exit record (it failed before training: see the logs)"
    codes = {r.get("code") for r in records.values()}
    for code in (EXIT_FATAL, EXIT_DONE):
        if code in codes:
            return code, f"a rank reported {REASONS[code]}"
    if codes != {EXIT_REQUEUE}:
        return EXIT_CRASH, f"a rank exited {sorted(c for c in codes if c != EXIT_REQUEUE)}"
    return EXIT_REQUEUE, "every rank stopped to be requeued"


def _describe(code, ranks: list[int], recs: list[dict]) -> str:
    span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranges(ranks)}"
    steps = sorted({r["step"] for r in recs if r.get("step") is not None})
    detail = []
    if steps:
        detail.append(f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}")
    for key in ("signal", "why"):
        vals = sorted({str(r[key]) for r in recs if r.get(key)})
        if vals:
            detail.append(f"{key} {'/'.join(vals)}")
    hosts = sorted({r.get("host", "?") for r in recs})
    detail.append(f"host{'s' if len(hosts) > 1 else ''} {','.join(hosts)}")
    errors = [r["error"] for r in recs if r.get("error")]
    line = f"{REASONS.get(code, 'unknown')} ({code}): {span} [{', '.join(detail)}]"
    if errors:
        line += f"\n    first error: {errors[0].splitlines()[0][:300] if errors[0] else ''}"
    return line


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.job_status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--since", type=float, default=0.0,
                   help="ignore records written before this time (epoch seconds): the launch time")
    a = p.parse_args(argv)
    try:
        records = read_exit_records(a.run_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read the exit records under {a.run_dir}/exit: {e}", file=sys.stderr)
        print(f"verdict: {REASONS[EXIT_CRASH]} ({EXIT_CRASH})")
        return EXIT_CRASH
    fresh = {rank: r for rank, r in records.items() if float(r.get("time", 0)) >= a.since}
    stale = sorted(set(records) - set(fresh))
    if stale:
        print(f"ignored {len(stale)} record(s) older than this launch (ranks {_ranges(stale)})")
    by_code: dict[object, list[int]] = defaultdict(list)
    for rank in sorted(fresh):
        by_code[fresh[rank].get("code")].append(rank)
    for code, ranks in sorted(by_code.items(), key=lambda kv: kv[1][0]):
        print(_describe(code, ranks, [fresh[r] for r in ranks]))
    code, why = verdict(fresh)
    print(f"verdict: {REASONS[code]} ({code}): {why}")
    return code


if __name__ == "__main__":
    sys.exit(main())
