"""The compact index at LLaSA scale (10^8 utterances in 10^5 shards), simulated on one machine.

    python bench/index_scale.py [--samples 100000000] [--shards 100000] [--dir DIR] [--procs 2] [--keep]

1. Writes a synthetic dataset index (index.json + index.cidx, no tars) streamed in constant memory;
   utterances of 0.5-38 s (lognormal, median 5.5 s) at xcodec2's 50 frames/s. Reports the size.
2. One rank of 1,024 (x 8 worker threads) in a fresh process: opens the dataset (PackedLoader) and
   plans its first 100 steps (``read_plan``: the byte ranges it would read): wall time, peak RSS,
   bytes read from the index.
3. The assignment of epoch 0 to 1,024 ranks x 8 workers: every window planned (in --procs
   processes), every sample counted in a per-sample uint8 array (N bytes: fits here; each process
   keeps its own and they are summed), each pack mapped to its (rank, worker) by
   ``data_pipeline.loader.assignment``. Disjoint (no count above 1) and complete (every sample that
   fits a sequence counted once, the rest are the too-long ones).
4. Cross-check: real per-rank loaders (ranks 0, 777, 1023) plan exactly the ranges the partition
   gives them.

Nothing here is a timed test; tests/unit/test_compact_index_scale.py runs the same code at 10^6.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CODEC = {"name": "xcodec2-synthetic", "version": "0.1.5", "sample_rate": 16000, "frame_rate": 50, "n_q": 1,
         "codebook_size": 65536}
FRAME_RATE = 50
SEQ_LEN = 2048
DP, WORKERS, GBS, MBS, STEPS = 1024, 8, 2048, 1, 100


def _pad(n: np.ndarray) -> np.ndarray:
    return -(-n // 512) * 512


def write_synthetic(out_dir: str, n_samples: int, n_shards: int, seed: int = 0, median_s: float = 5.5,
                    name: str = "synthetic") -> dict:
    """A dataset index of ``n_samples`` utterances in ``n_shards`` shards, with no tars."""
    from data_pipeline.compact_index import CompactIndexWriter
    from data_pipeline.shards import DatasetIndex, ShardSummary

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = np.full(n_shards, n_samples // n_shards, np.int64)
    per[: n_samples % n_shards] += 1
    w = CompactIndexWriter()
    summaries = []
    t0 = time.perf_counter()
    for s in range(n_shards):
        n = int(per[s])
        dur = np.clip(rng.lognormal(np.log(median_s), 0.6, n), 0.5, 38.0)
        frames = np.maximum(1, np.round(dur * FRAME_RATE)).astype(np.int64)
        text = np.maximum(1, np.round(dur * 14 * rng.uniform(0.8, 1.2, n))).astype(np.int64)
        # three members (ustar headers, .npy of uint16 [1, T], transcript, ~350 bytes of metadata)
        nbytes = 3 * 512 + _pad(128 + 2 * frames) + _pad(text) + _pad(np.full(n, 350))
        offset = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
        size = int(nbytes.sum()) + 1024
        sha = rng.bytes(32).hex()
        path = f"shard-{s:06d}.tar"
        w.add_arrays(path, size, sha, offset=offset, nbytes=nbytes, n_frames=frames, text_bytes=text,
                     duration_s=(frames / FRAME_RATE).astype(np.float32))
        summaries.append(ShardSummary(path, f"shard-{s:06d}.idx.json", n, int(frames.sum()),
                                      float(frames.sum() / FRAME_RATE), int(text.sum()), size, sha))
    ds = DatasetIndex(name=name, codec=CODEC, shards=summaries)
    ds.save(out_dir)
    hours = ds.seconds / 3600
    w.save(out_dir, ds.name, ds.codec, ds.to_json().encode())
    return {"seconds": time.perf_counter() - t0, "cidx_bytes": os.path.getsize(os.path.join(out_dir, "index.cidx")),
            "index_json_bytes": os.path.getsize(os.path.join(out_dir, "index.json")), "hours": hours}


def make_loader(data_dir: str, rank: int = 0, dp: int = DP, workers: int = WORKERS, gbs: int = GBS, **kw):
    from data_pipeline.layouts import VocabLayout, build_layout
    from data_pipeline.loader import PackedLoader
    from data_pipeline.tokenizer import ByteTokenizer

    layout = build_layout("llasa", VocabLayout(text_vocab_size=256, codebook_size=CODEC["codebook_size"]))
    return PackedLoader(data_dir, layout=layout, tokenizer=ByteTokenizer(), seq_len=kw.pop("seq_len", SEQ_LEN),
                        micro_batch_size=MBS, global_batch_size=gbs, dp_rank=rank, dp_size=dp, num_workers=workers,
                        prefetch=0, **kw)


def rank_startup(data_dir: str, rank: int, steps: int, dp: int = DP, gbs: int = GBS) -> dict:
    """Open the dataset as one rank and plan its first ``steps`` steps (run in a fresh process)."""
    t0 = time.perf_counter()
    import torch  # noqa: F401 - the loader's own import cost, counted apart

    import psutil

    from data_pipeline import loader as _loader  # noqa: F401
    rss_imports = psutil.Process().memory_info().rss / 2**20
    t1, c1 = time.perf_counter(), time.process_time()
    ld = make_loader(data_dir, rank, dp=dp, gbs=gbs)
    t2, c2 = time.perf_counter(), time.process_time()
    opened = ld.index_bytes_read
    plan = ld.read_plan(steps)
    t3, c3 = time.perf_counter(), time.process_time()
    out = {"import_s": t1 - t0, "open_s": t2 - t1, "plan_s": t3 - t2, "open_cpu_s": c2 - c1, "plan_cpu_s": c3 - c2,
           "rss_after_imports_mb": rss_imports,
           "rss_after_plan_mb": psutil.Process().memory_info().rss / 2**20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "open_bytes": opened, "index_bytes": ld.index_bytes_read, "index_reads": sum(d.index.reads for d in
                                                                                         ld._src.datasets),
           "tar_ranges": sum(len(s) for s in plan), "tar_bytes": sum(b - a for s in plan for _, a, b in s),
           "samples": ld.n_samples}
    ld.close()
    return out


def _plan_windows(args: tuple) -> tuple[str, list[np.ndarray], int, int]:
    """Windows [w0, w1) of epoch 0: per-sample counts (saved to a file), per-window pack sizes."""
    from data_pipeline.mixing import StreamState

    data_dir, w0, w1, n, tmp, seq_len = args
    ld = make_loader(data_dir, 0, dp=1, workers=1, gbs=1, seq_len=seq_len)
    planner, row_start = ld._planner, ld._src.datasets[0].index.row_start
    counts = np.zeros(n, np.uint8)
    docs: list[np.ndarray] = []
    too_long = dup = 0
    for w in range(w0, w1):
        plan = planner.plan((StreamState(0, w * planner.pack_window, 0),))
        too_long += len(plan.too_long)
        sh = np.fromiter((s for p in plan.packs for s in p.shards), np.int64)
        ix = np.fromiter((i for p in plan.packs for i in p.indices), np.int64)
        ids = row_start[sh] + ix
        if len(np.unique(ids)) != len(ids):
            dup += 1
        counts[ids] += 1
        docs.append(np.fromiter((p.n_docs for p in plan.packs), np.uint8))
    path = os.path.join(tmp, f"counts-{w0}.npy")
    np.save(path, counts)
    ld.close()
    return path, docs, too_long, dup


def check_assignment(data_dir: str, procs: int = 2, dp: int = DP, workers: int = WORKERS, gbs: int = GBS,
                     seq_len: int = SEQ_LEN) -> dict:
    """Epoch 0 over ``dp`` ranks x ``workers``: disjoint and complete (see the module docstring)."""
    from data_pipeline.loader import assignment

    ld = make_loader(data_dir, 0, dp=1, workers=1, gbs=1, seq_len=seq_len)
    n, nw_ = ld.n_samples, -(-ld.n_samples // ld.pack_window)
    ld.close()
    t0 = time.perf_counter()
    bounds = np.linspace(0, nw_, procs * 8 + 1).astype(int)
    tmp = tempfile.mkdtemp(prefix="assign-")
    jobs = [(data_dir, int(a), int(b), n, tmp, seq_len) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    try:
        if procs > 1:
            with mp.get_context("fork").Pool(procs) as pool:
                parts = pool.map(_plan_windows, jobs)
        else:
            parts = [_plan_windows(j) for j in jobs]
        total = np.zeros(n, np.uint16)
        for path, _, _, _ in parts:
            total += np.load(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plan_s = time.perf_counter() - t0
    docs = np.concatenate([d for _, ds, _, _ in parts for d in ds]).astype(np.int64)
    too_long = sum(p[2] for p in parts)
    dup_windows = sum(p[3] for p in parts)
    # each pack -> (rank, worker), vectorised, cross-checked against assignment() itself
    p = np.arange(len(docs))
    step, i = p // gbs, p % gbs
    per_rank = gbs // dp
    rank, j = i // per_rank, i % per_rank
    worker = (step * (per_rank // MBS) + j // MBS) % workers
    rng = np.random.default_rng(0)
    for q in rng.choice(len(docs), min(20000, len(docs)), replace=False).tolist():
        assert assignment(q, (q // gbs) * gbs, gbs, dp, MBS, workers) == (int(rank[q]), int(worker[q]))
    slot = rank * workers + worker
    slot_docs = np.bincount(slot, weights=docs, minlength=dp * workers)
    slot_packs = np.bincount(slot, minlength=dp * workers)
    return {
        "samples": n, "windows": nw_, "packs": len(docs), "plan_s": plan_s,
        "max_count": int(total.max()), "counted_once": int((total == 1).sum()), "not_counted": int((total == 0).sum()),
        "too_long": too_long, "duplicate_windows": dup_windows,
        "disjoint": bool(total.max() <= 1 and dup_windows == 0),
        "complete": bool((total == 1).sum() + too_long == n and int(docs.sum()) == int((total == 1).sum())),
        "slots": dp * workers, "slots_used": int((slot_packs > 0).sum()),
        "docs_per_slot_min_max": [int(slot_docs.min()), int(slot_docs.max())],
        "packs_per_slot_min_max": [int(slot_packs.min()), int(slot_packs.max())],
    }


def cross_check_ranks(data_dir: str, ranks: list[int], steps: int = 3, dp: int = DP, gbs: int = GBS) -> bool:
    """Real per-rank loaders read exactly the packs the partition gives their rank."""
    from data_pipeline.loader import assignment

    ref = make_loader(data_dir, 0, dp=1, workers=1, gbs=gbs)
    gen = ref._new_gen()
    packs = [gen.stream.next_pack()[0] for _ in range(steps * gbs)]
    ok = True
    for r in ranks:
        ld = make_loader(data_dir, r, dp=dp, gbs=gbs)
        got = ld.read_plan(steps)
        for t in range(steps):
            mine = [packs[q] for q in range(t * gbs, (t + 1) * gbs)
                    if assignment(q, t * gbs, gbs, dp, MBS, WORKERS)[0] == r]
            want = [(ld._src.shard_url(s), a, b) for s, _, spans in ld._reader.read_spans(mine) for a, b in spans]
            ok &= got[t] == want
        ld.close()
    ref.close()
    return ok


def compare_packers(windows: int = 40, window: int = 1024) -> list[dict]:
    """Best-fit-decreasing, minimal bin slack and the hybrid the loader uses, side by side: time
    per window and fill, on this bench's speech lengths (seq 2048 and 4096) and on the demo's."""
    from data_pipeline.compact_index import CompactIndex
    from data_pipeline.packing import best_fit_decreasing, minimal_bin_slack, pack_bins

    rng = np.random.default_rng(0)
    dur = np.clip(rng.lognormal(np.log(5.5), 0.6, windows * window), 0.5, 38.0)
    speech = 4 + np.round(dur * 14) + np.round(dur * FRAME_RATE)  # llasa: framing + text bytes + frames
    demo = CompactIndex.open(str(Path(__file__).resolve().parents[1] / "data" / "demo"))
    demo_len = np.concatenate([4 + demo.column("text_bytes", s).astype(np.int64) + demo.column("n_frames", s)
                               for s in range(demo.n_shards)])
    cases = [("speech 0.5-38 s", speech.astype(np.int64), 2048), ("speech 0.5-38 s", speech.astype(np.int64), 4096),
             ("demo", np.tile(demo_len, -(-windows * window // len(demo_len)))[: windows * window], 512)]
    out = []
    for label, lengths, seq in cases:
        lengths = lengths[lengths <= seq]
        row = {"data": label, "seq_len": seq}
        for name, fn in (("bfd", best_fit_decreasing), ("mbs", minimal_bin_slack), ("hybrid", pack_bins)):
            t0, bins = time.process_time(), 0  # CPU time: robust on a shared machine
            for w in range(windows):
                bins += len(fn(lengths[w * window:(w + 1) * window], seq))
            row[name] = {"ms_per_window": (time.process_time() - t0) / windows * 1e3,
                         "fill": float(lengths[: windows * window].sum()) / (bins * seq)}
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=float, default=1e8)
    ap.add_argument("--shards", type=float, default=1e5)
    ap.add_argument("--dir", default=None, help="where to write the synthetic index (default: a temp dir)")
    ap.add_argument("--procs", type=int, default=2, help="processes planning the epoch for the assignment check")
    ap.add_argument("--keep", action="store_true", help="keep the index (it is deleted by default)")
    ap.add_argument("--reuse", action="store_true", help="use the index already in --dir (written by --keep)")
    ap.add_argument("--skip-assignment", action="store_true")
    ap.add_argument("--packers", action="store_true", help="only compare the packers (no index written)")
    ap.add_argument("--rank-startup", metavar="DIR", help=argparse.SUPPRESS)  # internal: the child process
    ap.add_argument("--rank", type=int, default=DP // 2)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.rank_startup:
        print(json.dumps(rank_startup(args.rank_startup, args.rank, STEPS)))
        return 0
    if args.packers:
        print(f"{'lengths':<18}{'seq':>6}  " + "  ".join(f"{n + ' ms/window':>16}{'fill':>8}" for n in ("bfd", "mbs",
                                                                                                  "hybrid")))
        for r in compare_packers():
            print(f"{r['data']:<18}{r['seq_len']:>6}  " + "  ".join(
                f"{r[n]['ms_per_window']:>16.2f}{r[n]['fill']:>8.4f}" for n in ("bfd", "mbs", "hybrid")))
        return 0
    out_dir = args.dir or tempfile.mkdtemp(prefix="cidx-scale-")
    res: dict = {"samples": int(args.samples), "shards": int(args.shards)}
    try:
        if args.reuse and os.path.exists(os.path.join(out_dir, "index.cidx")):
            from data_pipeline.compact_index import CompactIndex

            ix = CompactIndex.open(out_dir)
            res["samples"], res["shards"] = ix.n_samples, ix.n_shards
            res["write"] = {"seconds": 0.0, "cidx_bytes": os.path.getsize(os.path.join(out_dir, "index.cidx")),
                            "index_json_bytes": os.path.getsize(os.path.join(out_dir, "index.json")),
                            "hours": float(ix.rows("duration_s", 0, min(ix.n_samples, 10**6)).mean())
                            * ix.n_samples / 3600}
            ix.close()
        else:
            res["write"] = write_synthetic(out_dir, int(args.samples), int(args.shards))
        print(f"synthetic index: {res['samples']:,} samples ({res['write']['hours']:,.0f} h) in {res['shards']:,} "
              f"shards; index.cidx {res['write']['cidx_bytes'] / 1e9:.2f} GB, index.json "
              f"{res['write']['index_json_bytes'] / 1e6:.1f} MB; "
              + (f"written in {res['write']['seconds']:.0f} s" if res["write"]["seconds"] else "reused"), flush=True)
        child = subprocess.run([sys.executable, __file__, "--rank-startup", out_dir, "--rank", str(args.rank)],
                               capture_output=True, text=True, check=True)
        r = res["rank"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"rank {args.rank}/{DP} x {WORKERS} workers: open {r['open_s']:.2f} s + plan {STEPS} steps "
              f"{r['plan_s']:.2f} s wall ({r['open_cpu_s']:.2f} + {r['plan_cpu_s']:.2f} s CPU; imports "
              f"{r['import_s']:.1f} s); RSS {r['rss_after_imports_mb']:.0f} MB after "
              f"importing torch and the loader, {r['rss_after_plan_mb']:.0f} MB after planning, peak "
              f"{r['peak_rss_mb']:.0f} MB; index bytes read: "
              f"{r['open_bytes'] / 1e6:.2f} MB at open, {r['index_bytes'] / 1e6:.2f} MB in all ({r['index_reads']} "
              f"reads); its tar reads: {r['tar_ranges']} ranges, {r['tar_bytes'] / 1e6:.1f} MB", flush=True)
        if not args.skip_assignment:
            a = res["assignment"] = check_assignment(out_dir, args.procs)
            print(f"epoch 0 over {DP} ranks x {WORKERS} workers: {a['packs']:,} packs from {a['windows']:,} windows, "
                  f"planned in {a['plan_s']:.0f} s ({args.procs} processes); disjoint={a['disjoint']} (max count "
                  f"{a['max_count']}), complete={a['complete']} ({a['counted_once']:,} once + {a['too_long']:,} too "
                  f"long = {a['samples']:,}); slots used {a['slots_used']}/{a['slots']}, docs per slot "
                  f"{a['docs_per_slot_min_max']}", flush=True)
            res["cross_check"] = cross_check_ranks(out_dir, [0, 777, DP - 1])
            print(f"per-rank loaders 0, 777, {DP - 1} plan what the partition gives them: {res['cross_check']}")
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
