"""Pretraining: ``build`` assembles a run, ``step`` is one optimizer step with typed statistics,
``hooks`` are the loop's side concerns, ``loop`` is the loop (``run_training``)."""

from megatron_tts.train.loop import run_training  # noqa: F401
