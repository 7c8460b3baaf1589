"""Packed-loader throughput against a raw sequential tar read, on one CPU core.

    python bench/loader_throughput.py [--data data/demo] [--seq-len 2048] [--seconds 5] [--before REV]

All measurements run in this run, pinned to one core (``--cores 1``), over the same shards,
interleaved (``--rounds`` times each, the median reported). Throughput is counted per CPU second
of the process (all its threads): what one core delivers, and unlike wall time not skewed by the
other jobs of a shared machine (wall-time rates are reported too):

* raw tar: every shard read front to back with ``tarfile`` (members read, nothing decoded);
  tokens/s counts the layout tokens of the samples passed;
* loader, generic parse: ``PackedLoader(fast_read=False)``: every sample through the tar +
  ``.npy`` header parser (what the loader did before the fast path);
* loader: ``PackedLoader.next_step()`` with ``num_workers=1`` (planning, range reads, in-place
  decoding, tokenising, layout, packing, labels/masks and the [B,1,S,S] attention mask included);
  tokens/s counts real (non-pad) tokens delivered;
* ``--before REV``: the loader of git revision REV (its data_pipeline and storage packages
  extracted to a temp dir), in a child process pinned to the same core.

A small dataset is repeated (epochs) until ``--seconds`` have elapsed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pin_cores(n: int) -> list[int]:
    """Restrict this process (all threads) to its first ``n`` allowed cores."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:n]
    os.sched_setaffinity(0, chosen)
    return chosen


def raw_tar_read(shard_urls: list[str], tokens_per_pass: int, seconds: float) -> dict[str, float]:
    """Read every member of every shard sequentially with tarfile until ``seconds`` pass."""
    n_bytes = n_passes = n_members = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        for url in shard_urls:
            with tarfile.open(url, "r") as tf:
                for m in tf:
                    f = tf.extractfile(m)
                    if f is not None:
                        n_bytes += len(f.read())
                        n_members += 1
        n_passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    cpu = time.process_time() - c0
    file_bytes = n_passes * sum(os.path.getsize(u) for u in shard_urls)
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "passes": n_passes,
        "bytes_per_s": file_bytes / cpu,
        "payload_bytes_per_s": n_bytes / cpu,
        "tokens_per_s": n_passes * tokens_per_pass / cpu,
        "samples_per_s": n_members / 3 / cpu,
        "tokens_per_wall_s": n_passes * tokens_per_pass / elapsed,
    }


def loader_read(loader, seconds: float) -> dict[str, float]:
    loader.next_step()  # warm-up: first window plan, thread start
    tokens = rows = docs = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        for b in loader.next_step():
            tokens += b.n_tokens
            rows += b.tokens.shape[0]
            docs += sum(len(k) for k in b.sample_keys)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    # (the prefetch thread may be a step ahead: a few % of one step, over many)
    cpu = time.process_time() - c0
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "tokens_per_s": tokens / cpu,
        "padded_tokens_per_s": rows * loader.seq_len / cpu,
        "samples_per_s": docs / cpu,
        "packs_per_s": rows / cpu,
        "tokens_per_wall_s": tokens / elapsed,
        "efficiency": tokens / (rows * loader.seq_len),
        "epochs": loader.stats["epoch"],
    }


def _setup(args: argparse.Namespace):
    from data_pipeline import shards
    from data_pipeline.layouts import VocabLayout, build_layout
    from data_pipeline.tokenizer import build_tokenizer

    ds = shards.DatasetIndex.load(args.data)
    tok = build_tokenizer(args.tokenizer, args.tokenizer_path)
    n_q = int(ds.codec["n_q"])
    vocab = VocabLayout(text_vocab_size=tok.vocab_size, codebook_size=int(ds.codec["codebook_size"]),
                        n_codebooks=n_q if args.layout == "flattened" else 1)
    return ds, tok, build_layout(args.layout, vocab)


def measure_loader(args: argparse.Namespace, **extra) -> dict[str, float]:
    from data_pipeline.loader import PackedLoader

    _, tok, layout = _setup(args)
    with PackedLoader([args.data], layout=layout, tokenizer=tok, seq_len=args.seq_len,
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                      pack_window=args.pack_window, num_workers=args.num_workers, prefetch=args.prefetch,
                      **extra) as ld:
        return loader_read(ld, args.seconds)


