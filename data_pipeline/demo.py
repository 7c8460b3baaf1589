"""Build the embedded demo dataset from real (espeak-ng synthesised) speech.

``python -m data_pipeline build-demo --out DIR`` synthesises a few hundred English sentences
with several espeak-ng voices, fits the built-in ``mel-kmeans`` codec on that audio, encodes
every utterance and writes WebDataset token shards with :func:`data_pipeline.shards.write_dataset`
plus ``codebook.npy``/``codebook.json`` and ``BUILD.json`` (provenance, per-shard sha256 and
token statistics). Same espeak-ng version + same arguments -> byte-identical shards: synthesis
may run in parallel but results are assembled in sentence order and nothing records a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from data_pipeline.codec import MelKMeansCodec, pcm16_to_float
from data_pipeline.sentences import generate_sentences
from data_pipeline.shards import DatasetIndex, read_shard

DEFAULT_VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-us+f3", "en+m3", "en-gb-scotland+f2",
                                   "en-029+m2")
DEFAULT_SENTENCES = 400
DEFAULT_SEED = 1234
DEFAULT_CODEBOOK_SIZE = 256
DEFAULT_SAMPLES_PER_SHARD = 80
SPEED_RANGE_WPM = (150, 185)
DATASET_NAME = "demo"
CODEBOOK_FILE = "codebook.npy"
BUILD_FILE = "BUILD.json"
ESPEAK_MISSING_MESSAGE = (
    "espeak-ng was not found on PATH; the demo dataset is synthesised with it.\n"
    "Install it (Debian/Ubuntu: `apt-get install espeak-ng`, macOS: `brew install espeak-ng`) "
    "and rerun, or use the committed dataset in data/demo instead."
)
# Files a previous build may have left in the output directory; removed before writing so
# a smaller rebuild does not leave stale shards behind.
_OWNED_PATTERNS = ("shard-*.tar", "shard-*.idx.json", "shard-*.report.json", "index.json", BUILD_FILE,
                   CODEBOOK_FILE, "codebook.json", "tokenize_plan.json", "tokenize_report.json")
MANIFEST_FILE = f"{DATASET_NAME}.jsonl"


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is not installed (or not on PATH)."""


@dataclass(frozen=True)
class Utterance:
    """One synthesised sentence."""

    index: int
    text: str
    voice: str
    speed_wpm: int
    sample_rate: int
    audio: np.ndarray  # mono float32 in [-1, 1)
    wav: bytes = b""  # the file espeak-ng wrote (the corpus keeps it byte for byte)


def find_espeak(executable: str = "espeak-ng") -> str:
    """Absolute path of espeak-ng, or :class:`EspeakNotFoundError` with install advice."""
    path = shutil.which(executable)
    if path is None:
        raise EspeakNotFoundError(ESPEAK_MISSING_MESSAGE)
    return path


def espeak_version(espeak: str) -> str:
    """Version string reported by ``espeak-ng --version`` (e.g. ``"1.51"``)."""
    out = subprocess.run([espeak, "--version"], check=True, capture_output=True,
                         text=True).stdout
    m = re.search(r"text-to-speech:\s*(\S+)", out)
    return m.group(1) if m else out.strip()


def speaker_slug(voice: str) -> str:
    """Voice name usable as a key path component (``en-us+f3`` -> ``en-us_f3``)."""
    return re.sub(r"[^A-Za-z0-9-]", "_", voice)


def plan_utterances(n_sentences: int, seed: int,
                    voices: Sequence[str]) -> list[tuple[int, str, str, int]]:
    """``(index, text, voice, speed_wpm)`` per sentence; voices rotate, speeds are seeded."""
    if not voices:
        raise ValueError("need at least one voice")
    texts = generate_sentences(n_sentences, seed)
    rng = random.Random(seed + 1)
    lo, hi = SPEED_RANGE_WPM
    plan = []
    for i, text in enumerate(texts):
        speed = lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)
        plan.append((i, text, voices[i % len(voices)], speed))
    return plan


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise RuntimeError(f"{path}: expected mono 16-bit PCM, got {w.getnchannels()} "
                               f"channels, {8 * w.getsampwidth()}-bit")
        rate = w.getframerate()
        pcm = w.readframes(w.getnframes())
    return pcm16_to_float(pcm), rate


