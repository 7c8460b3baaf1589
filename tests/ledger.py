"""Reading the sample ledger (logging.ledger=true) back into the run's effective history."""

from __future__ import annotations

import collections
import glob
import json
import os


def effective_history(run_dir: str) -> dict[int, list[dict]]:
    """For each step, the records of the last incarnation that ran it (restarts redo the steps
    after the last committed checkpoint; only the final execution counts)."""
    by_step: dict[int, dict[str, list[dict]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in glob.glob(os.path.join(run_dir, "ledger", "rank_*.jsonl")):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    by_step[r["step"]][r["incarnation"]].append(r)
    out = {}
    for step, incs in by_step.items():
        last = max(incs, key=float)
        out[step] = sorted(incs[last], key=lambda r: r["dp_rank"])
    return out


def check_exactly_once(run_dir: str, steps: int, global_batch: int) -> dict:
    """Every global pack 0..steps*G-1 trained exactly once, in order; no sample key twice
    within an epoch. Returns facts for the caller (dp sizes seen, epochs)."""
    hist = effective_history(run_dir)
    assert sorted(hist) == list(range(1, steps + 1)), f"steps in the ledger: {sorted(hist)}"
    packs, keys_by_epoch, dp_sizes = [], collections.defaultdict(list), []
    for step in range(1, steps + 1):
        recs = hist[step]
        dp = recs[0]["dp_size"]
        assert [r["dp_rank"] for r in recs] == list(range(dp)), f"step {step}: dp ranks {[r['dp_rank'] for r in recs]}"
        dp_sizes.append(dp)
        for r in recs:
            for row in r["rows"]:
                packs.append(row["pack"])
                keys_by_epoch[row["epoch"]] += row["keys"]
    assert packs == list(range(steps * global_batch)), "packs lost, repeated or out of order"
    for epoch, keys in keys_by_epoch.items():
        dup = [k for k, n in collections.Counter(keys).items() if n > 1]
        assert not dup, f"epoch {epoch}: samples trained twice: {dup[:5]}"
    return {"dp_sizes": dp_sizes, "epochs": sorted(keys_by_epoch)}
