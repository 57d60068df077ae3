"""xbackend: run Moshi on several backends with the same prompt and seed, and say why outputs differ.

Importing this package loads neither torch nor mlx; backends import them when created.
"""

from .backends import create_backend, load_plugin, register_backend, unregister_backend, wrap_backend
from .backends.base import Backend, Job, StepRecord, StepRecorder
from .samplers.candle import CandleDecision, CandleSampler
from .capture.run import capture
from .codecs import Codec, create_codec, register_codec, unregister_codec, wrap_codec
from .errors import BackendFailed, BackendUnavailable, XBackendError
from .requests import CaptureRequest, CompareRequest
from .samplers import DEFAULT_SEED, Sampler, SamplingSettings
from .spec import BackendSpec, parse_spec
from .store.trace import Trace, TruncatedTraceWarning, load_trace

from .env import __version__

__all__ = [
    "Backend", "BackendFailed", "Codec", "create_codec", "register_codec", "unregister_codec", "wrap_codec", "BackendSpec",
    "BackendUnavailable", "CandleDecision", "CandleSampler", "CaptureRequest", "CompareRequest", "DEFAULT_SEED",
    "Job", "Sampler", "SamplingSettings", "StepRecord", "StepRecorder", "Trace", "TruncatedTraceWarning",
    "XBackendError", "capture", "create_backend", "load_plugin", "load_trace", "parse_spec",
    "register_backend", "unregister_backend", "wrap_backend",
]