def synthesize(plan: Sequence[tuple[int, str, str, int]], espeak: str,
               workers: int | None = None) -> list[Utterance]:
    """Run espeak-ng once per planned sentence; results come back in plan order."""
    workers = workers or min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="demo-tts-") as tmp:
        def one(item: tuple[int, str, str, int]) -> Utterance:
            index, text, voice, speed = item
            wav = Path(tmp) / f"{index:05d}.wav"
            proc = subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", str(wav),
                                   "--", text], capture_output=True, text=True)
            if proc.returncode != 0 or not wav.is_file():
                raise RuntimeError(f"espeak-ng failed for voice {voice!r} on {text!r}: "
                                   f"{proc.stderr.strip() or proc.returncode}")
            audio, rate = _read_wav(wav)
            if audio.size == 0:
                raise RuntimeError(f"espeak-ng produced no audio for {text!r} ({voice})")
            return Utterance(index, text, voice, speed, rate, audio, wav.read_bytes())

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, plan))


def write_corpus(utts: Sequence[Utterance], corpus: Path, version: str) -> Path:
    """The synthesised speech as a corpus: ``VOICE/NNNNN.wav`` (espeak-ng's own files) and a
    manifest ``demo.jsonl`` (key, path, text, speaker, language and the synthesis settings)."""
    rows = []
    for u in utts:
        rel = f"{speaker_slug(u.voice)}/{u.index:05d}.wav"
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_bytes(u.wav)
        rows.append(json.dumps({"key": rel[:-4], "path": rel, "text": u.text, "speaker": u.voice, "language": "en",
                                "voice": u.voice, "speed_wpm": u.speed_wpm, "tts": f"espeak-ng {version}"}))
    manifest = corpus / MANIFEST_FILE
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def tokenize_corpus(codebook: Path, manifest: Path, out: Path, samples_per_shard: int, verbose: bool) -> int:
    """``python -m data_pipeline tokenize --codec mel-kmeans`` over the corpus, in this process."""
    from data_pipeline.tokenize.cli import main as tokenize_main

    argv = ["--codec", "mel-kmeans", "--codec-path", str(codebook), "--input", str(manifest),
                          "--out", str(out), f"shard_size={samples_per_shard}", f"name={DATASET_NAME}",
                          "provenance=false", "decoder=soundfile", "max_clipped_fraction=1", "min_duration=0.01",
                          "max_duration=3600", "rank=0", "world_size=1", f"progress={str(verbose).lower()}"]
    if verbose:
        print("python -m data_pipeline tokenize " + " ".join(argv))
    return tokenize_main(argv)


def token_entropies(code_seqs: Sequence[np.ndarray], codebook_size: int) -> dict:
    """Plug-in unigram entropy H(c) and bigram conditional entropy H(c_t | c_{t-1}).

    Bigrams are counted within utterances only. Values in nats (and bits for the unigram).
    """
    flat = np.concatenate([np.asarray(c).reshape(-1).astype(np.int64) for c in code_seqs])
    uni = np.bincount(flat, minlength=codebook_size).astype(np.float64)
    p = uni[uni > 0] / uni.sum()
    h_uni = float(-(p * np.log(p)).sum())
    pair_counts = np.zeros(codebook_size * codebook_size, dtype=np.float64)
    for c in code_seqs:
        s = np.asarray(c).reshape(-1).astype(np.int64)
        if s.size > 1:
            pair_counts += np.bincount(s[:-1] * codebook_size + s[1:],
                                       minlength=codebook_size * codebook_size)
    pairs = pair_counts.reshape(codebook_size, codebook_size)
    n_pairs = pairs.sum()
    h_bigram = 0.0
    if n_pairs > 0:
        prev = pairs.sum(axis=1)
        nz = pairs > 0
        joint = pairs[nz] / n_pairs
        cond = pairs[nz] / np.broadcast_to(prev[:, None], pairs.shape)[nz]
        h_bigram = float(-(joint * np.log(cond)).sum())
    return {
        "unigram_entropy_nats": h_uni,
        "unigram_entropy_bits": h_uni / math.log(2.0),
        "bigram_conditional_entropy_nats": h_bigram,
        "bigram_conditional_entropy_bits": h_bigram / math.log(2.0),
        "codes_used": int((uni > 0).sum()),
        "uniform_entropy_nats": math.log(codebook_size),
    }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clean_output(out: Path) -> None:
    for pattern in _OWNED_PATTERNS:
        for p in sorted(out.glob(pattern)):
            p.unlink()


