"""Sampler modes (docs/design.md, Sampler modes): who decides each token, and the margin of every decision.

Every decision except `native` is a pure function of the captured logits and of
(seed, step, stream), computed here in numpy, so that it is identical on every backend.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..errors import XBackendError
from .candle import IDENTITY as CANDLE_IDENTITY

MODES = ("native", "portable", "greedy", "forced", "candle")
DEFAULT_SEED = 299792458  # the Rust CLI's default, so runs line up with candle's
_MASK64 = (1 << 64) - 1

# Sampler identity: what decides a token, as data recorded in every trace (`meta.sampler.identity`).
# Two runs "share a sampler" only when algorithm AND rng are equal: then, with the same seed, only
# the logits can make their tokens differ. A backend declares its native sampler's identity
# (`Backend.native_sampler`); the other modes' identities are xbackend's own, listed here, so a new
# mode adds one entry.
SAMPLER_IDENTITIES: dict[str, dict[str, str | None]] = {
    "portable": {"algorithm": "xbackend portable: top-k, temperature, Gumbel-max in float64",
                 "rng": "Philox4x64-10 keyed by (seed, step<<16|stream)"},
    "candle": dict(CANDLE_IDENTITY),  # what candle-mode traces and imported Rust runs record
    "greedy": {"algorithm": "argmax", "rng": None},
    "forced": {"algorithm": "forced: a reference's tokens", "rng": None},
}


def shares_sampler(a: dict | None, b: dict | None) -> bool | None:
    """Do two recorded sampler identities name one algorithm on one RNG stream? None: one is unrecorded."""
    if not a or not b or not a.get("algorithm") or not b.get("algorithm"):
        return None
    return a.get("algorithm") == b.get("algorithm") and a.get("rng") == b.get("rng")


def describe_identity(identity: dict | None) -> str:
    """`algorithm on rng`, or a note that the identity is unknown."""
    if not identity or not identity.get("algorithm"):
        return "an unrecorded sampler"
    return identity["algorithm"] + (f" on {identity['rng']}" if identity.get("rng") else "")


def effective_top_k(top_k: int, vocab: int) -> int:
    """How many tokens a top-k sampler keeps: all of them for top_k <= 0, at most the vocabulary."""
    return int(vocab) if top_k <= 0 else min(int(top_k), int(vocab))


@dataclass(frozen=True)
class SamplingSettings:
    """Temperature and top-k per stream kind; the defaults are PyTorch `LMGen`'s."""

    temp_text: float = 0.7
    top_k_text: int = 25
    temp_audio: float = 0.8
    top_k_audio: int = 250

    def for_stream(self, stream: int) -> tuple[float, int]:
        """(temperature, top_k) for stream index `stream` (0 is text)."""
        return (self.temp_text, self.top_k_text) if stream == 0 else (self.temp_audio, self.top_k_audio)

    def effective(self, vocab: list[int]) -> list[tuple[float, int]]:
        """(temperature, kept tokens) per stream: what decisions actually depend on."""
        return [(float(self.for_stream(i)[0]), effective_top_k(self.for_stream(i)[1], v)) for i, v in enumerate(vocab)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> SamplingSettings:
        """Settings from JSON: unknown keys ignored (newer writers), missing ones at their defaults,
        values of the wrong type refused."""
        out = {}
        for f in fields(cls):
            if data and f.name in data:
                value = data[f.name]
                want = float if f.type in ("float", float) else int
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                        want is int and int(value) != value) or not math.isfinite(value):
                    raise XBackendError(f"Sampling setting {f.name} is {value!r}, not a finite {want.__name__}",
                                        fix="record settings written by xbackend")
                out[f.name] = want(value)
        return cls(**out)

    @classmethod
    def from_meta(cls, meta: dict) -> SamplingSettings:
        """The settings a trace recorded."""
        return cls.from_dict(meta.get("settings"))


RUST_CLI_SETTINGS = SamplingSettings(temp_text=0.8, top_k_text=250, temp_audio=0.8, top_k_audio=250)


def default_settings(mode: str) -> SamplingSettings:
    """The settings a mode runs with unless told otherwise: the Rust CLI's for candle, else LMGen's."""
    return RUST_CLI_SETTINGS if mode == "candle" else SamplingSettings()


@dataclass(frozen=True)
class Decision:
    """A sampled token and its margin in logit units (how much drift could flip it)."""

    token: int
    margin: float


def top_two_gap(scores: np.ndarray, token: int) -> float:
    """Score of `token` minus the best other score (negative when `token` is not the best)."""
    if scores.shape[-1] < 2:
        return math.inf
    others = np.delete(scores, token)
    return float(scores[token] - others.max())


def greedy(logits: np.ndarray) -> Decision:
    token = int(np.argmax(logits))
    return Decision(token, top_two_gap(logits.astype(np.float64), token))


