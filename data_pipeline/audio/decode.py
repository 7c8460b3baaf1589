"""Audio bytes -> mono float32 at the codec's sample rate, with a reason for every failure.

Two backends, picked automatically (``decoder=auto``) and named at start:

* ``dali``: NVIDIA DALI (``fn.decoders.audio`` then ``fn.audio_resample``), where the
  ``nvidia-dali-cuda*`` wheel imports; resampling runs on the GPU when one is used. DALI decodes
  wav/flac/ogg/opus but not mp3: those items (and any DALI cannot open) go to soundfile.
* ``soundfile``: libsndfile (wav, flac, ogg/opus, mp3) and the torch resampler of
  :mod:`data_pipeline.audio.resample`.

A DALI pipeline that hits a bad item is no longer usable ("Current pipeline object is no longer
valid"): the batch is then redone item by item on a fresh pipeline, so one bad file costs one
rebuild and never its neighbours.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .resample import resample


class DecodeError(Exception):
    """An item cannot become audio; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Audio:
    samples: np.ndarray  # mono float32 at the target rate
    source_rate: int
    channels: int
    source_samples: int  # per channel, at source_rate
    clipped_fraction: float  # of source samples at |x| >= CLIP_LEVEL
    decoder: str


CLIP_LEVEL = 0.999
_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"FORM", b"RF64", b".snd", b"caff")


def sniff(data: bytes) -> str | None:
    """A reason when ``data`` cannot be audio: empty, or no known container/stream header."""
    if len(data) == 0:
        return "empty_file"
    head = data[:4]
    if head in _MAGIC or head[:3] == b"ID3":
        return None
    if len(data) >= 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0:  # MPEG audio frame sync
        return None
    return "not_audio"


def _finish(x: np.ndarray, sr: int, target: int, channels: int, decoder: str) -> Audio:
    x = np.asarray(x, dtype=np.float32)
    mono = x.mean(axis=1) if x.ndim == 2 else x
    clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL)) if x.size else 0.0
    out = resample(mono, sr, target) if sr != target else mono
    return Audio(np.ascontiguousarray(out, dtype=np.float32), int(sr), channels, int(mono.shape[0]), clipped, decoder)


class SoundfileDecoder:
    name = "soundfile"

    def __init__(self, target_rate: int) -> None:
        import soundfile  # noqa: F401  (fail at start, not per file)

        self.target_rate = target_rate

    def probe(self, data: bytes):
        import soundfile as sf

        return sf.info(io.BytesIO(data))

    def decode_one(self, data: bytes) -> Audio:
        import soundfile as sf

        reason = sniff(data)
        if reason:
            raise DecodeError(reason)
        try:
            info = sf.info(io.BytesIO(data))
            x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile errors are RuntimeError/LibsndfileError/TypeError
            raise DecodeError("decode_error", f"{type(e).__name__}: {e}") from None
        check_complete(info, x.shape[0])
        return _finish(x, sr, self.target_rate, x.shape[1], self.name)

    def decode(self, items: Sequence[bytes]) -> list[Audio | DecodeError]:
        out: list[Audio | DecodeError] = []
        for data in items:
            try:
                out.append(self.decode_one(data))
            except DecodeError as e:
                out.append(e)
        return out


def check_complete(info, n_read: int) -> None:
    """A file that ends before its header's sample count is truncated (libsndfile returns what it
    could read without an error). mp3 headers only estimate the count (VBR, padding), so a shortfall
    there counts from more than a frame's worth (1152 samples) plus 2%."""
    declared = int(getattr(info, "frames", 0) or 0)
    if declared <= 0:
        return
    fmt = str(getattr(info, "format", "")).upper()
    slack = 1152 + declared // 50 if fmt == "MP3" else 0
    if n_read + slack < declared:
        raise DecodeError("incomplete", f"{n_read} of {declared} samples decoded (truncated or corrupt)")


