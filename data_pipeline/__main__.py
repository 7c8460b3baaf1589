"""``python -m data_pipeline`` — inspect / index token shards, build the demo set.

    python -m data_pipeline inspect PATH [--json] [--verify] [--max-shards N]
    python -m data_pipeline index SHARD... [--dataset DIR] [--name NAME] [--codec-json JSON]
                                  [--text-tokenizer byte|hf --tokenizer-path PATH]
    python -m data_pipeline index --dataset DIR --compact-only [--text-tokenizer hf --tokenizer-path PATH]
    python -m data_pipeline write MANIFEST.jsonl --out DIR (--codec-json JSON | --codec-from DATASET)
                                  [--name NAME] [--samples-per-shard N]
    python -m data_pipeline build-demo ...        (data_pipeline.demo.main)

``index --dataset`` writes DIR/index.json and DIR/index.cidx, the compact index the loader reads
(``--compact-only``: only index.cidx, from the existing index.json and sidecars, no tar scanned);
``--text-tokenizer`` adds that tokenizer's token counts to it (the byte tokenizer's are always there).

``write`` turns codes already computed elsewhere into a dataset: one JSON line per sample,
``{"key": "corpus/spk/utt", "codes": "utt.npy" or [[...]], "text": "...", "meta": {...}}``
(a relative .npy path is taken from the manifest's directory; codes are [n_q, T] raw codec ids).

PATH may be a shard tar, its ``.idx.json`` sidecar, a dataset dir or its
``index.json``, local or remote (s3://...).

Exit codes: 0 ok, 1 a verification mismatch (sha256/size/sidecar), 2 missing
or unreadable input (one-line error on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from storage import fs
from storage.fs import FsError
from .compact_index import CompactIndexWriter, write_for_dataset
from .shards import (
    INDEX_FILENAME,
    SIDECAR_SUFFIX,
    DatasetIndex,
    ShardError,
    ShardIndex,
    Sample,
    ShardSummary,
    build_shard_index,
    index_path_for,
    load_shard_index,
    write_dataset,
)

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
_FIRST_KEYS = 5
_TOP = 5


class CliError(Exception):
    """Bad input reported as a one-line error with exit code 2."""


# --------------------------------------------------------------------------- formatting


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _codec_line(codec: dict) -> str:
    return (
        f"{codec.get('name')} v{codec.get('version')} sr={codec.get('sample_rate')} "
        f"frame_rate={codec.get('frame_rate')} n_q={codec.get('n_q')} codebook={codec.get('codebook_size')}"
    )


def _top(counter: Counter, n: int = _TOP) -> str:
    items = [f"{k or '<none>'}={v}" for k, v in counter.most_common(n)]
    more = len(counter) - n
    return ", ".join(items) + (f", ... (+{more})" if more > 0 else "")


# --------------------------------------------------------------------------- inspect: shard


def _shard_url_for(path: str) -> str:
    if path.endswith(SIDECAR_SUFFIX):
        return path[: -len(SIDECAR_SUFFIX)] + ".tar"
    return path


def _compare_sidecar(built: ShardIndex, side: ShardIndex) -> list[str]:
    problems = []
    if side.sha256 != built.sha256:
        problems.append(f"sha256 {side.sha256[:16]}... in sidecar != {built.sha256[:16]}... of tar")
    if side.size_bytes != built.size_bytes:
        problems.append(f"size {side.size_bytes} in sidecar != {built.size_bytes} of tar")
    if side.codec != built.codec:
        problems.append("codec differs")
    if [(e.key, e.offset, e.length) for e in side.samples] != [
        (e.key, e.offset, e.length) for e in built.samples
    ]:
        problems.append("sample keys/offsets differ")
    return problems


def inspect_shard(url: str) -> dict[str, Any]:
    """Full scan of one shard (structure + sha256) and a sidecar check."""
    built = build_shard_index(url)
    sidecar_url = index_path_for(url)
    if fs.exists(sidecar_url):
        try:
            problems = _compare_sidecar(built, load_shard_index(url))
            sidecar = {"url": sidecar_url, "status": "ok" if not problems else "mismatch", "problems": problems}
        except ShardError as e:
            sidecar = {"url": sidecar_url, "status": "corrupt", "problems": [str(e)]}
    else:
        sidecar = {"url": sidecar_url, "status": "absent", "problems": []}
    frames = [e.n_frames for e in built.samples]
    return {
        "kind": "shard",
        "path": url,
        "size_bytes": built.size_bytes,
        "sha256": built.sha256,
        "sidecar": sidecar,
        "codec": built.codec,
        "n_samples": built.n_samples,
        "n_frames": built.n_frames,
        "seconds": built.seconds,
        "hours": built.seconds / 3600.0,
        "text_chars": built.text_chars,
        "speakers": dict(Counter(e.speaker for e in built.samples).most_common()),
        "languages": dict(Counter(e.language for e in built.samples).most_common()),
        "n_frames_min": min(frames),
        "n_frames_mean": statistics.fmean(frames),
        "n_frames_max": max(frames),
        "first_keys": [e.key for e in built.samples[:_FIRST_KEYS]],
    }


def _print_shard(r: dict[str, Any]) -> None:
    sc = r["sidecar"]
    if sc["status"] == "ok":
        check = "ok (matches sidecar)"
    elif sc["status"] == "absent":
        check = "no sidecar to verify against"
    else:
        check = f"{sc['status'].upper()}: " + "; ".join(sc["problems"])
    speakers, languages = Counter(r["speakers"]), Counter(r["languages"])
    lines = [
        f"path:       {r['path']}",
        f"size:       {_human_bytes(r['size_bytes'])} ({r['size_bytes']} bytes)",
        f"sha256:     {r['sha256']}  [{check}]",
        f"codec:      {_codec_line(r['codec'])}",
        f"samples:    {r['n_samples']}",
        f"frames:     {r['n_frames']}",
        f"seconds:    {r['seconds']:.2f} ({r['hours']:.4f} h)",
        f"text chars: {r['text_chars']}",
        f"speakers:   {len(speakers)} ({_top(speakers)})",
        f"languages:  {len(languages)} ({_top(languages)})",
        f"n_frames:   min {r['n_frames_min']} / mean {r['n_frames_mean']:.1f} / max {r['n_frames_max']}",
        f"first keys: {', '.join(r['first_keys'])}",
    ]
    print("\n".join(lines))


# --------------------------------------------------------------------------- inspect: dataset


def _verify_dataset(ds: DatasetIndex) -> list[dict[str, Any]]:
    rows = []
    for s, url, idx_url in zip(ds.shards, ds.shard_urls(), ds.index_urls()):
        problems = []
        if not fs.exists(url):
            problems.append("tar missing")
        else:
            actual = fs.size(url)
            if actual != s.size_bytes:
                problems.append(f"size {actual} != {s.size_bytes}")
            elif fs.sha256(url) != s.sha256:
                problems.append("sha256 mismatch")
        if not fs.exists(idx_url):
            problems.append("sidecar missing")
        rows.append({"path": s.path, "status": "ok" if not problems else "mismatch", "problems": problems})
    return rows


def _compact_status(ds: DatasetIndex) -> dict[str, Any]:
    """Whether the loader will read DIR/index.cidx: absent, corrupt, stale (index.json changed
    since) or ok, with what it holds."""
    from .compact_index import FILENAME, CompactIndex, CompactIndexError

    url = fs.join(ds.base_url, FILENAME)
    if not fs.exists(url):
        return {"url": url, "status": "absent"}
    try:
        ix = CompactIndex.open(ds.base_url)
    except (CompactIndexError, FsError) as e:
        return {"url": url, "status": "corrupt", "problem": str(e)}
    raw = fs.read_bytes(fs.join(ds.base_url, INDEX_FILENAME))
    ok = ix.index_json is None or (ix.index_json.get("size") == len(raw)
                                   and ix.index_json.get("sha256") == hashlib.sha256(raw).hexdigest())
    ok = ok and ix.shard_sizes.tolist() == [s.n_samples for s in ds.shards]
    out = {"url": url, "status": "ok" if ok else "stale", "bytes": fs.size(url), "n_samples": ix.n_samples,
           "tokenizers": sorted(ix.tokens)}
    ix.close()
    return out


def inspect_dataset(url: str, verify: bool) -> dict[str, Any]:
    ds = DatasetIndex.load(url)
    out: dict[str, Any] = {
        "kind": "dataset",
        "path": url,
        "name": ds.name,
        "codec": ds.codec,
        "totals": ds.totals(),
        "compact_index": _compact_status(ds),
        "shards": [vars(s).copy() for s in ds.shards],
    }
    if verify:
        out["verify"] = _verify_dataset(ds)
    return out


def _print_dataset(r: dict[str, Any], max_shards: int) -> None:
    t = r["totals"]
    print(f"dataset:    {r['name']}  ({r['path']})")
    print(f"codec:      {_codec_line(r['codec'])}")
    print(
        f"totals:     {t['n_shards']} shards, {t['n_samples']} samples, {t['n_frames']} frames, "
        f"{t['seconds']:.2f} s ({t['hours']:.4f} h), {t['text_chars']} text chars, "
        f"{_human_bytes(t['size_bytes'])}"
    )
    c = r["compact_index"]
    held = f" ({_human_bytes(c['bytes'])}; token counts of {', '.join(c['tokenizers'])})" if "bytes" in c else ""
    fix = "" if c["status"] == "ok" else f"; rebuild: python -m data_pipeline index --dataset {r['path']} --compact-only"
    print(f"compact:    {c['status']}{held}{fix}")
    shards: list[dict[str, Any]] = r["shards"]
    status = {v["path"]: v for v in r.get("verify", [])}
    width = max(len(s["path"]) for s in shards)
    print(f"  {'shard':<{width}}  {'samples':>8} {'frames':>10} {'hours':>9} {'size':>10}  sha256")
    head = tail = len(shards)
    if len(shards) > max(max_shards, 1):
        tail = max_shards // 2
        head = max(max_shards - tail, 1)
    for i, s in enumerate(shards):
        if head <= i < len(shards) - tail:
            if i == head:
                print(f"  ... {len(shards) - head - tail} more shards ...")
            continue
        v = status.get(s["path"])
        flag = "" if v is None else ("  ok" if v["status"] == "ok" else "  " + "; ".join(v["problems"]))
        print(
            f"  {s['path']:<{width}}  {s['n_samples']:>8} {s['n_frames']:>10} {s['seconds'] / 3600:>9.4f} "
            f"{_human_bytes(s['size_bytes']):>10}  {s['sha256'][:12]}{flag}"
        )
    bad = [v for v in r.get("verify", []) if v["status"] != "ok"]
    if "verify" in r:
        print(f"verify:     {len(r['verify']) - len(bad)}/{len(r['verify'])} shards ok")


# --------------------------------------------------------------------------- commands


def _classify(path: str) -> tuple[str, str]:
    """('shard', tar url) or ('dataset', dir/index url)."""
    if path.endswith(SIDECAR_SUFFIX) or path.endswith(".tar"):
        return "shard", _shard_url_for(path)
    if path.endswith(".json"):
        return "dataset", path
    if fs.exists(fs.join(path, INDEX_FILENAME)):
        return "dataset", path
    if not fs.exists(path):
        raise FsError(path, "no such file or directory")
    if fs.isdir(path):
        raise CliError(f"{path}: directory has no {INDEX_FILENAME} (not a dataset dir)")
    return "shard", path


def cmd_inspect(args: argparse.Namespace) -> int:
    kind, url = _classify(args.path)
    if kind == "shard":
        report = inspect_shard(url)
        failed = report["sidecar"]["status"] not in ("ok", "absent")
    else:
        report = inspect_dataset(url, args.verify)
        failed = any(v["status"] != "ok" for v in report.get("verify", []))
        failed |= args.verify and report["compact_index"]["status"] in ("corrupt", "stale")
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    elif kind == "shard":
        _print_shard(report)
    else:
        _print_dataset(report, args.max_shards)
    return EXIT_MISMATCH if failed else EXIT_OK


def _relative_to(url: str, base: str) -> str:
    if fs.is_remote(url) != fs.is_remote(base):
        raise CliError(f"{url} is not inside dataset dir {base}")
    if fs.is_remote(url):
        prefix = base.rstrip("/") + "/"
        if not url.startswith(prefix):
            raise CliError(f"{url} is not inside dataset dir {base}")
        return url[len(prefix):]
    rel = os.path.relpath(fs.local_path(url), fs.local_path(base))
    if rel.startswith(".."):
        raise CliError(f"{url} is not inside dataset dir {base}")
    return rel.replace(os.sep, "/")


def _index_tokenizers(args: argparse.Namespace) -> list:
    if not args.text_tokenizer:
        if args.tokenizer_path:
            raise CliError("index: --tokenizer-path needs --text-tokenizer hf")
        return []
    from .tokenizer import build_tokenizer  # lazy: the hf tokenizer pulls in `tokenizers`

    return [build_tokenizer(args.text_tokenizer, args.tokenizer_path)]


def _compact_only(args: argparse.Namespace, tokenizers: list) -> int:
    if not args.dataset or args.shards:
        raise CliError("index --compact-only: give --dataset DIR and no SHARD paths (it reads the sidecars there)")
    ds = DatasetIndex.load(args.dataset)
    raw = fs.read_bytes(fs.join(ds.base_url, INDEX_FILENAME))
    sides = ((s.path, load_shard_index(u)) for s, u in zip(ds.shards, ds.shard_urls()))
    url = write_for_dataset(ds.base_url, ds.name, ds.codec, sides, raw, tokenizers)
    print(f"{url}: {len(ds.shards)} shards, {ds.n_samples} samples, {_human_bytes(fs.size(url))}")
    return EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    tokenizers = _index_tokenizers(args)
    if args.compact_only:
        return _compact_only(args, tokenizers)
    if tokenizers and not args.dataset:
        raise CliError("index: --text-tokenizer goes with --dataset (the token counts live in DIR/index.cidx)")
    shards: list[str] = list(args.shards)
    if not shards:
        if not args.dataset:
            raise CliError("index: give SHARD paths and/or --dataset DIR")
        shards = [u for u in fs.listdir(args.dataset) if u.endswith(".tar")]
        if not shards:
            raise CliError(f"{args.dataset}: no .tar files")
    if args.dataset:  # fail before writing any sidecar
        for url in shards:
            _relative_to(url, args.dataset)
    codec = json.loads(args.codec_json) if args.codec_json else None
    built: list[tuple[str, ShardIndex]] = []
    for url in shards:
        idx = build_shard_index(url, codec)
        fs.write_bytes_atomic(index_path_for(url), idx.to_json().encode("utf-8"))
        print(f"{index_path_for(url)}: {idx.n_samples} samples, {idx.n_frames} frames, {_human_bytes(idx.size_bytes)}")
        built.append((url, idx))
    if args.dataset:
        codecs = {json.dumps(idx.codec, sort_keys=True) for _, idx in built}
        if len(codecs) > 1:
            raise CliError(f"shards use {len(codecs)} different codecs; a dataset needs one")
        summaries = [
            ShardSummary.from_index(_relative_to(u, args.dataset), _relative_to(index_path_for(u), args.dataset), idx)
            for u, idx in built
        ]
        name = args.name or fs.basename(args.dataset.rstrip("/")) or "dataset"
        ds = DatasetIndex(name=name, codec=built[0][1].codec, shards=summaries)
        print(f"{ds.save(args.dataset)}: {len(summaries)} shards, {ds.n_samples} samples, {ds.seconds / 3600:.4f} h")
        compact = CompactIndexWriter(tokenizers)
        try:
            for summary, (_, idx) in zip(summaries, built):
                compact.add_shard(summary.path, idx, n_q=ds.codec.get("n_q"))
        except BaseException:
            compact.close()
            raise
        url = compact.save(args.dataset, ds.name, ds.codec, ds.to_json().encode("utf-8"))
        print(f"{url}: the compact index ({_human_bytes(fs.size(url))})")
    return EXIT_OK


def _manifest_samples(path: str) -> Any:
    import numpy as np

    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                codes = row["codes"]
                if isinstance(codes, str):
                    codes = np.load(codes if os.path.isabs(codes) else os.path.join(base, codes), allow_pickle=False)
                codes = np.asarray(codes)
                if codes.ndim == 1:
                    codes = codes[None, :]
                yield Sample(key=row["key"], codes=codes, text=row.get("text", ""), meta=row.get("meta") or {})
            except (KeyError, ValueError, TypeError, OSError) as e:
                raise CliError(f"{path}:{n}: {type(e).__name__}: {e} (want key, codes, text[, meta])") from None


def cmd_write(args: argparse.Namespace) -> int:
    if bool(args.codec_json) == bool(args.codec_from):
        raise CliError("write: give exactly one of --codec-json JSON or --codec-from DATASET")
    codec = json.loads(args.codec_json) if args.codec_json else DatasetIndex.load(args.codec_from).codec
    if fs.exists(fs.join(args.out, INDEX_FILENAME)):
        raise CliError(f"{args.out} already holds a dataset ({INDEX_FILENAME}); write into a new directory")
    name = args.name or fs.basename(args.out.rstrip("/")) or "dataset"
    ds = write_dataset(args.out, _manifest_samples(args.manifest), codec, args.samples_per_shard, name)
    print(f"{fs.join(args.out, INDEX_FILENAME)}: {len(ds.shards)} shards, {ds.n_samples} samples, "
          f"{ds.n_frames} frames, {ds.seconds / 3600:.4f} h")
    return EXIT_OK


def cmd_build_demo(argv: Sequence[str]) -> int:
    from . import demo  # lazy: demo pulls in codec code the other commands do not need

    rc = demo.main(list(argv))
    return 0 if rc is None else int(rc)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("inspect", help="summarise a shard, sidecar, dataset dir or index.json")
    pi.add_argument("path")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.add_argument("--verify", action="store_true", help="dataset: check size and sha256 of every shard")
    pi.add_argument("--max-shards", type=int, default=20, help="dataset: rows shown in the shard table")
    px = sub.add_parser("index", help="(re)build sidecars for shard tars, optionally index.json + index.cidx")
    px.add_argument("shards", nargs="*", help="shard tars (default with --dataset: all *.tar in DIR)")
    px.add_argument("--dataset", metavar="DIR", help="also write DIR/index.json over these shards")
    px.add_argument("--name", help="dataset name (default: basename of DIR)")
    px.add_argument("--codec-json", help="codec dict as JSON, for tars whose metadata lacks one")
    px.add_argument("--compact-only", action="store_true",
                    help="only (re)write DIR/index.cidx from the existing index.json and sidecars (no tar is read)")
    px.add_argument("--text-tokenizer", choices=["byte", "hf"],
                    help="also store this text tokenizer's token counts in index.cidx (the loader then plans "
                         "without tokenizing; byte counts are always stored)")
    px.add_argument("--tokenizer-path", help="--text-tokenizer hf: the local tokenizer.json")
    pw = sub.add_parser("write", help="write a dataset from a JSONL manifest of codes and transcripts")
    pw.add_argument("manifest", help="JSONL: key, codes (.npy path or nested list [n_q][T]), text, meta")
    pw.add_argument("--out", required=True, metavar="DIR", help="the new dataset directory (local or s3://)")
    pw.add_argument("--codec-json", help="the codec dict as JSON (name, version, sample_rate, frame_rate, n_q, "
                                         "codebook_size[, checkpoint_sha256])")
    pw.add_argument("--codec-from", metavar="DATASET", help="take the codec dict of an existing dataset")
    pw.add_argument("--name", help="dataset name (default: basename of DIR)")
    pw.add_argument("--samples-per-shard", type=int, default=1000)
    sub.add_parser("build-demo", help="build the demo dataset (see build-demo --help)", add_help=False)
    sub.add_parser("tokenize", help="audio corpora -> codec-token shards (see tokenize --help)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "build-demo":
            return cmd_build_demo(argv[1:])
        if argv and argv[0] == "tokenize":
            from .tokenize.cli import main as tokenize_main  # lazy: torch and the codecs

            return tokenize_main(argv[1:])
        args = _parser().parse_args(argv)
        if args.cmd == "inspect":
            return cmd_inspect(args)
        if args.cmd == "write":
            return cmd_write(args)
        return cmd_index(args)
    except BrokenPipeError:
        # Reader went away (e.g. `| head`); silence the flush at interpreter exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_MISMATCH
    except (ShardError, FsError, CliError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
