"""Deciding a resume before anything in the run directory is written.

Every checkpoint records a fingerprint of what its weights mean: the model's shape, the
vocabulary (text size, special tokens, codebooks, the real and padded sizes and the speech id
offset), the sequence layout and the codec identity. A resume whose recipe or data disagree is
refused, naming each field, because megatron would load most of it silently (a vocabulary one
token longer shifts every speech id; a larger codebook loads part of the embedding). Data
changes (seq_len, the datasets, the pack window, the seed of the data order) are a new training
stage: ``train.reset_data=true`` keeps the model, optimizer and schedule and restarts the data
stream; without it they are refused too. New weights of data.sources are not such a change: the
loader continues every source where it was under the new mixture (and logs it).

Where nothing is left to resume from but something was committed before (the run directory's
own record of commits, outside the checkpoint folder it protects), the run stops instead of
starting over from step 1 into a run directory that already has history.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_tts.checkpoint import format as fmt
from megatron_tts.checkpoint.collective import bcast
from megatron_tts.checkpoint.errors import CheckpointError
from megatron_tts.config import Config, padded_vocab_size, real_vocab_size, vocab_layout

log = logging.getLogger("megatron_tts")

RUN_COMMITS = "checkpoint_commits.jsonl"  # in the run directory: what was ever committed


class ResumeError(ValueError):
    """A resume that must not happen as configured (a user error: exit 3, nothing written)."""


@dataclass
class ResumePlan:
    path: Optional[str] = None  # the checkpoint to load; None = start fresh
    step: Optional[int] = None
    reset_data: bool = False  # load model/optimizer/schedule, restart the data stream
    notes: list[str] = field(default_factory=list)


# ---- the fingerprint ----
def fingerprint(cfg: Config, loader) -> dict:
    """What a checkpoint's weights mean (model, vocab, layout, codec) and which data they saw."""
    t = cfg.model.transformer
    vl = vocab_layout(cfg)
    codec = loader.codec_identity() if loader is not None else {}
    return {
        "model": {"num_layers": t.num_layers, "hidden_size": t.hidden_size, "ffn_hidden_size": t.ffn_hidden_size,
                  "num_attention_heads": t.num_attention_heads,
                  "num_query_groups": t.num_query_groups or t.num_attention_heads, "kv_channels": t.kv_channels,
                  "gated_linear_unit": bool(t.gated_linear_unit), "normalization": str(t.normalization),
                  "share_embeddings": cfg.model.share_embeddings, "rotary_base": cfg.model.rotary_base,
                  "rope_scaling": cfg.model.rope_scaling,
                  "rope_scaling_factor": cfg.model.rope_scaling_factor if cfg.model.rope_scaling else None},
        "vocab": {"text_vocab_size": vl.text_vocab_size, "special_tokens": list(vl.special_tokens),
                  "n_codebooks": vl.n_codebooks, "codebook_size": vl.codebook_size,
                  "real": real_vocab_size(cfg), "padded": padded_vocab_size(cfg), "speech_offset": vl.speech_offset},
        "layout": {"name": cfg.model.layout},
        "codec": codec,
    }


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_differences(saved: dict, now: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(now)
    out = []
    for k in sorted(set(a) | set(b)):
        if k.startswith("codec.") and (k not in a or k not in b):
            continue  # a dataset without that codec field: compared where both say
        if a.get(k) != b.get(k):
            av, bv = a.get(k), b.get(k)
            if isinstance(av, list) and isinstance(bv, list) and len(av) != len(bv):
                av, bv = f"{len(av)} entries", f"{len(bv)} entries"
            out.append(f"{k}: checkpoint {av!r}, now {bv!r}")
    return out


def data_differences(saved_loader: dict, loader) -> list[str]:
    """What keeps the data stream from continuing (the loader decides: a change of the weights of
    data.sources is a new mixture, not a difference; see data_pipeline/loader_state.py)."""
    return loader.resume_differences(saved_loader)


# ---- the run directory's own record of commits ----
def record_commit(run_dir: str, step: int, path: str) -> None:
    """Rank 0, after each commit: a line in RUN_DIR/checkpoint_commits.jsonl (best effort)."""
    try:
        with open(os.path.join(run_dir, RUN_COMMITS), "a") as f:
            f.write(json.dumps({"step": step, "path": path, "time": time.time()}) + "\n")
    except OSError as e:
        log.warning("could not record the commit of step %d in %s: %s", step, run_dir, e)


def recorded_commits(run_dir: str) -> list[int]:
    return fmt.ledger_steps(run_dir, RUN_COMMITS)


# ---- the plan ----
def _looks_like_run_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in ("config.yaml", "metrics.jsonl", "checkpoints", RUN_COMMITS))


