"""`inspect`: what one trace did over time, stream by stream, and where a second trace parted from it.

Per stream: the entropy of the model's distribution at every step, the longest run of one
repeated token, and the earliest n-gram loop (mode collapse: the tokens repeat with a period p
for at least `LOOP_MIN_REPEATS` periods and `LOOP_MIN_SPAN` steps). For the text stream, the
share of padding tokens, and runs and loops made only of padding are ignored (Moshi pads text
most of the time; that is not a collapse).

Entropy is of the softmax of the full vocabulary at temperature 1, in nats: the model's own
distribution, before the sampler's temperature and top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import metrics, words
from ..streams import text_padding_id
from ..store.trace import Trace

LOOP_MIN_REPEATS = 3
LOOP_MIN_SPAN = 12
MAX_PERIOD = 32
AFTER = 10  # tokens shown per stream after a divergence
ENTROPY_TEMPERATURE = 1.0
_BLOCK = 256


@dataclass(frozen=True)
class TokenRun:
    """`length` consecutive steps, from `start`, that all sampled `token`."""

    token: int
    start: int
    length: int


@dataclass(frozen=True)
class Loop:
    """Tokens repeating with period `period` from step `start` for `span` steps; `pattern` is one period."""

    start: int
    period: int
    span: int
    pattern: tuple[int, ...]


def entropy(trace: Trace, stream: str, temperature: float = ENTROPY_TEMPERATURE) -> np.ndarray:
    """Entropy (nats) of softmax(logits / temperature) at every step, read in blocks of steps
    (empty for a token trace, which has no logits)."""
    if not trace.has_logits:
        return np.empty(0, dtype=np.float64)
    rows = trace.logits(stream)
    out = np.empty(trace.steps, dtype=np.float64)
    for s0 in range(0, trace.steps, _BLOCK):
        z = np.asarray(rows[s0:s0 + _BLOCK], dtype=np.float64) / temperature
        z -= z.max(axis=1, keepdims=True)
        w = np.exp(z)
        total = w.sum(axis=1)
        out[s0:s0 + len(z)] = np.log(total) - np.einsum("ij,ij->i", w, z) / total
    return out


def longest_run(tokens: np.ndarray, ignore: frozenset[int] = frozenset()) -> TokenRun | None:
    """The longest stretch of one repeated token (the earliest among equals), `ignore`d tokens excluded."""
    t = np.asarray(tokens)
    if t.size == 0:
        return None
    cuts = np.flatnonzero(np.diff(t)) + 1
    starts = np.concatenate([[0], cuts])
    lengths = np.diff(np.concatenate([starts, [t.size]]))
    keep = ~np.isin(t[starts], list(ignore)) if ignore else np.ones(starts.size, dtype=bool)
    if not keep.any():
        return None
    i = int(np.flatnonzero(keep)[np.argmax(lengths[keep])])
    return TokenRun(int(t[starts[i]]), int(starts[i]), int(lengths[i]))


def find_loop(tokens: np.ndarray, *, min_repeats: int = LOOP_MIN_REPEATS, min_span: int = LOOP_MIN_SPAN,
              max_period: int = MAX_PERIOD, ignore: frozenset[int] = frozenset()) -> Loop | None:
    """The earliest-starting loop (smallest period among those starting there): a stretch where
    token[i] == token[i - p] throughout, covering at least max(min_repeats * p, min_span) steps."""
    t = np.asarray(tokens)
    best: Loop | None = None
    for p in range(1, min(max_period, t.size // min_repeats) + 1):
        eq = np.concatenate([[False], t[p:] == t[:-p], [False]])
        edges = np.diff(eq.astype(np.int8))
        for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            span = int(e - s) + p
            pattern = tuple(int(x) for x in t[s:s + p])
            if span < max(min_repeats * p, min_span) or (ignore and set(pattern) <= ignore):
                continue
            if best is None or (int(s), p) < (best.start, best.period):
                best = Loop(int(s), p, span, pattern)
            break  # later stretches of this period start later
    return best


def padding_id(trace: Trace) -> int:
    return text_padding_id(trace.meta)


@dataclass(frozen=True, eq=False)
class StreamSummary:
    stream: str
    entropy: np.ndarray  # [steps], nats
    longest_run: TokenRun | None
    loop: Loop | None

    def to_dict(self) -> dict:
        e = self.entropy
        return {"entropy_mean": float(e.mean()) if e.size else None,
                "entropy_min": float(e.min()) if e.size else None,
                "entropy_max": float(e.max()) if e.size else None,
                "longest_run": None if self.longest_run is None else vars(self.longest_run),
                "loop": None if self.loop is None else {**vars(self.loop), "pattern": list(self.loop.pattern)}}


@dataclass(frozen=True)
class Inspection:
    path: str
    backend: str | None
    sampler: str | None
    steps: int
    padding_id: int
    padding_ratio: float | None
    streams: tuple[StreamSummary, ...]
    text: str = ""  # the text stream as words ('' without a tokenizer)

    def stream(self, name: str) -> StreamSummary:
        return next(s for s in self.streams if s.stream == name)

    def to_dict(self) -> dict:
        return {"trace": self.path, "backend": self.backend, "sampler": self.sampler, "steps": self.steps,
                "entropy": {"temperature": ENTROPY_TEMPERATURE, "unit": "nats",
                            "of": "softmax of the full vocabulary (no top-k)"},
                "loop_rule": {"min_repeats": LOOP_MIN_REPEATS, "min_span": LOOP_MIN_SPAN, "max_period": MAX_PERIOD},
                "text_padding": {"id": self.padding_id, "ratio": self.padding_ratio},
                "text": self.text, "streams": {s.stream: s.to_dict() for s in self.streams}}


def inspect_trace(trace: Trace) -> Inspection:
    pad = padding_id(trace)
    summaries = []
    for k, stream in enumerate(trace.streams):
        tokens = np.asarray(trace.tokens[:, k])
        ignore = frozenset({pad, -1}) if stream == "text" else frozenset({-1})  # -1: unknown in an imported run
        summaries.append(StreamSummary(stream, entropy(trace, stream), longest_run(tokens, ignore),
                                       find_loop(tokens, ignore=ignore)))
    ratio = None
    if "text" in trace.streams and trace.steps:
        ratio = float(np.mean(trace.tokens[:, trace.streams.index("text")] == pad))
    return Inspection(str(trace.path), trace.meta.get("backend"), (trace.meta.get("sampler") or {}).get("mode"),
                      trace.steps, pad, ratio, tuple(summaries), words.trace_text(trace))


def divergence(a: Trace, b: Trace, after: int = AFTER, *, force: bool = False) -> dict:
    """Where two traces first sampled different tokens, and what each sampled from there on.

    The same comparability check as `diff`: traces of different models, prompts or settings are
    refused unless `force` (then the reasons are returned with the result)."""
    from .diff import require_comparable

    reasons = require_comparable(a, b, force=force, fix="inspect against a trace")
    n = min(a.steps, b.steps)
    found = metrics.first_token_divergence(a, b)
    out = {"against": str(b.path), "steps_compared": n, "first_divergence": None, "after": {},
           "words": {"a": words.trace_text(a), "b": words.trace_text(b)}, "not_comparable": reasons}
    if found is None:
        return out
    step, stream = found
    out["words"] = {side: words.join(p, step) if p is not None else "" for side, p in
                    (("a", words.pieces(a)), ("b", words.pieces(b)))}
    col = a.streams.index(stream)
    delta = metrics.max_abs_at(a, b, step, stream) if a.has_logits and b.has_logits else None
    out.update(first_divergence={"step": step, "stream": stream, "token_a": int(a.tokens[step, col]),
                                 "token_b": int(b.tokens[step, col]), "max_abs_there": delta},
               after={s: {"a": [int(x) for x in a.tokens[step:step + after, k]],
                          "b": [int(x) for x in b.tokens[step:step + after, k]]} for k, s in enumerate(a.streams)})
    return out