def build_demo(out_dir: str | os.PathLike[str], n_sentences: int = DEFAULT_SENTENCES,
               seed: int = DEFAULT_SEED, codebook_size: int = DEFAULT_CODEBOOK_SIZE,
               samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
               voices: Sequence[str] = DEFAULT_VOICES, workers: int | None = None,
               verbose: bool = True, corpus_dir: str | os.PathLike[str] | None = None) -> dict:
    """Synthesise, fit the codec, encode and write the demo dataset into ``out_dir``.

    Returns the BUILD.json dict. Raises :class:`EspeakNotFoundError` if espeak-ng is missing.
    """
    if n_sentences < 1 or samples_per_shard < 1:
        raise ValueError("n_sentences and samples_per_shard must be >= 1")
    espeak = find_espeak()
    version = espeak_version(espeak)
    plan = plan_utterances(n_sentences, seed, voices)
    log = print if verbose else (lambda *a, **k: None)
    log(f"synthesising {len(plan)} sentences with espeak-ng {version} "
        f"({len(voices)} voices)...")
    utts = synthesize(plan, espeak, workers)
    rates = {u.sample_rate for u in utts}
    if len(rates) != 1:
        raise RuntimeError(f"espeak-ng voices returned mixed sample rates {sorted(rates)}")
    sample_rate = rates.pop()

    codec = MelKMeansCodec(sample_rate=sample_rate, codebook_size=codebook_size, seed=seed)
    seconds = float(sum(u.audio.size for u in utts) / sample_rate)
    log(f"fitting mel-kmeans (K={codebook_size}) on {seconds:.1f} s of audio...")
    codec.fit([u.audio for u in utts])
    info = codec.codec_info()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean_output(out)
    with tempfile.TemporaryDirectory(prefix="demo-corpus-") as tmp:
        corpus = Path(corpus_dir) if corpus_dir is not None else Path(tmp)
        manifest = write_corpus(utts, corpus, version)
        codec.save(corpus / CODEBOOK_FILE)
        # The same path a real corpus takes: python -m data_pipeline tokenize.
        rc = tokenize_corpus(corpus / CODEBOOK_FILE, manifest, out, samples_per_shard, verbose)
        if rc != 0:
            raise RuntimeError(f"tokenize exited {rc}")
    codec.save(out / CODEBOOK_FILE)
    index = DatasetIndex.load(str(out))
    if index.n_samples != len(utts):
        raise RuntimeError(f"tokenize kept {index.n_samples} of {len(utts)} utterances (see {out}/tokenize_report.json)")
    code_seqs = [s.codes[0] for url in index.shard_urls() for s in read_shard(url)]

    n_tokens = int(sum(c.size for c in code_seqs))
    stats = {
        "utterances": len(utts),
        "seconds": seconds,
        "hours": seconds / 3600.0,
        "tokens": n_tokens,
        "min_duration_s": float(min(u.audio.size for u in utts) / sample_rate),
        "max_duration_s": float(max(u.audio.size for u in utts) / sample_rate),
        "speakers": {v: sum(1 for u in utts if u.voice == v) for v in voices},
        **token_entropies(code_seqs, codebook_size),
        "kmeans_final_mse": codec.fit_stats["final_mse_float32_codebook"],
    }
    shard_files = sorted(p.name for p in out.glob("shard-*.tar"))
    shards = {name: _sha256_file(out / name) for name in shard_files}
    sizes = {name: (out / name).stat().st_size for name in shard_files}
    build = {
        "name": DATASET_NAME,
        "command": (f"python -m data_pipeline build-demo --out DIR --sentences {n_sentences} "
                    f"--seed {seed} --codebook-size {codebook_size} "
                    f"--samples-per-shard {samples_per_shard}"
                    + ("" if tuple(voices) == DEFAULT_VOICES
                       else f" --voices {','.join(voices)}")),
        "espeak_ng_version": version,
        "voices": list(voices),
        "speed_range_wpm": list(SPEED_RANGE_WPM),
        "seed": seed,
        "n_sentences": n_sentences,
        "samples_per_shard": samples_per_shard,
        "codec": {**codec.config(), **info},
        "codebook_file": CODEBOOK_FILE,
        "codebook_sha256": info["checkpoint_sha256"],
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "stats": stats,
        "shards": shards,
        "shard_bytes": sizes,
        "total_shard_bytes": int(sum(sizes.values())),
        "n_shards": len(shard_files),
        "index_n_samples": index.n_samples,
    }
    (out / BUILD_FILE).write_text(json.dumps(build, indent=2, sort_keys=True) + "\n")
    log(format_summary(build))
    return build


