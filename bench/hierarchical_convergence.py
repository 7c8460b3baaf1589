"""Convergence of hierarchical DP (parallel.hierarchical) against plain DP at the same tokens.

Runs the real entry point on 4 gloo processes as 2 simulated nodes x 2 DP ranks (configs/tiny.yaml
on data/demo; every setting sees the same batches in the same order), reads each run's
metrics.jsonl, and writes a table (Markdown, stdout), the raw curves (--json) and a plot (--svg,
written by hand: no plotting library is a dependency).

    .venv/bin/python bench/hierarchical_convergence.py --steps 200 --svg docs/hierarchical_convergence.svg

The inter-node bytes per GPU per step are launch.plan's model (megatron_tts.hierarchical, the
plan's dp_sync): node-aware collectives, the 2 DP ranks of a node each exchanging half across
the 2 nodes; fp32 gradients on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from monitoring.metrics import read_jsonl  # noqa: E402

HIER = ["parallel.hierarchical.enabled=true", "parallel.hierarchical.inner=2"]


def settings() -> list[tuple[str, list[str], int]]:
    """(label, overrides, outer_interval or 0 for plain DP)."""
    out = [("plain DP", [], 0)]
    for k in (4, 8, 16):
        out.append((f"average k={k}", HIER + [f"parallel.hierarchical.outer_interval={k}",
                                               "parallel.hierarchical.outer_optimizer.kind=average",
                                               "parallel.hierarchical.outer_optimizer.lr=1.0"], k))
    for k in (4, 8, 16):
        out.append((f"nesterov k={k}", HIER + [f"parallel.hierarchical.outer_interval={k}",
                                                "parallel.hierarchical.outer_optimizer.kind=nesterov",
                                                "parallel.hierarchical.outer_optimizer.lr=0.7",
                                                "parallel.hierarchical.outer_optimizer.momentum=0.9"], k))
    return out


def run(label: str, overrides: list[str], steps: int, root: str) -> dict:
    run_dir = os.path.join(root, label.replace(" ", "_").replace("=", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "--log-dir", os.path.join(run_dir, "tr"), "-m", "launch.pretrain", "--config", "configs/tiny.yaml",
           f"train.run_dir={run_dir}", f"train.steps={steps}", "logging.interval=1", "logging.console=false",
           f"checkpoint.interval={steps * 10}", "data.num_workers=1", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"{label}: the run failed with exit {r.returncode}")
    recs = [x for x in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in x]
    params = None
    for line in (r.stdout + r.stderr).splitlines():
        if "M params" in line:
            params = float(line.split("model: ")[1].split("M params")[0]) * 1e6
    return {"label": label, "wall_s": round(wall, 1), "params": params,
            "steps": [x["step"] for x in recs], "loss": [x["loss"] for x in recs],
            "tokens": [x["consumed_tokens"] for x in recs],
            "outer_steps": max((x.get("outer_steps", 0) for x in recs), default=0),
            "outer_sync_s": sum(x.get("outer_sync_s", 0.0) for x in recs),
            "step_time_s": statistics.median(x["step_time_s"] for x in recs)}


def inter_node_bytes(params: float, k: int) -> float:
    """Per GPU per step, 2 nodes x 2 DP ranks, fp32: flat DP all-reduces the gradients every step,
    hierarchical DP the parameter delta every k steps; each GPU exchanges half (2 (N-1)/N = 1)."""
    return 4 * params / 2 * 1 / (k or 1)


def smooth(xs: list[float], w: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def svg(results: list[dict], path: str, window: int) -> None:
    width, height, left, right, top, bottom = 760, 440, 60, 170, 30, 45
    steps = max(max(r["steps"]) for r in results)
    curves = [(r["label"], r["steps"], smooth(r["loss"], window)) for r in results]
    lo = min(min(c[2]) for c in curves)
    hi = max(max(c[2][min(5, len(c[2]) - 1):]) for c in curves)
    pw, ph = width - left - right, height - top - bottom

    def xy(s: float, v: float) -> tuple[float, float]:
        return left + pw * (s - 1) / max(1, steps - 1), top + ph * (1 - (min(v, hi) - lo) / (hi - lo))

    colors = ["#000000", "#1f77b4", "#2ca02c", "#17becf", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18">Hierarchical DP vs plain DP: tiny on data/demo, 4 gloo processes as 2 nodes x 2 '
           f'(loss, mean of {window} steps)</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        _, y = xy(1, v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i in range(6):
        s = 1 + (steps - 1) * i / 5
        x, _ = xy(s, lo)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{int(round(s))}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">step (same tokens per step in '
               f'every setting)</text>')
    for n, (label, xs, ys) in enumerate(curves):
        c = colors[n % len(colors)]
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(s, v) for s, v in zip(xs, ys)))
        dash = ' stroke-dasharray="5,3"' if label.startswith("nesterov") else ""
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5"{dash} points="{pts}"/>')
        y = top + 14 + 18 * n
        out.append(f'<line x1="{left + pw + 10}" y1="{y - 4}" x2="{left + pw + 35}" y2="{y - 4}" stroke="{c}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{left + pw + 40}" y="{y}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--last", type=int, default=20, help="mean loss over the last N steps")
    p.add_argument("--only", help="comma-separated labels to run (default: all)")
    p.add_argument("--svg", help="write the plot here")
    p.add_argument("--json", help="write the curves here")
    a = p.parse_args()
    chosen = [s for s in settings() if not a.only or s[0] in a.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as root:
        for label, overrides, k in chosen:
            r = run(label, overrides, a.steps, root)
            r["k"] = k
            results.append(r)
            print(f"# {label}: {r['wall_s']} s", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f)
    if a.svg:
        svg(results, a.svg, window=10)
    base = statistics.fmean(results[0]["loss"][-a.last:])
    print(f"| setting | loss, mean of the last {a.last} steps | vs plain DP | tokens | outer syncs | "
          "inter-node bytes/GPU/step | median step s | outer sync s (total) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        last = statistics.fmean(r["loss"][-a.last:])
        print(f"| {r['label']} | {last:.4f} | {last - base:+.4f} | {r['tokens'][-1]:,} | {r['outer_steps']} | "
              f"{inter_node_bytes(r['params'], r['k']) / 1e6:.2f} MB | {r['step_time_s']:.3f} | "
              f"{r['outer_sync_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
