"""``python -m data_pipeline tokenize``: audio corpora -> codec-token shards, on one process,
under torchrun, or as Slurm tasks / array tasks; resumable (rerun the same command).

    python -m data_pipeline tokenize --codec snac --codec-path /models/snac_24khz \\
        --input /data/LibriTTS/train-clean-100 /data/emilia_tars --out s3://bucket/tok/snac [key=value ...]

Settings (key=value): shard_size=1000 (items per work unit = per output shard; tars: one shard
each), min_duration=0.3, max_duration=30, split_long=false, min_segment=1, max_clipped_fraction=0.001,
min_sample_rate=8000, require_text=true, text_normalizer=pkg.mod:func, language=, decoder=auto|dali|soundfile,
device=auto|cpu|cuda, precision=auto|fp32|bf16, batch_seconds=auto|SECONDS, max_batch=64, window=64,
name=DATASET, provenance=true, progress=true, rank=, world_size=, codec.OPTION=VALUE (snac: -;
encodec: bandwidth; dac: n_q; xcodec2: semantic_path; mel-kmeans: griffin_lim_iters).
Exit codes: 0 done (this worker's units), 1 crash, 3 bad input or settings, 75 stopped by a signal.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import fields
from typing import Any, Sequence

from storage import fs
from storage.fs import FsError

from ..audio import REASONS, FilterConfig, load_normalizer, make_decoder
from ..codecs import CODECS, CodecError, load_codec
from ..shards import ShardError, finalize_dataset
from .plan import (PLAN_FILE, SUMMARY_FILE, build_plan, check_or_write_plan, done_units, report_name,
                   worker_identity)
from .readers import InputError, ListedSource, TarSource, open_source
from .worker import Settings, StopFlag, Stopped, UnitWorker, auto_batch_seconds

EXIT_OK, EXIT_CRASH, EXIT_FATAL, EXIT_REQUEUE = 0, 1, 3, 75
log = logging.getLogger("data_pipeline.tokenize")

_DEFAULTS: dict[str, Any] = {
    "shard_size": 1000, "text_normalizer": None, "language": "", "decoder": "auto", "device": "auto",
    "precision": "auto", "batch_seconds": "auto", "max_batch": 64, "window": 64, "name": None,
    "provenance": True, "progress": True, "rank": None, "world_size": None,
    **{f.name: f.default for f in fields(FilterConfig)},
}


def _parse_value(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"{key}={raw!r}: expected true or false")
    if isinstance(default, int) or key in ("rank", "world_size"):
        try:
            return int(raw)
        except ValueError:
            raise InputError(f"{key}={raw!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise InputError(f"{key}={raw!r}: expected a number") from None
    return raw


def parse_settings(pairs: Sequence[str]) -> tuple[dict, dict]:
    """``key=value`` words -> (settings, codec options); unknown keys are an error naming the valid ones."""
    settings, codec_opts = dict(_DEFAULTS), {}
    for p in pairs:
        key, eq, raw = p.partition("=")
        if not eq:
            raise InputError(f"{p!r}: settings are key=value (valid keys: {', '.join(sorted(_DEFAULTS))}, codec.OPTION)")
        if key.startswith("codec."):
            try:
                codec_opts[key[6:]] = json.loads(raw)
            except ValueError:
                codec_opts[key[6:]] = raw
            continue
        if key not in _DEFAULTS:
            raise InputError(f"unknown setting {key!r}; valid: {', '.join(sorted(_DEFAULTS))}, codec.OPTION")
        settings[key] = _parse_value(key, raw, _DEFAULTS[key])
    return settings, codec_opts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline tokenize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--codec", required=True, help=f"one of {', '.join(CODECS)}")
    p.add_argument("--codec-path", required=True, help="local directory (or mel-kmeans codebook.npy) with the weights")
    p.add_argument("--input", required=True, nargs="+", metavar="SRC",
                   help="folder, manifest (.jsonl/.csv/.tsv), tar / folder of tars / s3:// prefix; NAME=SRC names it")
    p.add_argument("--out", required=True, metavar="DST", help="dataset directory (local or s3://)")
    p.add_argument("settings", nargs="*", metavar="key=value")
    return p


def _abs(url: str) -> str:
    if "=" in url and not url.split("=", 1)[0].count("/") and not url.split("=", 1)[0].count(":"):
        name, path = url.split("=", 1)
        return f"{name}={_abs(path)}"
    return url if fs.is_remote(url) else os.path.abspath(url)


def run(args: argparse.Namespace, out_stream=sys.stderr) -> int:
    settings, codec_opts = parse_settings(args.settings)
    rank, world, local_rank, how = worker_identity(settings["rank"], settings["world_size"])
    device = settings["device"]
    if device == "auto":
        import torch

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    precision = settings["precision"]
    codec = load_codec(args.codec, args.codec_path, device=device,
                       precision="fp32" if precision == "auto" else precision, **codec_opts)
    if precision == "auto" and codec.bf16_ok and str(codec.device).startswith("cuda"):
        codec.precision = "bf16"
    filters = FilterConfig(**{f.name: settings[f.name] for f in fields(FilterConfig)})
    if filters.min_duration <= 0 or filters.max_duration <= filters.min_duration:
        raise InputError(f"need 0 < min_duration < max_duration, got {filters.min_duration} and {filters.max_duration}")
    if settings["batch_seconds"] == "auto":
        batch_seconds = (auto_batch_seconds(codec, filters.max_duration) if str(codec.device).startswith("cuda")
                         else 60.0)
    else:
        batch_seconds = float(settings["batch_seconds"])
    decoder, decoder_desc = make_decoder(settings["decoder"], codec.sample_rate, str(codec.device),
                                         batch_size=settings["window"])
    sources = [open_source(_abs(u)) for u in args.input]
    plan, units, listings = build_plan(sources, settings["shard_size"], codec.codec_info())
    out = args.out if fs.is_remote(args.out) else os.path.abspath(args.out)
    check_or_write_plan(out, plan)
    done = done_units(out)
    mine = [u for u in units if u.id % world == rank]
    todo = [u for u in mine if u.id not in done]
    say = (lambda m: print(m, file=out_stream, flush=True))
    say(f"tokenize: worker {rank}/{world} ({how}); codec {codec.describe()}; decoder {decoder_desc}; "
        f"batch {batch_seconds:g} s; {len(units)} units, {len(mine)} mine, {len(mine) - len(todo)} already done")

    stop = StopFlag()
    stop.install()
    n_items = sum((u.end - u.start) if u.tar is None else 0 for u in todo)
    bar = _progress_bar(settings["progress"], n_items or None, rank, out_stream)
    t0 = time.monotonic()
    totals = {"seconds": 0.0}

    def progress(items: int, seconds: float) -> None:
        totals["seconds"] += seconds
        if bar is not None:
            el = max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{totals['seconds'] / 3600:.3f} h audio, {totals['seconds'] / 3600 / el:.4f} h/s")
            bar.update(items)

    worker = UnitWorker(codec, decoder, out, Settings(filters, load_normalizer(settings["text_normalizer"]),
                                                      batch_seconds, settings["max_batch"], settings["window"],
                                                      settings["provenance"], settings["language"]), stop, progress)
    reports = []
    try:
        for u in todo:
            src = sources[u.source]
            items = (listings[u.source][u.start:u.end] if isinstance(src, ListedSource)
                     else TarSource.items(u.tar, src.name))
            reports.append(worker.run_unit(u, items, src.name))
    except Stopped as e:
        say(f"tokenize: worker {rank}: {e}; {len(reports)} units finished in this run, the rest resume on a rerun")
        return EXIT_REQUEUE
    finally:
        worker.close()
        if bar is not None:
            bar.close()
    say(format_summary(summarize(reports), f"worker {rank}/{world}, this run ({time.monotonic() - t0:.1f} s)"))
    # Whoever finishes last sees every report and indexes the dataset (idempotent if two do).
    all_done = done_units(out)
    if all(u.id in all_done for u in units):
        summary = finalize(out, units, settings["name"], codec.codec_info())
        say(format_summary(summary, f"dataset {out}"))
    else:
        say(f"tokenize: {len(units) - len(all_done & {u.id for u in units})} units still to do by other workers; "
            f"the last worker to finish writes index.json")
    return EXIT_OK


def finalize(out: str, units, name, codec: dict) -> dict:
    reports = [json.loads(fs.read_bytes(fs.join(out, report_name(u.id)))) for u in units]
    summary = summarize(reports)
    if summary["samples"]:
        finalize_dataset(out, name or fs.basename(out.rstrip("/")) or "dataset", codec)
    summary["index"] = fs.join(out, "index.json") if summary["samples"] else None
    fs.write_bytes_atomic(fs.join(out, SUMMARY_FILE), (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    return summary


def summarize(reports: list[dict]) -> dict:
    skipped: Counter = Counter()
    speakers: set = set()
    for r in reports:
        skipped.update(r["skipped"])
        speakers.update(r["speakers"])
    secs = sum(r["seconds"] for r in reports)
    return {"units": len(reports), "items": sum(r["items"] for r in reports),
            "samples": sum(r["samples"] for r in reports), "seconds": secs, "hours": secs / 3600.0,
            "speakers": len(speakers), "tokens": sum(r["tokens"] for r in reports),
            "segments_split": sum(r["segments_split"] for r in reports),
            "skipped": {k: skipped[k] for k in REASONS + ("oom",) if skipped[k]},
            "skipped_total": sum(skipped.values())}


def format_summary(s: dict, what: str) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    return (f"tokenize summary ({what}): {s['hours']:.4f} h in {s['samples']} utterances from {s['items']} items "
            f"({s['units']} units), {s['speakers']} speakers, {s['tokens']} tokens; skipped {s['skipped_total']}: {skipped}")


def _progress_bar(enabled: bool, total, rank: int, stream):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="utt", desc=f"tokenize[{rank}]", position=None, file=stream,
                mininterval=1.0, dynamic_ncols=True)


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parser().parse_args(list(argv))
    try:
        return run(args)
    except (InputError, CodecError, ShardError, FsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL


__all__ = ["main", "run", "parse_settings", "PLAN_FILE", "SUMMARY_FILE"]
