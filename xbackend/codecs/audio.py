"""Generated audio: undelay a trace's audio tokens and decode them with a codec (the reference by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import REFERENCE_CODEC
from .base import SAMPLE_RATE
from ..capture.models import ModelRef, codec_for
from ..capture.prompt import check_codes_range
from ..store.trace import Trace


def generated_codes(model: ModelRef, trace: Trace) -> np.ndarray:
    """Audio codes `[dep_q, frames]` in time order: stream k at step s is frame s - delay_k."""
    delays = model.delays[1:]
    frames = trace.steps - max(delays)
    tokens = trace.tokens[:, 1:]
    return np.stack([tokens[d: d + frames, k] for k, d in enumerate(delays)]).astype(np.int64)


def decode_trace(model: ModelRef, trace: Trace, codec_spec: str = REFERENCE_CODEC) -> np.ndarray:
    """A run's generated audio, 24 kHz mono float32, decoded by `codec_spec` (default: the reference codec)."""
    from . import decode_codes

    codec = codec_for(model, model.dep_q)
    codes = generated_codes(model, trace)
    check_codes_range(codes, int(model.config["card"]), f"Audio tokens of {trace.path}")
    return decode_codes(codec, codes, codec_spec)


def tokens_to_wav(model: ModelRef, trace: Trace, path: Path, codec_spec: str = REFERENCE_CODEC) -> Path:
    """Decode a trace's audio tokens with `codec_spec` (default: the reference codec) to a 16-bit WAV."""
    from ..store.files import write_wav

    write_wav(path, decode_trace(model, trace, codec_spec), SAMPLE_RATE)
    return path
