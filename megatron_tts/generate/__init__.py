"""Speech from a trained model: ``python -m megatron_tts.generate`` (model: loading any of a run,
a checkpoint, an exported or released HF model; llama: a KV-cached Llama; sample: the sampler;
audio: framing, sampling, decoding, wav I/O)."""