def measure_before(args: argparse.Namespace, rev: str) -> dict[str, float]:
    """The loader of revision ``rev``, in a child process pinned like this one."""
    with tempfile.TemporaryDirectory(prefix="loader-before-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "data_pipeline", "storage"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--child", tmp, "--json", out, "--data", args.data,
               "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
               "--global-batch-size", str(args.global_batch_size), "--pack-window", str(args.pack_window),
               "--num-workers", str(args.num_workers), "--prefetch", str(args.prefetch), "--layout", args.layout,
               "--tokenizer", args.tokenizer, "--seconds", str(args.seconds), "--cores", "0"]
        if args.tokenizer_path:
            cmd += ["--tokenizer-path", args.tokenizer_path]
        subprocess.run(cmd, check=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo", help="local dataset dir (index.json + shards)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=16)
    ap.add_argument("--pack-window", type=int, default=1024)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--layout", default="llasa", choices=["llasa", "flattened"])
    ap.add_argument("--tokenizer", default="byte", choices=["byte", "hf"])
    ap.add_argument("--tokenizer-path", default=None)
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement time per phase and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement (median)")
    ap.add_argument("--cores", type=int, default=1, help="pin the process to this many cores (0 = no pinning)")
    ap.add_argument("--before", metavar="REV", default=None, help="also measure the loader of git revision REV")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)  # internal: measure DIR's loader only
    args = ap.parse_args(argv)

    sys.path.insert(0, args.child or str(REPO))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        Path(args.json_out).write_text(json.dumps(measure_loader(args)))
        return 0
    if not Path(args.data, "index.json").exists():
        print(f"no dataset at {args.data} (expected {args.data}/index.json); build one with "
              "`python -m data_pipeline build-demo --out data/demo` or pass --data DIR", file=sys.stderr)
        return 2
    cores = pin_cores(args.cores) if args.cores > 0 else sorted(os.sched_getaffinity(0))
    from data_pipeline import shards

    ds, tok, layout = _setup(args)
    urls = ds.shard_urls()
    entries = [e for u in urls for e in shards.load_shard_index(u).samples]
    tokens_per_pass = sum(layout.length(len(tok.encode(e.text)), e.n_frames, e.n_q) for e in entries)

    runs: dict[str, list[dict]] = {"raw": [], "generic": [], "fast": [], "before": []}
    for _ in range(args.rounds):
        runs["raw"].append(raw_tar_read(urls, tokens_per_pass, args.seconds))
        if args.before:
            runs["before"].append(measure_before(args, args.before))
        runs["generic"].append(measure_loader(args, fast_read=False))
        runs["fast"].append(measure_loader(args))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    print(f"dataset {args.data}: {len(urls)} shards, {len(entries)} samples, {tokens_per_pass} tokens/epoch "
          f"({ds.size_bytes / 1e6:.1f} MB); cores {cores}; seq_len {args.seq_len}, micro {args.micro_batch_size} x "
          f"global {args.global_batch_size}, workers {args.num_workers}; {args.rounds} rounds of {args.seconds:g} s "
          f"each (medians)")
    print("per CPU second of the process (wall-time rates in the last column)")
    print(f"{'path':<44}{'MB/s':>8}{'tokens/s':>13}{'samples/s':>11}{'eff.':>7}{'/ raw':>8}{'tokens/wall s':>15}")
    raw_tps = med("raw", "tokens_per_s")
    print(f"{'raw tar read (tarfile)':<44}{med('raw', 'bytes_per_s') / 1e6:>8.1f}{raw_tps:>13,.0f}"
          f"{med('raw', 'samples_per_s'):>11,.0f}{'-':>7}{1:>8.2f}{med('raw', 'tokens_per_wall_s'):>15,.0f}")
    rows = [("generic", "PackedLoader, fast_read=False"), ("fast", "PackedLoader")]
    if args.before:
        rows.insert(0, ("before", f"PackedLoader at {args.before} (before)"))
    for name, label in rows:
        tps = med(name, "tokens_per_s")
        print(f"{label:<44}{'-':>8}{tps:>13,.0f}{med(name, 'samples_per_s'):>11,.0f}"
              f"{med(name, 'efficiency'):>7.3f}{tps / raw_tps:>8.2f}{med(name, 'tokens_per_wall_s'):>15,.0f}")
    base = "before" if args.before else "generic"
    print(f"PackedLoader / {base}: {med('fast', 'tokens_per_s') / med(base, 'tokens_per_s'):.2f}x tokens/s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": runs, "args": vars(args), "cores": cores}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