def format_summary(build: dict) -> str:
    """Short human-readable summary of a BUILD.json dict."""
    s = build["stats"]
    return (f"demo dataset: {s['utterances']} utterances, {s['seconds']:.1f} s "
            f"({s['hours']:.3f} h), {s['tokens']} speech tokens at 50 Hz, "
            f"{build['n_shards']} shards, {build['total_shard_bytes'] / 1e6:.2f} MB\n"
            f"  unigram entropy  H(c)            = {s['unigram_entropy_nats']:.4f} nats "
            f"({s['unigram_entropy_bits']:.4f} bits); {s['codes_used']}/"
            f"{build['codec']['codebook_size']} codes used\n"
            f"  bigram cond. entropy H(c_t|c_t-1) = "
            f"{s['bigram_conditional_entropy_nats']:.4f} nats "
            f"({s['bigram_conditional_entropy_bits']:.4f} bits)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline build-demo",
        description="Synthesise English speech with espeak-ng, fit the mel-kmeans codec on it "
                    "and write the demo token shards.")
    p.add_argument("--out", required=True, help="output dataset directory (e.g. data/demo)")
    p.add_argument("--sentences", type=int, default=DEFAULT_SENTENCES,
                   help=f"number of utterances (default {DEFAULT_SENTENCES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed for sentences, speeds and k-means (default {DEFAULT_SEED})")
    p.add_argument("--codebook-size", type=int, default=DEFAULT_CODEBOOK_SIZE,
                   help=f"k-means codebook size K (default {DEFAULT_CODEBOOK_SIZE})")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                   help=f"utterances per tar shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    p.add_argument("--voices", default=",".join(DEFAULT_VOICES),
                   help="comma-separated espeak-ng voices, one speaker each "
                        f"(default {','.join(DEFAULT_VOICES)})")
    p.add_argument("--corpus", default=None, metavar="DIR",
                   help="keep the synthesised corpus (wavs, demo.jsonl, codebook) in DIR (default: a temp dir)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel espeak-ng processes (does not affect the output)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; accepts an optional leading ``build-demo`` subcommand word."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["build-demo"]:
        args_list = args_list[1:]
    args = build_parser().parse_args(args_list)
    voices = [v.strip() for v in args.voices.split(",") if v.strip()]
    try:
        build_demo(args.out, n_sentences=args.sentences, seed=args.seed,
                   codebook_size=args.codebook_size, samples_per_shard=args.samples_per_shard,
                   voices=voices, workers=args.workers, corpus_dir=args.corpus)
    except EspeakNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