def portable_uniforms(seed: int, step: int, stream: int, n: int) -> np.ndarray:
    """Uniforms in (0, 1) from Philox4x64-10 keyed by (seed, step << 16 | stream).

    Counter-based: the noise of one decision depends on nothing but its key, so every
    backend, process and machine draws the same numbers (53-bit mantissa, centred bins).
    """
    key = np.array([seed & _MASK64, ((step << 16) | stream) & _MASK64], dtype=np.uint64)
    raw = np.random.Philox(key=key).random_raw(n)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def portable(logits: np.ndarray, temp: float, top_k: int, seed: int, step: int, stream: int) -> Decision:
    """Top-k + temperature + Gumbel-max, in float64; margin = winner minus runner-up, in logits."""
    z = logits.astype(np.float64)
    if temp <= 0:
        return greedy(logits)
    z = z / temp
    v = z.shape[-1]
    k = effective_top_k(top_k, v)
    kth = np.partition(z, v - k)[v - k]
    gumbel = -np.log(-np.log(portable_uniforms(seed, step, stream, v)))
    score = np.where(z >= kth, z + gumbel, -np.inf)
    token = int(np.argmax(score))
    return Decision(token, top_two_gap(score, token) * temp)


def sampled_probs(logits: np.ndarray, temp: float, top_k: int) -> np.ndarray:
    """The float32 distribution PyTorch's `sample_token` draws from, zero outside the top k.

    Upstream takes `softmax(logits.float() / temp)` over the whole vocabulary in float32, then
    keeps the top k: a kept token whose tempered logit lies ~104 below the best has float32
    probability exactly 0 (while float64 gives ~1e-45), and that is the token MPS's
    `exponential_` returning -0.0 picks (pytorch#192577). Same dtype, same op order here.
    """
    z = np.asarray(logits, dtype=np.float32)
    if temp <= 0:
        p = np.zeros_like(z)
        p[np.argmax(z)] = 1.0
        return p
    z = z / np.float32(temp)
    e = np.exp(z - z.max())
    p = e / e.sum(dtype=np.float32)
    v = p.shape[-1]
    k = effective_top_k(top_k, v)
    kth = np.partition(p, v - k)[v - k]
    return np.where(p >= kth, p, np.float32(0.0))


@dataclass
class Sampler:
    """Decides tokens for one run. `native` leaves decisions to the backend's own sampler."""

    mode: str
    seed: int
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    forced_tokens: np.ndarray | None = None  # [steps, streams], -1 where the model decides
    forced_from: str | None = None
    dep_q: int | None = None  # audio streams per step (lines candle's audio RNG words up with steps)
    fill: object | None = None  # forced: what decides where the token is -1 (a CandleStreams; None: greedy)

    def __post_init__(self) -> None:
        self._candle = self.fill if self.mode == "forced" else None
        if self.mode == "candle":  # the Rust CLI: text and audio processors seeded with the same seed
            from .candle import CandleStreams

            self._candle = CandleStreams(self.seed, self.seed, self.settings, dep_q=self.dep_q)

    @property
    def native(self) -> bool:
        return self.mode == "native"

    @property
    def host_only(self) -> bool:
        """Decisions no device path reproduces (candle's sampler runs on the host only)."""
        return self._candle is not None

    def decide(self, step: int, stream: int, logits: np.ndarray) -> Decision:
        """Token and margin for a non-native mode; `logits` is a 1-D numpy vector."""
        temp, top_k = self.settings.for_stream(stream)
        if self.mode == "portable":
            return portable(logits, temp, top_k, self.seed, step, stream)
        if self.mode == "forced":
            token = self.forced_token(step, stream)
            if token >= 0:
                return Decision(token, top_two_gap(logits.astype(np.float64), token))
        if self._candle is not None:  # candle mode, or a forced run's unknown token filled by candle's pick
            d = self._candle.decide(step, stream, logits)
            return Decision(d.token, d.logit_margin)
        return greedy(logits)

    def forced_token(self, step: int, stream: int) -> int:
        tokens = self.forced_tokens
        if tokens is None or step >= tokens.shape[0]:
            return -1
        return int(tokens[step, stream])

    def identity(self) -> dict | None:
        """Who decides this run's tokens (None for native: only the backend knows its sampler)."""
        known = SAMPLER_IDENTITIES.get(self.mode)
        return dict(known) if known is not None else None

    def describe(self, native: dict | None = None) -> dict:
        """What goes into a trace's metadata; `native` is the backend's own sampler identity."""
        out = {"mode": self.mode, "seed": self.seed, "identity": native if self.native else self.identity()}
        if self.forced_from:
            out["forced_from"] = self.forced_from
        if self.mode == "portable":
            out["noise"] = "gumbel from Philox4x64-10 keyed by (seed, step<<16|stream), float64"
        if self._candle is not None and self.mode == "candle":
            out.update(self._candle.describe())
        elif self._candle is not None:
            out["fill"] = self._candle.describe()  # forced tokens of -1 were decided by candle's sampler
        return out


def parse_mode(text: str) -> tuple[str, str | None]:
    """Split `forced:PATH` into ("forced", PATH); other modes have no argument."""
    mode, _, arg = text.partition(":")
    mode = mode.strip().lower()
    if mode not in MODES:
        raise XBackendError(
            f"Unknown sampler {text!r}",
            asked="available are native, portable, greedy, candle and forced:PATH (a trace or a codes file)",
            fix="pass e.g. --sampler portable",
        )
    if mode == "forced" and not arg:
        raise XBackendError("The forced sampler needs a source", asked=f"--sampler {text!r}",
                            fix="write forced:PATH, where PATH is a trace directory or a codes file")
    if mode != "forced" and arg:
        raise XBackendError(f"The {mode} sampler takes no argument", asked=f"--sampler {text!r}")
    if arg and "\x00" in arg:
        raise XBackendError(f"The forced sampler's path {arg!r} holds a NUL byte", fix="pass forced:PATH with a real path")
    return mode, arg or None
