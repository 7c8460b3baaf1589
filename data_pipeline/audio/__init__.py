"""Audio in: decode (DALI or soundfile), resample, filters, transcript normalisation, silence splits."""
from .decode import Audio, DecodeError, make_decoder  # noqa: F401
from .filters import REASONS, FilterConfig, audio_problem, text_problem  # noqa: F401
from .resample import resample  # noqa: F401
from .split import split_at_silences  # noqa: F401
from .text import load_normalizer, normalize_text  # noqa: F401
