"""Hugging Face in and out: ``train.init_from=hf:DIR`` (importer), ``python -m megatron_tts.hf
export`` (exporter), the extended tokenizer (tokenizer), the name and layout mapping (mapping)."""