def _check_resume_path(path: str) -> None:
    """train.resume=PATH: a checkpoint or a checkpoint root, said exactly when it is neither."""
    if not os.path.exists(path):
        raise ResumeError(f"train.resume={path} does not exist; give a checkpoint directory (…/checkpoints/step_X), "
                          "a checkpoint root (…/checkpoints), or train.resume=auto")
    if not os.path.isdir(path):
        raise ResumeError(f"train.resume={path} is a file; give a checkpoint directory or a checkpoint root")
    is_ckpt = os.path.exists(os.path.join(path, fmt.COMMITTED)) or os.path.exists(os.path.join(path, fmt.MANIFEST))
    is_root = bool(fmt.list_checkpoints(path)) or os.path.exists(os.path.join(path, fmt.LEDGER))
    if is_ckpt or is_root:
        return
    if _looks_like_run_dir(path):
        raise ResumeError(f"train.resume={path} is a run directory, not a checkpoint; give "
                          f"{os.path.join(path, 'checkpoints')} (its newest verified checkpoint) or one of its "
                          f"step_X directories, or set train.run_dir={path} train.resume=auto")
    if fmt.step_dir_name(0)[:5] in os.path.basename(path.rstrip("/")):
        raise ResumeError(f"train.resume={path}: no {fmt.COMMITTED} marker (the save never finished); use an "
                          "older checkpoint or train.resume=auto")
    raise ResumeError(f"train.resume={path} holds no checkpoint (no {fmt.COMMITTED} marker, no step_X "
                      "directories); give a checkpoint directory or a checkpoint root")


def plan(cfg: Config, checkpointer, loader, rank0: bool) -> ResumePlan:
    """Collective: which checkpoint this run loads, checked against the recipe and the data."""
    tr = cfg.train
    if tr.resume == "never":
        return ResumePlan(notes=["train.resume=never: starting from scratch"])
    if tr.resume == "auto":
        latest = checkpointer.latest(extra_ledger=os.path.join(tr.run_dir, RUN_COMMITS))
        if latest is None:
            return ResumePlan()
        path = latest[1]
    else:
        error = None
        if rank0:
            try:
                _check_resume_path(tr.resume)
            except ResumeError as e:
                error = str(e)
        error = bcast(error)
        if error:
            raise ResumeError(error)
        path = checkpointer.resolve(tr.resume)
    problem = None
    saved = None
    if rank0:
        try:
            with open(os.path.join(path, fmt.STATE_FILE)) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            problem = f"checkpoint {path}: {fmt.STATE_FILE} unreadable ({e})"
    problem, saved = bcast((problem, saved))
    if problem:
        raise CheckpointError(problem)
    return _judge(cfg, loader, path, saved)


def _judge(cfg: Config, loader, path: str, saved: dict) -> ResumePlan:
    step = int(saved["step"])
    out = ResumePlan(path=path, step=step)
    model = model_differences(saved["fingerprint"], fingerprint(cfg, loader)) if "fingerprint" in saved else []
    if "fingerprint" not in saved:
        out.notes.append(f"checkpoint {path} predates fingerprints: its model and vocabulary are not checked")
    saved_loader = saved.get("components", {}).get("loader")
    data = data_differences(saved_loader, loader) if saved_loader is not None else []
    if model:
        raise ResumeError(
            f"cannot resume from {path} (step {step}): the model it holds does not match this recipe:\n    "
            + "\n    ".join(model) + "\n  Its weights would load silently into the wrong meaning. Restore the "
            "recipe's settings, or start a new run (another train.run_dir, or train.resume=never).")
    if data and not cfg.train.reset_data:
        raise ResumeError(
            f"cannot resume the data stream from {path} (step {step}):\n    " + "\n    ".join(data) +
            "\n  To begin a new training stage with these data and keep the model, optimizer and schedule, "
            "set train.reset_data=true; or restore the old settings.")
    if cfg.train.reset_data and data:
        out.reset_data = True
        out.notes.append(f"train.reset_data=true: model, optimizer and schedule continue from step {step}; the "
                         f"data stream restarts from the beginning ({'; '.join(data)})")
    elif cfg.train.reset_data:
        # Left on across a requeue, it must not restart the stream each time (samples would repeat).
        out.notes.append(f"train.reset_data=true ignored: the data of checkpoint {path} are these data; their "
                         "stream continues where it stopped")
    if step >= cfg.train.steps:
        out.notes.append(f"checkpoint {path} is at step {step} >= train.steps={cfg.train.steps}: nothing to train; "
                         "raise train.steps to continue")
    return out


def archive_history(run_dir: str, ckpt_root: str) -> list[str]:
    """train.resume=never in a run directory with history: move it aside (nothing is deleted or
    overwritten: a new run's step 1 must not land on the old one's)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in (ckpt_root, os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, RUN_COMMITS)):
        if os.path.exists(path):
            base, ext = os.path.splitext(path.rstrip("/"))
            target = f"{base}.archived-{stamp}{ext}"
            os.rename(path, target)
            moved.append(f"{path} -> {target}")
    return moved
