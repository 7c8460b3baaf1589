"""Work units, who does which, and what is already done.

A work unit is one output shard: a slice of ``shard_size`` items of a listed input (folder,
manifest; in listing order), or one input tar. Units are numbered over all inputs in order and
recorded in ``DST/tokenize_plan.json`` on the first run; a rerun must find the same plan (same
inputs, listings, shard size, codec), so a unit always means the same items. Worker ``r`` of ``W``
takes units ``u`` with ``u % W == r``; a unit is done when its report ``shard-UUUUUU.report.json``
exists (written after the shard and its sidecar), so a rerun, under any number of workers, does
exactly the units without a report, and no sample is ever written twice.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

from storage import fs

from .readers import InputError, ListedSource, Source, TarSource

PLAN_FILE = "tokenize_plan.json"
SUMMARY_FILE = "tokenize_report.json"
PLAN_VERSION = 1


def shard_name(unit: int) -> str:
    return f"shard-{unit:06d}.tar"


def report_name(unit: int) -> str:
    return f"shard-{unit:06d}.report.json"


@dataclass
class Unit:
    id: int
    source: int
    tar: Optional[str] = None
    start: int = 0
    end: int = 0


def build_plan(sources: list[Source], shard_size: int, codec: dict) -> tuple[dict, list[Unit], dict]:
    """(plan dict, units, listed items per source index)."""
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    units: list[Unit] = []
    listings: dict = {}
    described = []
    names = set()
    for si, src in enumerate(sources):
        if src.name in names:
            raise InputError(f"two inputs are named {src.name!r}: their keys would collide; name them NAME=PATH")
        names.add(src.name)
        d = src.describe()
        if isinstance(src, ListedSource):
            items = src.items()
            if not items:
                raise InputError(f"{src.url}: no audio files found")
            listings[si] = items
            d["items"] = len(items)
            d["listing_sha256"] = hashlib.sha256("\n".join(i.key for i in items).encode()).hexdigest()
            for lo in range(0, len(items), shard_size):
                units.append(Unit(len(units), si, start=lo, end=min(lo + shard_size, len(items))))
        else:
            assert isinstance(src, TarSource)
            tars = src.tars()
            d["tars"] = [fs.basename(t) for t in tars]
            for t in tars:
                units.append(Unit(len(units), si, tar=t))
        described.append(d)
    ident = {k: codec.get(k) for k in ("name", "version", "sample_rate", "frame_rate", "n_q", "codebook_size",
                                       "checkpoint_sha256")}
    plan = {"version": PLAN_VERSION, "shard_size": shard_size, "codec": ident, "sources": described,
            "units": len(units)}
    return plan, units, listings


def check_or_write_plan(out: str, plan: dict) -> None:
    """First run: write the plan. Later runs: it must be the same (same units, same codec)."""
    url = fs.join(out, PLAN_FILE)
    if fs.exists(url):
        old = json.loads(fs.read_bytes(url))
        if old != plan:
            diffs = [k for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)]
            raise InputError(f"{out} was tokenized from other input or settings ({', '.join(diffs)} differ from "
                             f"{PLAN_FILE}); resume with the same --input, --codec and shard_size, or write to a new --out")
        return
    fs.makedirs(out)
    fs.write_bytes_atomic(url, (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode())


def done_units(out: str) -> set[int]:
    done = set()
    for u in fs.listdir(out) if fs.exists(out) else []:
        b = fs.basename(u)
        if b.startswith("shard-") and b.endswith(".report.json"):
            try:
                done.add(int(b[len("shard-"):-len(".report.json")]))
            except ValueError:
                pass
    return done


def clean_stale_tmp(out: str, unit: int) -> int:
    """Remove temp files a killed writer of ``unit`` left behind (local outputs); their count."""
    if fs.is_remote(out):
        return 0
    d = fs.local_path(out)
    prefixes = (f".{shard_name(unit)}.", f".shard-{unit:06d}.idx.json.", f".{report_name(unit)}.")
    n = 0
    for e in os.listdir(d) if os.path.isdir(d) else []:
        if e.startswith(prefixes) and e.endswith(".tmp"):
            try:
                os.unlink(os.path.join(d, e))
                n += 1
            except FileNotFoundError:
                pass
    return n


def worker_identity(rank: Optional[int] = None, world: Optional[int] = None, env=None) -> tuple[int, int, int, str]:
    """(worker, workers, local rank, where it came from): explicit settings, else torchrun
    (RANK/WORLD_SIZE), else Slurm (array task x tasks of the step), else a single worker."""
    env = os.environ if env is None else env
    if rank is not None or world is not None:
        if rank is None or world is None or not 0 <= rank < world:
            raise InputError(f"rank={rank} world_size={world}: give both, with 0 <= rank < world_size")
        return rank, world, int(env.get("LOCAL_RANK", 0)), "settings"
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
    if "SLURM_JOB_ID" in env:
        procid, ntasks = int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))
        if "SLURM_ARRAY_TASK_ID" in env:
            lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            count = int(env.get("SLURM_ARRAY_TASK_COUNT", int(env.get("SLURM_ARRAY_TASK_MAX", lo)) - lo + 1))
            task = int(env["SLURM_ARRAY_TASK_ID"]) - lo
            return task * ntasks + procid, count * ntasks, int(env.get("SLURM_LOCALID", 0)), "slurm array"
        return procid, ntasks, int(env.get("SLURM_LOCALID", 0)), "slurm"
    return 0, 1, 0, "single process"
