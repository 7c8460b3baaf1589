"""Command-line tools print their own lines: the import-time and deprecation warnings of
megatron-core and torch DCP (loading a config, reading a checkpoint on one process) are not theirs."""

from __future__ import annotations

import warnings


def quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch\.distributed)(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
