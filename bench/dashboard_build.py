"""How long `monitoring.dashboard` takes to build the page of a long run, and how big it is.

    python bench/dashboard_build.py [--steps 10000 100000 1000000]

Each size is a synthetic run with every metrics field (tests/unit/test_dashboard.py's
write_synthetic_run: one record per step, an event every 100 steps, a resume near the end).
Prints, per size: build wall and CPU seconds, CPU microseconds per record, and the page size,
side by side, so the ratio between sizes shows whether the build stays linear and the page
bounded (downsampled to monitoring.dashboard.MAX_POINTS per series).

The target is the one tests/integration/test_dashboard.py used to time: 10^5 steps under 5 s CPU
on the 2-core CPU machine. Timing lives here, not in the test suite, where a loaded machine
stretched the CPU time past it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from monitoring.dashboard import MAX_POINTS, build
    from tests.unit.test_dashboard import write_synthetic_run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10_000, 100_000])
    a = p.parse_args()
    print(f"MAX_POINTS per series: {MAX_POINTS}")
    print(f"{'steps':>9} {'records':>9} {'wall s':>8} {'CPU s':>7} {'CPU us/record':>14} {'page MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for steps in a.steps:
            run_dir = os.path.join(tmp, f"run_{steps}")
            write_synthetic_run(run_dir, steps=steps, resume_at=steps - steps // 100)
            _, built = build(run_dir, os.path.join(tmp, f"{steps}.html"))
            print(f"{steps:>9,} {built['records']:>9,} {built['seconds']:>8.2f} {built['cpu_s']:>7.2f} "
                  f"{built['cpu_s'] / built['records'] * 1e6:>14.1f} {built['bytes'] / 1e6:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