class DaliDecoder:
    name = "dali"

    def __init__(self, target_rate: int, device_id: int | None = None, batch_size: int = 32, threads: int = 2) -> None:
        import nvidia.dali  # noqa: F401

        self.target_rate = target_rate
        self.device_id = device_id  # None: CPU only; an int: resample on that GPU
        self.batch_size = batch_size
        self.threads = threads
        self.fallback = SoundfileDecoder(target_rate)
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            audio, rate = fn.decoders.audio(enc, downmix=False, dtype=types.FLOAT)
            mono = fn.reductions.mean(audio, axes=[1])
            src = mono.gpu() if gpu else mono
            res = fn.audio_resample(src, in_rate=rate, out_rate=float(self.target_rate), dtype=types.FLOAT)
            return audio, rate, res

        p = pipe()
        p.build()
        return p

    def _run(self, items: list[bytes]):
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("enc", [np.frombuffer(d, dtype=np.uint8) for d in items])
        audio, rate, res = self._pipe.run()
        if self.device_id is not None:
            res = res.as_cpu()
        return [(np.array(audio[i]), float(np.array(rate[i])), np.array(res[i])) for i in range(len(items))]

    def _wrap(self, data: bytes, raw) -> Audio:
        audio, rate, res = raw
        x = audio if audio.ndim == 2 else audio[:, None]
        clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL)) if x.size else 0.0
        return Audio(np.ascontiguousarray(res.reshape(-1), dtype=np.float32), int(round(rate)), int(x.shape[1]),
                     int(x.shape[0]), clipped, self.name)

    def decode(self, items: Sequence[bytes]) -> list[Audio | DecodeError]:
        out: list[Audio | DecodeError | None] = [None] * len(items)
        todo = []
        for i, data in enumerate(items):
            reason = sniff(data)
            if reason:
                out[i] = DecodeError(reason)
            elif data[:3] == b"ID3" or data[0] == 0xFF:  # mp3: DALI has no decoder for it
                out[i] = self._soundfile(data)
            else:
                todo.append(i)
        for lo in range(0, len(todo), self.batch_size):
            chunk = todo[lo:lo + self.batch_size]
            try:
                results = self._run([items[i] for i in chunk])
            except RuntimeError:
                self._pipe = None  # unusable after an error: redo one by one
                results = []
                for i in chunk:
                    try:
                        results.append(self._run([items[i]])[0])
                    except RuntimeError:
                        self._pipe = None
                        results.append(None)
            for i, raw in zip(chunk, results):
                out[i] = self._soundfile(items[i]) if raw is None else self._checked(items[i], raw)
        return out  # type: ignore[return-value]

    def _checked(self, data: bytes, raw) -> Audio | DecodeError:
        try:
            check_complete(self.fallback.probe(data), int(raw[0].shape[0]))
        except DecodeError as e:
            return e
        except Exception:
            pass  # a header libsndfile cannot parse: trust DALI
        return self._wrap(data, raw)

    def _soundfile(self, data: bytes) -> Audio | DecodeError:
        try:
            return self.fallback.decode_one(data)
        except DecodeError as e:
            return e


def dali_available() -> str | None:
    """None when DALI imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # ImportError, or a broken wheel
        return f"{type(e).__name__}: {e}"
    return None


def make_decoder(kind: str, target_rate: int, device: str = "cpu", batch_size: int = 32):
    """``auto`` (DALI where it imports, else soundfile), ``dali`` or ``soundfile``; returns
    (decoder, a one-line description of the choice)."""
    kind = (kind or "auto").lower()
    if kind not in ("auto", "dali", "soundfile"):
        raise ValueError(f"decoder={kind!r}: choose auto, dali or soundfile")
    if kind in ("auto", "dali"):
        why = dali_available()
        if why is None:
            dev = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device == "cuda" else None)
            where = "CPU decode + GPU resample" if dev is not None else "CPU"
            return DaliDecoder(target_rate, dev, batch_size), f"dali ({where}; mp3 via soundfile)"
        if kind == "dali":
            raise ValueError(f"decoder=dali but NVIDIA DALI does not import ({why}); pip install '.[dali]'")
        return SoundfileDecoder(target_rate), f"soundfile (DALI not importable: {why.splitlines()[0][:80]})"
    return SoundfileDecoder(target_rate), "soundfile (chosen)"
