"""Packed-loader throughput against a raw sequential tar read, on one CPU core.

    python bench/loader_throughput.py [--data data/demo] [--seq-len 2048] [--seconds 5]

Both measurements run in this process, pinned to one core (``--cores 1``), over the
same shards:

* raw tar: every shard read front to back with ``tarfile`` (members read, nothing
  decoded); tokens/s counts the layout tokens of the samples passed;
* loader: ``PackedLoader.next_step()`` with ``num_workers=1`` (planning, range reads,
  npy parsing, tokenising, layout, packing, labels/masks and the [B,1,S,S]
  attention mask included); tokens/s counts real (non-pad) tokens delivered.

A small dataset is repeated (epochs) until ``--seconds`` have elapsed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import shards  # noqa: E402
from data_pipeline.layouts import VocabLayout, build_layout  # noqa: E402
from data_pipeline.loader import PackedLoader  # noqa: E402
from data_pipeline.tokenizer import build_tokenizer  # noqa: E402


def pin_cores(n: int) -> list[int]:
    """Restrict this process (all threads) to its first ``n`` allowed cores."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:n]
    os.sched_setaffinity(0, chosen)
    return chosen


def raw_tar_read(shard_urls: list[str], tokens_per_pass: int, seconds: float) -> dict[str, float]:
    """Read every member of every shard sequentially with tarfile until ``seconds`` pass."""
    n_bytes = n_passes = n_members = 0
    t0 = time.perf_counter()
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
    file_bytes = n_passes * sum(os.path.getsize(u) for u in shard_urls)
    return {
        "seconds": elapsed,
        "passes": n_passes,
        "bytes_per_s": file_bytes / elapsed,
        "payload_bytes_per_s": n_bytes / elapsed,
        "tokens_per_s": n_passes * tokens_per_pass / elapsed,
        "samples_per_s": n_members / len(shards.MEMBER_EXTS) / elapsed,
    }


def loader_read(loader: PackedLoader, seconds: float) -> dict[str, float]:
    loader.next_step()  # warm-up: first window plan, thread start
    tokens = rows = docs = 0
    t0 = time.perf_counter()
    while True:
        for b in loader.next_step():
            tokens += b.n_tokens
            rows += b.tokens.shape[0]
            docs += sum(len(k) for k in b.sample_keys)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return {
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "padded_tokens_per_s": rows * loader.seq_len / elapsed,
        "samples_per_s": docs / elapsed,
        "packs_per_s": rows / elapsed,
        "efficiency": tokens / (rows * loader.seq_len),
    }


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
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement time per phase")
    ap.add_argument("--cores", type=int, default=1, help="pin the process to this many cores (0 = no pinning)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.data, shards.INDEX_FILENAME).exists():
        print(f"no dataset at {args.data} (expected {args.data}/index.json); build one with "
              "`python -m data_pipeline build-demo --out data/demo` or pass --data DIR", file=sys.stderr)
        return 2
    cores = pin_cores(args.cores) if args.cores > 0 else sorted(os.sched_getaffinity(0))

    ds = shards.DatasetIndex.load(args.data)
    tok = build_tokenizer(args.tokenizer, args.tokenizer_path)
    n_q = int(ds.codec["n_q"])
    vocab = VocabLayout(text_vocab_size=tok.vocab_size, codebook_size=int(ds.codec["codebook_size"]),
                        n_codebooks=n_q if args.layout == "flattened" else 1)
    layout = build_layout(args.layout, vocab)
    urls = ds.shard_urls()
    entries = [e for u in urls for e in shards.load_shard_index(u).samples]
    tokens_per_pass = sum(layout.length(len(tok.encode(e.text)), e.n_frames, e.n_q) for e in entries)

    raw = raw_tar_read(urls, tokens_per_pass, args.seconds)
    with PackedLoader([args.data], layout=layout, tokenizer=tok, seq_len=args.seq_len,
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                      pack_window=args.pack_window, num_workers=args.num_workers, prefetch=args.prefetch) as ld:
        packed = loader_read(ld, args.seconds)
        epochs = ld.stats["epoch"]

    print(f"dataset {args.data}: {len(urls)} shards, {len(entries)} samples, {tokens_per_pass} tokens/epoch "
          f"({ds.size_bytes / 1e6:.1f} MB); cores {cores}; seq_len {args.seq_len}, "
          f"micro {args.micro_batch_size} x global {args.global_batch_size}, workers {args.num_workers}, "
          f"{epochs} loader epochs in {packed['seconds']:.1f} s")
    print(f"{'path':<28}{'MB/s':>10}{'tokens/s':>14}{'samples/s':>12}{'efficiency':>12}")
    print(f"{'raw tar read (tarfile)':<28}{raw['bytes_per_s'] / 1e6:>10.1f}{raw['tokens_per_s']:>14,.0f}"
          f"{raw['samples_per_s']:>12,.0f}{'-':>12}")
    print(f"{'PackedLoader (packed)':<28}{'-':>10}{packed['tokens_per_s']:>14,.0f}"
          f"{packed['samples_per_s']:>12,.0f}{packed['efficiency']:>12.3f}")
    print(f"loader / raw tokens/s: {packed['tokens_per_s'] / raw['tokens_per_s']:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"raw_tar": raw, "loader": packed, "args": vars(args),
                                                   "cores": cores}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
