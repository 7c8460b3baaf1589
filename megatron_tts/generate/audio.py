"""Text in, audio out: prompt framing, sampling, and the codec's decoder (data_pipeline.codecs),
plus a dependency-free wav writer."""

from __future__ import annotations

import os
import wave
from typing import Optional

import numpy as np

from megatron_tts.generate.model import load, prompt_ids, to_codes
from megatron_tts.generate.sample import Sampling, generate


class AudioError(ValueError):
    pass


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM mono."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def read_wav(path: str) -> tuple[np.ndarray, int]:
    try:
        import soundfile as sf

        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        return audio.mean(axis=1), int(sr)
    except ImportError:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                raise AudioError(f"{path}: only 16-bit PCM wav without soundfile") from None
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
            return x.reshape(-1, w.getnchannels()).mean(axis=1), w.getframerate()


def codec_for(lm, name: Optional[str], path: Optional[str]):
    """The codec the model was trained with (its identity recorded in the checkpoint)."""
    from data_pipeline.codecs import CodecError, load_codec

    name = name or lm.codec.get("name")
    path = path or lm.data_dir
    if not name:
        raise AudioError("the checkpoint records no codec: pass --codec NAME --codec-path DIR")
    if not path:
        raise AudioError(f"--codec-path: where are the weights of codec {name}?")
    try:
        codec = load_codec(name, path)
    except CodecError as e:
        raise AudioError(str(e)) from None
    want = lm.codec.get("checkpoint_sha256")
    if want and codec.checkpoint_sha256 != want:
        raise AudioError(f"codec weights at {path} (sha256 {codec.checkpoint_sha256[:12]}) are not the ones the model "
                         f"was trained with ({want[:12]}): its codes would decode to other sounds")
    return codec


def synthesize(args) -> dict:
    lm = load(args.checkpoint, args.device)
    codec = None
    prompt_codes = None
    text = args.text
    if args.prompt_audio:
        codec = codec_for(lm, args.codec, args.codec_path)
        audio, sr = read_wav(args.prompt_audio)
        if sr != codec.sample_rate:
            from data_pipeline.audio.resample import resample

            audio = np.asarray(resample(audio, sr, codec.sample_rate), dtype=np.float32)
        prompt_codes = codec.encode([audio])[0]
        text = f"{args.prompt_text} {args.text}"
    prompt = prompt_ids(lm, text, prompt_codes)
    s = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 max_tokens=args.max_tokens, seed=args.seed, speech_only=not args.any_token)
    ids, stop = generate(lm, prompt, s)
    codes = to_codes(lm, [i for i in ids if i >= lm.vocab.speech_offset])
    out = {"codes": codes, "stop": stop, "frames": codes.shape[1], "seconds": 0.0, "prompt": prompt, "ids": ids}
    if args.out:
        codec = codec or codec_for(lm, args.codec, args.codec_path)
        audio = codec.decode(codes) if codes.shape[1] else np.zeros(0, dtype=np.float32)
        write_wav(args.out, audio, codec.sample_rate)
        out["seconds"] = len(audio) / codec.sample_rate
    return out
