"""Compare two traces captured anywhere: may they be compared at all, and how far apart are they?

`comparability` is the check a user needs before reading any number: the same model, prompt,
seed, effective sampling settings, alignment and streams, and a sampler pairing that makes sense
(a teacher-forced run must have been forced onto the other trace). Dtypes, devices, backends and
lengths may differ: traces of different length are compared on their common prefix, and the
user inputs of that prefix must be identical. Logits are compared only where both runs had
identical inputs: every step before the first token divergence, and at that step the streams up
to the one that differs (after it the runs are fed different tokens, and their logits measure the
cascade, not the backends). `diff` refuses incomparable traces unless forced, then reports
per-stream drift summaries over those steps, the first token divergence (with the drift and
margins there, and whether drift explains it), and the first bitwise-different step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .context import context_crossed
from ..errors import XBackendError
from .knobs import compile_difference
from .metrics import (METRICS, StepMetrics, Summary, bitwise_equal_steps, drift_explains, finite_or_none,
                      first_token_divergence, step_metrics, summarize)
from ..results import Point, count, exit_code, where
from ..samplers import SamplingSettings, describe_identity, shares_sampler
from ..tolerances import tier_of, tolerance
from ..store.trace import Trace, load_trace, logical_dtype

SCHEMA = "xbackend.diff/1"
_MISSING = object()


def _get(meta: dict, *keys: str):
    value = meta
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def label(trace: Trace) -> str:
    """How a reason names a trace: its backend and its directory."""
    backend = trace.meta.get("backend")
    return f"{backend} at {trace.path}" if backend else str(trace.path)


def _show(value) -> str:
    return "(not recorded)" if value is _MISSING else repr(value)


def _mode(trace: Trace) -> str | None:
    mode = _get(trace.meta, "sampler", "mode")
    return None if mode is _MISSING else str(mode)


def _forced_onto(forced: Trace, other: Trace) -> bool:
    """Was `forced` teacher-forced onto `other`? Its source is `other`'s directory, or its tokens are `other`'s."""
    source = _get(forced.meta, "sampler", "forced_from")
    if source is not _MISSING and source:
        try:
            if Path(os.path.expanduser(str(source))).resolve() == Path(other.path).resolve():
                return True
        except OSError:
            pass
    n = min(forced.steps, other.steps)
    return n > 0 and forced.streams == other.streams and bool(np.array_equal(forced.tokens[:n], other.tokens[:n]))


def prompt_frames(trace: Trace) -> np.ndarray:
    """The prompt frames a trace was passed, in prompt order, whatever its library's step convention:
    aligned feeding passes frame t-1 at step t to a library that consumes a frame in the step it gets
    it (PyTorch) and frame t to one that consumes it a step later (MLX); upstream feeding passes t."""
    alignment = trace.meta.get("alignment") or {}
    offset = 1 if alignment.get("mode") == "aligned" and alignment.get("consumes_late") is False else 0
    return np.asarray(trace.inputs[offset:])


def comparability(a: Trace, b: Trace) -> list[str]:
    """Reasons why B cannot be read against A (empty when they are comparable); each names both values."""
    la, lb = label(a), label(b)
    reasons = []

    def differ(what: str, va, vb) -> None:
        if va != vb:
            reasons.append(f"{what}: {_show(va)} in {la} vs {_show(vb)} in {lb}")

    differ("model digest differs", _get(a.meta, "model", "digest"), _get(b.meta, "model", "digest"))
    if not (int(a.meta.get("n_inputs") or 0) and int(b.meta.get("n_inputs") or 0)):
        # without recorded inputs the digest is all there is; with them, the inputs themselves are compared
        # (below) on the common steps, so runs of different --steps, or fed a codes file, still compare
        differ("prompt digest differs", _get(a.meta, "prompt", "digest"), _get(b.meta, "prompt", "digest"))
    differ("streams differ", a.streams, b.streams)
    if a.streams == b.streams:
        differ("vocabulary sizes differ", list(a.meta["vocab"]), list(b.meta["vocab"]))
    differ("alignment differs", _get(a.meta, "alignment", "mode"), _get(b.meta, "alignment", "mode"))
    if a.streams == b.streams and list(a.meta["vocab"]) == list(b.meta["vocab"]):
        ea = SamplingSettings.from_meta(a.meta).effective(list(a.meta["vocab"]))
        eb = SamplingSettings.from_meta(b.meta).effective(list(b.meta["vocab"]))
        for stream, x, y in zip(a.streams, ea, eb):
            if x != y:  # what decisions depend on: temperature and the tokens top-k keeps
                reasons.append(f"sampling settings of {stream} differ: temperature {x[0]:g}, top-k keeps {x[1]} in "
                               f"{la} vs temperature {y[0]:g}, top-k keeps {y[1]} in {lb}")
        pa, pb = prompt_frames(a), prompt_frames(b)
        n = min(len(pa), len(pb))
        if pa.shape[1:] == pb.shape[1:]:
            bad = np.flatnonzero((pa[:n] != pb[:n]).any(axis=1))
            if bad.size:
                reasons.append(f"user inputs differ from prompt frame {int(bad[0])}: the runs were not fed the "
                               "same prompt")

    ma, mb = _mode(a), _mode(b)
    forced_pair = False
    if ma == "forced" or mb == "forced":
        if ma == mb:
            fa, fb = _get(a.meta, "sampler", "forced_from"), _get(b.meta, "sampler", "forced_from")
            if fa != fb and not _forced_onto(a, b):
                reasons.append(f"forced from different sources: {_show(fa)} in {la} vs {_show(fb)} in {lb}")
            forced_pair = True
        else:
            forced, other, lf, lo = (b, a, lb, la) if mb == "forced" else (a, b, la, lb)
            if _forced_onto(forced, other):
                forced_pair = True
            else:
                src = _get(forced.meta, "sampler", "forced_from")
                reasons.append(f"{lf} is forced from {_show(src)}, not from {lo} "
                               f"(its tokens are not {lo}'s), while {lo} samples ({_mode(other)})")
    else:
        differ("sampler mode differs", ma, mb)
    if not forced_pair:  # a run forced onto the other took its tokens: its own seed decided nothing
        differ("seed differs", _get(a.meta, "seed"), _get(b.meta, "seed"))
    return reasons


@dataclass(frozen=True)
class Divergence:
    """The first (step, stream) whose tokens differ, and what the logits looked like there."""

    step: int
    stream: str
    token_a: int
    token_b: int
    max_abs: float
    margin_a: float
    margin_b: float
    explained: bool | None  # drift_explains: 2·max_abs >= min(margins); None without margins

    def to_dict(self) -> dict:
        return {"step": self.step, "stream": self.stream, "token_a": self.token_a, "token_b": self.token_b,
                "max_abs": finite_or_none(self.max_abs), "margin_a": finite_or_none(self.margin_a),
                "margin_b": finite_or_none(self.margin_b), "explained": self.explained,
                "rule": "explained = 2 * max_abs >= min(margin_a, margin_b)"}


@dataclass(frozen=True, eq=False)
class DiffResult:
    """B against the reference A, over the steps where both had identical inputs.

    `to_dict()` is JSON-ready (non-finite numbers become null); `expected`, `exit_code` and
    `explanation` apply the verdict rules to two traces: identical tokens within tolerance, or a
    native divergence between two different samplers within tolerance, is an expected difference."""

    a: str
    b: str
    backend_a: str | None
    backend_b: str | None
    mode_a: str | None
    mode_b: str | None
    steps_a: int
    steps_b: int
    steps_common: int
    steps_compared: int  # steps whose logits were compared (the divergence step, partly, included)
    tier_a: str
    tier_b: str
    tolerance: float
    streams: tuple[str, ...]
    summaries: dict[str, dict[str, Summary]]
    first_divergence: Divergence | None
    first_bitwise_step: int | None
    first_nonfinite: tuple[int, str] | None
    logits_identical: bool
    tokens_identical: bool
    shared_sampler: bool | None
    samplers: tuple[dict | None, dict | None] = (None, None)
    logits_compared: bool = True  # False when either is a token trace (an imported run): tokens only
    forced: bool = False  # compared although `reasons` say the traces are not comparable
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    metrics: StepMetrics | None = field(default=None, repr=False)

    @property
    def max_abs(self) -> float:
        """The largest |Δlogit| over every compared step and stream (NaN if any was non-finite)."""
        if self.first_nonfinite is not None:
            return math.nan
        values = [s["max_abs"].max for s in self.summaries.values() if s["max_abs"].count]
        return max(values) if values else 0.0

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs <= self.tolerance

    @property
    def sampler_divergence(self) -> bool:
        """Tokens differ between two native runs whose samplers are not known to be the same."""
        return (self.first_divergence is not None and self.mode_a == self.mode_b == "native"
                and self.shared_sampler is not True)

    @property
    def declared_identity_broken(self) -> bool:
        """One sampler declared, bitwise-equal logits on every identical input, yet the tokens differ."""
        return self.first_divergence is not None and self.shared_sampler is True and self.max_abs == 0.0

    @property
    def expected(self) -> bool:
        """The compare rule (docs/design.md, One fact, one exit code): drift within tolerance is expected
        whatever tokens it flipped, unless a sampler broke its declared identity."""
        return self.within_tolerance and not self.declared_identity_broken

    @property
    def exit_code(self) -> int:
        return exit_code(backend_failed=False, attention=not self.expected)

    @property
    def explanation(self) -> str:
        if not self.logits_compared:
            d = self.first_divergence
            return ("Logits not compared (a token trace has none); "
                    + ("no token differs." if d is None else f"tokens first differ at {where(Point(d.step, d.stream))}."))
        size = f"max |Δlogit| {self.max_abs:.3g} over {count(self.steps_compared, 'step')} with identical inputs"
        state = (f"within the tolerance of {self.tolerance:g}" if self.within_tolerance else
                 f"BEYOND the tolerance of {self.tolerance:g}")
        if self.first_divergence is None:
            return f"No token differs; {size}, {state}."
        d = self.first_divergence
        at = where(Point(d.step, d.stream))
        if self.sampler_divergence:
            return (f"Tokens first differ at {at}, and the two native samplers differ ({describe_identity(self.samplers[0])} "
                    f"vs {describe_identity(self.samplers[1])}); {size}, {state}. Compare portable or forced runs "
                    "for token agreement.")
        why = ("both runs share one sampler, so only the logits can explain it" if self.shared_sampler
               else "the decisions depend only on the logits")
        return f"Tokens first differ at {at} ({why}); {size}, {state}."

    def to_dict(self, per_step: bool = False) -> dict:
        out = {
            "schema": SCHEMA, "a": self.a, "b": self.b, "backend_a": self.backend_a, "backend_b": self.backend_b,
            "mode_a": self.mode_a, "mode_b": self.mode_b, "steps_a": self.steps_a, "steps_b": self.steps_b,
            "steps_common": self.steps_common, "steps_compared": self.steps_compared,
            "tier_a": self.tier_a, "tier_b": self.tier_b,
            "tolerance": self.tolerance, "max_abs": finite_or_none(self.max_abs), "within_tolerance": self.within_tolerance,
            "streams": list(self.streams),
            "summaries": _summaries_dict(self.summaries),
            "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
            "first_bitwise_step": self.first_bitwise_step,
            "first_nonfinite": ({"step": self.first_nonfinite[0], "stream": self.first_nonfinite[1]}
                                if self.first_nonfinite else None),
            "logits_identical": self.logits_identical, "tokens_identical": self.tokens_identical,
            "shared_sampler": self.shared_sampler, "samplers": list(self.samplers),
            "expected": self.expected, "exit_code": self.exit_code, "explanation": self.explanation,
            "forced": self.forced, "reasons": list(self.reasons), "notes": list(self.notes),
            "logits_compared": self.logits_compared,
        }
        if per_step and self.metrics is not None:
            m = self.metrics
            out["per_step"] = {stream: {name: [finite_or_none(v) if name != "top1" else bool(v)
                                               for v in getattr(m, name)[:, i].tolist()] for name in METRICS}
                               for i, stream in enumerate(m.streams)}
        return out


    @staticmethod
    def from_dict(d: dict) -> DiffResult:
        """A result read back from its JSON (per-step metrics are not kept there)."""
        if d.get("schema") != SCHEMA:
            raise XBackendError(f"diff result has schema {d.get('schema')!r}, expected {SCHEMA!r}")

        def summary(x: dict) -> Summary:
            return Summary(**{k: (math.nan if v is None and k not in ("min_step", "max_step") else v)
                              for k, v in x.items()})

        fd, nf = d.get("first_divergence"), d.get("first_nonfinite")
        return DiffResult(
            a=d["a"], b=d["b"], backend_a=d["backend_a"], backend_b=d["backend_b"], mode_a=d["mode_a"],
            mode_b=d["mode_b"], steps_a=d["steps_a"], steps_b=d["steps_b"], steps_common=d["steps_common"],
            steps_compared=d["steps_compared"], tier_a=d["tier_a"], tier_b=d["tier_b"], tolerance=d["tolerance"],
            streams=tuple(d["streams"]),
            summaries={s: {k: summary(v) for k, v in per.items()} for s, per in d["summaries"].items()},
            first_divergence=None if fd is None else Divergence(
                fd["step"], fd["stream"], fd["token_a"], fd["token_b"],
                *(math.nan if fd[k] is None else fd[k] for k in ("max_abs", "margin_a", "margin_b")), fd["explained"]),
            first_bitwise_step=d["first_bitwise_step"],
            first_nonfinite=None if nf is None else (nf["step"], nf["stream"]),
            logits_identical=d["logits_identical"], tokens_identical=d["tokens_identical"],
            shared_sampler=d.get("shared_sampler"), samplers=tuple(d.get("samplers") or (None, None)),
            logits_compared=d.get("logits_compared", True),
            forced=d["forced"], reasons=tuple(d["reasons"]), notes=tuple(d["notes"]))


def _summaries_dict(summaries: dict[str, dict[str, Summary]]) -> dict:
    return {stream: {name: s.to_dict() for name, s in per.items()} for stream, per in summaries.items()}


def _as_trace(x: Trace | str | os.PathLike) -> Trace:
    return x if isinstance(x, Trace) else load_trace(x)


def _notes(a: Trace, b: Trace, n: int) -> list[str]:
    notes = []
    for t, name in ((a, "A"), (b, "B")):
        if not t.complete:
            error = t.meta.get("error")
            notes.append(f"{name} ({label(t)}) is incomplete: status {t.meta.get('status')!r}"
                         + (f" ({error})" if error else "") + f"; its {t.steps} complete steps are used")
    if n == 0:
        notes.append("no step to compare: every figure is empty")
    elif a.steps != b.steps:
        notes.append(f"A has {a.steps} steps and B {b.steps}: compared their common first {n}")
    if logical_dtype(a.logits_dtype) != logical_dtype(b.logits_dtype):
        notes.append(f"logits are {logical_dtype(a.logits_dtype).name} in A and {logical_dtype(b.logits_dtype).name} "
                     "in B: digests can never match")
    da, db = a.meta.get("delays"), b.meta.get("delays")
    if da is not None and db is not None and da != db:
        notes.append(f"acoustic delays differ: {da} in A vs {db} in B")
    knob = compile_difference(a.meta, b.meta)
    if knob is not None:  # comparable all the same: it is a knob of one program, not another program
        notes.append(f"{knob['note']} (B against A)")
    context = context_crossed(a.meta, n)
    if context.length is not None:
        notes.append(context.note)
    return notes


def same_input_rows(streams: list[str], n: int, div: tuple[int, str] | None) -> list[int]:
    """Per stream, how many leading steps both runs computed on identical inputs."""
    if div is None:
        return [n] * len(streams)
    step, stream = div
    k = streams.index(stream)
    return [step + 1 if i <= k else step for i in range(len(streams))]


def require_comparable(a: Trace, b: Trace, *, force: bool, fix: str) -> list[str]:
    """The one refusal of two traces that cannot be read against each other (`diff`, `inspect --against`): any
    reason of `comparability` unless `force` (then the reasons are returned, for the result to carry), and
    different streams or vocabularies even with it. `fix` starts the advice ("capture both")."""
    reasons = comparability(a, b)
    if reasons and not force:
        raise XBackendError(f"Traces {a.path} and {b.path} are not comparable: " + "; ".join(reasons),
                            fix=f"{fix} with the same model, prompt, seed and settings, "
                            "or pass --force (force=True) to compare them anyway")
    if a.streams != b.streams or list(a.meta["vocab"]) != list(b.meta["vocab"]):
        raise XBackendError(f"Traces {a.path} and {b.path} cannot be compared even by force: streams {a.streams} / "
                            f"vocabularies {list(a.meta['vocab'])} vs {b.streams} / {list(b.meta['vocab'])}",
                            fix=f"{fix} with the same model")
    return reasons


def diff(a: Trace | str | os.PathLike, b: Trace | str | os.PathLike, *, force: bool = False,
         tolerance_overrides: dict[str, float] | None = None, block: int | None = None,
         workers: int | None = None) -> DiffResult:
    """Compare trace B against the reference A where both had identical inputs.

    Raises `XBackendError` naming every mismatch when they are not comparable, unless `force`.
    """
    a, b = _as_trace(a), _as_trace(b)
    reasons = require_comparable(a, b, force=force, fix="capture both")
    common = min(a.steps, b.steps)
    if not (a.has_logits and b.has_logits):
        return _token_diff(a, b, reasons)
    div = first_token_divergence(a, b)
    rows = same_input_rows(a.streams, common, div)
    n = max(rows, default=0)
    kwargs = {"workers": workers} | ({"block": block} if block else {})
    m = step_metrics(a, b, steps=n, **kwargs)
    summaries = {s: {name: summarize(getattr(m, name)[:rows[i], i]) for name in METRICS}
                 for i, s in enumerate(a.streams)}
    divergence = None
    if div is not None:
        step, stream = div
        col = a.streams.index(stream)
        max_abs, ma, mb = (float(m.max_abs[step, col]), float(m.margin_a[step, col]), float(m.margin_b[step, col]))
        divergence = Divergence(step, stream, int(a.tokens[step, col]), int(b.tokens[step, col]), max_abs, ma, mb,
                                drift_explains(max_abs, ma, mb))
    bitwise = bitwise_equal_steps(a, b)
    if bitwise is not None and bitwise >= n:
        bitwise = None
    elif bitwise is not None and div is not None and bitwise == div[0]:  # that step's digest covers later streams too
        k = a.streams.index(div[1])
        if all(np.array_equal(a.logits(s)[bitwise], b.logits(s)[bitwise]) for s in a.streams[:k + 1]):
            bitwise = None
    masked = np.stack([np.where(np.arange(n) < rows[i], m.max_abs[:, i], 0.0) for i in range(len(a.streams))], axis=1) \
        if n else m.max_abs
    bad = ~np.isfinite(masked)
    nonfinite = None
    if bad.any():
        step, col = divmod(int(np.argmax(bad.reshape(-1))), bad.shape[1])
        nonfinite = (step, a.streams[col])
    notes = _notes(a, b, common)
    if div is not None:
        notes.append(f"tokens diverge at step {div[0]} ({div[1]}): later steps see different inputs, so logits are "
                     f"compared over the {div[0]} steps before it and, at step {div[0]}, the streams up to {div[1]}")
    tier_a, tier_b = tier_of(a), tier_of(b)
    ids = (_get(a.meta, "sampler", "identity"), _get(b.meta, "sampler", "identity"))
    ids = tuple(None if x is _MISSING else x for x in ids)
    return DiffResult(
        a=str(a.path), b=str(b.path), backend_a=a.meta.get("backend"), backend_b=b.meta.get("backend"),
        mode_a=_mode(a), mode_b=_mode(b), steps_a=a.steps, steps_b=b.steps, steps_common=common, steps_compared=n,
        tier_a=tier_a, tier_b=tier_b, tolerance=tolerance(tier_a, tier_b, tolerance_overrides),
        streams=tuple(a.streams), summaries=summaries,
        first_divergence=divergence, first_bitwise_step=bitwise, first_nonfinite=nonfinite,
        logits_identical=bitwise is None, tokens_identical=div is None,
        shared_sampler=shares_sampler(*ids), samplers=ids,
        forced=bool(reasons), reasons=tuple(reasons), notes=tuple(notes), metrics=m,
    )


def _token_diff(a: Trace, b: Trace, reasons: list[str]) -> DiffResult:
    """Two runs of which at least one is a token trace: where their tokens first differ, nothing more."""
    n = min(a.steps, b.steps)
    div = first_token_divergence(a, b)
    divergence = None
    if div is not None:
        step, stream = div
        col = a.streams.index(stream)
        divergence = Divergence(step, stream, int(a.tokens[step, col]), int(b.tokens[step, col]), math.nan,
                                float(a.margins[step, col]), float(b.margins[step, col]), None)
    which = " and ".join(name for t, name in ((a, "A"), (b, "B")) if not t.has_logits)
    notes = _notes(a, b, n) + [f"{which} {'is a token trace' if len(which) == 1 else 'are token traces'} "
                               "(no logits): only tokens are compared"]
    tier_a, tier_b = tier_of(a), tier_of(b)
    ids = tuple(None if x is _MISSING else x for x in (_get(a.meta, "sampler", "identity"),
                                                          _get(b.meta, "sampler", "identity")))
    return DiffResult(
        a=str(a.path), b=str(b.path), backend_a=a.meta.get("backend"), backend_b=b.meta.get("backend"),
        mode_a=_mode(a), mode_b=_mode(b), steps_a=a.steps, steps_b=b.steps, steps_common=n, steps_compared=0,
        tier_a=tier_a, tier_b=tier_b, tolerance=tolerance(tier_a, tier_b), streams=tuple(a.streams),
        summaries={}, first_divergence=divergence, first_bitwise_step=None,
        first_nonfinite=None, logits_identical=False, tokens_identical=div is None,
        shared_sampler=shares_sampler(*ids), samplers=ids, logits_compared=False, forced=bool(reasons),
        reasons=tuple(reasons), notes=tuple(notes), metrics=None)
