"""Typed results: a verdict, a repeatability measurement and a compare report own their meaning.

Each is a frozen dataclass with `to_dict()` / `from_dict()` (the JSON of report.json), and says
itself whether it is an *expected* difference and which exit code it gives, so the CLI, `report`
and `check` never re-derive a rule. The exit-code policy, the step/stream formatting and the
"reference not repeatable" rule are written here once.

Exit codes: 0 every difference is an expected one (IDENTICAL, NUMERIC_DRIFT within tolerance,
SAMPLER_DIVERGENCE within tolerance); 1 anything beyond tolerance, nondeterministic or semantic
(or a failed gate); 2 bad input; 3 a backend failed or is unavailable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import XBackendError

REPORT_SCHEMA = "xbackend.report/1"
VERDICTS = ("BACKEND_FAILED", "SEMANTIC_MISMATCH", "NONDETERMINISTIC_KERNELS", "NONDETERMINISTIC_SAMPLER",
            "NUMERIC_DIVERGENCE", "SAMPLER_DIVERGENCE", "NUMERIC_DRIFT", "IDENTICAL")
# Verdicts an expected difference may carry (docs/design.md, Exit codes): with drift within tolerance, no
# spike and every sampler as declared, a decision flipped by healthy drift or by another sampler is expected.
EXPECTABLE = ("IDENTICAL", "NUMERIC_DRIFT", "NUMERIC_DIVERGENCE", "SAMPLER_DIVERGENCE")
EXIT_OK, EXIT_ATTENTION, EXIT_BAD_INPUT, EXIT_BACKEND = 0, 1, 2, 3
NOT_MEASURED = "not measured: one run"


def exit_code(*, backend_failed: bool, attention: bool) -> int:
    """The exit-code policy: 3 a backend failed or is unavailable, else 1 when anything needs attention, else 0."""
    return EXIT_BACKEND if backend_failed else EXIT_ATTENTION if attention else EXIT_OK


@dataclass(frozen=True)
class Point:
    """A (step, stream) position in a run; stream None when a process died mid-step."""

    step: int
    stream: str | None

    def to_dict(self) -> dict:
        return {"step": self.step, "stream": self.stream}

    @staticmethod
    def from_dict(d: dict | None) -> Point | None:
        return None if not d else Point(int(d["step"]), d.get("stream"))

    def __str__(self) -> str:
        return f"step {self.step}, {self.stream or 'stream unknown (the process died mid-step)'}"

    def short(self) -> str:
        return f"{self.step}:{self.stream or '?'}"


def where(point: Point | dict | None, short: bool = False, none: str = "-") -> str:
    """The one step/stream formatter: `step 3, audio2` (or `3:audio2` when short)."""
    if isinstance(point, dict):
        point = Point.from_dict(point)
    if point is None:
        return none
    return point.short() if short else str(point)


def times(x: float | None) -> str:
    """A ratio as people read it: 4,000x, 12x, 1.5x."""
    if x is None or not math.isfinite(x):
        return "infinitely"
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2g}x"


@dataclass(frozen=True)
class Finding:
    """A secondary finding: another rule that holds, where, and a note with its numbers."""

    verdict: str
    at: Point | None
    note: str = ""

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "first_divergence": None if self.at is None else self.at.to_dict(),
                "note": self.note}

    @staticmethod
    def from_dict(d: dict) -> Finding:
        return Finding(d["verdict"], Point.from_dict(d.get("first_divergence")), d.get("note", ""))

    def __str__(self) -> str:
        return f"{self.verdict}" + (f" at {self.at}" if self.at else "") + (f" ({self.note})" if self.note else "")


# --------------------------------------------------------------------------- repeatability


@dataclass(frozen=True)
class Repeatability:
    """Are repeats of one backend bitwise identical in logits (on identical inputs) and in tokens?

    With one run nothing is measured: the booleans and the drift are None, never a made-up 0."""

    backend: str
    runs: int
    logits_identical: bool | None
    tokens_identical: bool | None
    first_logits_difference: Point | None = None
    first_token_difference: Point | None = None
    run_to_run_drift: float | None = None
    digests: tuple = ()
    steps: tuple = ()

    @property
    def measured(self) -> bool:
        return self.runs >= 2

    @property
    def repeatable(self) -> bool | None:
        """True/False when measured, None with one run."""
        return None if not self.measured else bool(self.logits_identical and self.tokens_identical)

    @property
    def first_nondeterministic(self) -> Point | None:
        points = [p for p in (self.first_logits_difference, self.first_token_difference) if p is not None]
        return min(points, key=lambda p: (p.step, p.stream or "")) if points else None

    def drift_text(self) -> str:
        return NOT_MEASURED if self.run_to_run_drift is None else f"{self.run_to_run_drift:.3g}"

    def to_dict(self) -> dict:
        first = self.first_nondeterministic
        return {"backend": self.backend, "runs": self.runs, "measured": self.measured,
                "logits_identical": self.logits_identical, "tokens_identical": self.tokens_identical,
                "first_nondeterministic_step": None if first is None else first.step,
                "first_nondeterministic_stream": None if first is None else first.stream,
                "first_logits_difference": None if self.first_logits_difference is None
                else self.first_logits_difference.to_dict(),
                "first_token_difference": None if self.first_token_difference is None
                else self.first_token_difference.to_dict(),
                "run_to_run_drift": self.run_to_run_drift, "digests": list(self.digests), "steps": list(self.steps)}

    @staticmethod
    def from_dict(d: dict) -> Repeatability:
        return Repeatability(d["backend"], int(d["runs"]), d.get("logits_identical"), d.get("tokens_identical"),
                             Point.from_dict(d.get("first_logits_difference")),
                             Point.from_dict(d.get("first_token_difference")), d.get("run_to_run_drift"),
                             tuple(d.get("digests") or ()), tuple(d.get("steps") or ()))


def reference_warning(rep: Repeatability | None, reference: str) -> str | None:
    """The "reference not repeatable" rule: a nondeterministic reference makes every comparison noisy."""
    if rep is None or rep.repeatable is not False:
        return None
    return (f"the reference {reference} is not repeatable (first difference at {rep.first_nondeterministic}, "
            f"run-to-run drift {rep.drift_text()}): every comparison below carries its noise")


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """One backend against the reference: the first rule that holds, the others as findings, the figures."""

    backend: str
    vs: str
    verdict: str
    first_divergence: Point | None = None
    secondary: tuple[Finding, ...] = ()
    figures: dict = field(default_factory=dict)
    recorded_explanation: str | None = field(default=None, compare=False, repr=False)  # made by analysis.diagnose, or read back from JSON

    @property
    def within_tolerance(self) -> bool | None:
        return self.figures.get("within_tolerance")

    @property
    def expected(self) -> bool:
        """An expected difference: IDENTICAL, or drift within tolerance whatever tokens it flipped
        (NUMERIC_DRIFT, NUMERIC_DIVERGENCE, SAMPLER_DIVERGENCE), with no spike, no sampler that broke
        its declared identity, and no secondary finding that would need attention on its own."""
        if self.verdict == "IDENTICAL" and not self.secondary:
            return True
        f = self.figures
        verdicts = [self.verdict, *(s.verdict for s in self.secondary)]
        return (all(v in EXPECTABLE for v in verdicts) and self.within_tolerance is True and not f.get("spikes")
                and f.get("declared_identity_held") is not False)

    @property
    def label(self) -> str:
        return "expected" if self.expected else "needs attention"

    @property
    def exit_code(self) -> int:
        return exit_code(backend_failed=self.verdict == "BACKEND_FAILED", attention=not self.expected)

    @property
    def explanation(self) -> str:
        """Why, with the numbers: written by `analysis.diagnose` when the verdict is made, or as recorded
        when read back from a report."""
        if self.recorded_explanation is not None:
            return self.recorded_explanation
        return f"{self.verdict}: report.json records no explanation"

    def to_dict(self) -> dict:
        return {"backend": self.backend, "vs": self.vs, "verdict": self.verdict,
                "first_divergence": None if self.first_divergence is None else self.first_divergence.to_dict(),
                "secondary": [s.to_dict() for s in self.secondary], "figures": self.figures,
                "explanation": self.explanation, "expected": self.expected}

    @staticmethod
    def from_dict(d: dict) -> Verdict:
        if d.get("verdict") not in VERDICTS:
            raise XBackendError(f"Unknown verdict {d.get('verdict')!r}", asked=f"verdicts are {', '.join(VERDICTS)}")
        return Verdict(d["backend"], d["vs"], d["verdict"], Point.from_dict(d.get("first_divergence")),
                       tuple(Finding.from_dict(s) for s in d.get("secondary") or ()), dict(d.get("figures") or {}),
                       d.get("explanation"))


# --------------------------------------------------------------------------- the compare report


@dataclass(frozen=True)
class CompareReport:
    """Everything `compare` found; `to_dict()` is report.json (schema `xbackend.report/1`)."""

    request: dict
    reference: str
    backends: tuple[dict, ...]
    verdicts: tuple[Verdict, ...] = ()
    repeatability: tuple[Repeatability, ...] = ()
    drift: tuple[dict, ...] = ()
    not_diagnosed: tuple[dict, ...] = ()
    failures: tuple[dict, ...] = ()
    traces: dict = field(default_factory=dict)
    arbiter: dict | None = None
    created: str | None = None
    command: str | None = None
    audio: dict | None = None
    codec: dict | None = None  # the codec that decoded audio/*.wav
    timing: dict | None = None
    words: dict | None = None  # each run's decoded text (xbackend.analysis.words)
    locate: dict | None = None  # by backend: where in the network it parts (xbackend.locate/1, `locate`)
    context: dict | None = None  # did the runs cross the model's context (xbackend.analysis.context)

    @property
    def labels(self) -> list[str]:
        return [b["name"] for b in self.backends]

    @property
    def reference_repeatability(self) -> Repeatability | None:
        return next((r for r in self.repeatability if r.backend == self.reference), None)

    @property
    def reference_warning(self) -> str | None:
        return reference_warning(self.reference_repeatability, self.reference)

    @property
    def backend_failed(self) -> bool:
        return any(b["status"] != "ok" for b in self.backends)

    @property
    def expected(self) -> bool:
        return not self.backend_failed and self.reference_warning is None and all(v.expected for v in self.verdicts)

    @property
    def exit_code(self) -> int:
        return exit_code(backend_failed=self.backend_failed, attention=not self.expected)

    @property
    def advisories(self) -> list[dict]:
        """Known issues (`advisories.ADVISORIES`, the current table) matching each backend's fingerprint."""
        from .advisories import advise

        return advise({b["name"]: b.get("env") for b in self.backends})

    def known_issues(self, v: Verdict) -> list[dict]:
        """The matches, of the backend or of its reference, that could explain a verdict needing attention."""
        from .advisories import explaining, verdict_effects

        return [] if v.expected else explaining(self.advisories, (v.backend, v.vs), verdict_effects(v.verdict, v.figures))

    def verdict_for(self, backend: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.backend == backend), None)

    def repeatability_for(self, backend: str) -> Repeatability | None:
        return next((r for r in self.repeatability if r.backend == backend), None)

    def to_dict(self) -> dict:
        ref = self.reference_repeatability
        out: dict[str, Any] = {
            "schema": REPORT_SCHEMA, "created": self.created, "command": self.command, "request": self.request,
            "reference": self.reference, "reference_repeatability": None if ref is None else ref.to_dict(),
            "reference_warning": self.reference_warning,
            "backends": list(self.backends), "verdicts": [self._located(v.to_dict()) for v in self.verdicts],
            "not_diagnosed": list(self.not_diagnosed), "repeatability": [r.to_dict() for r in self.repeatability],
            "drift": list(self.drift), "failures": list(self.failures), "traces": self.traces,
            "arbiter": self.arbiter, "expected": self.expected, "exit_code": self.exit_code,
            "advisories": self.advisories,
        }
        if self.audio is not None:
            out["audio"] = self.audio
        if self.codec is not None:
            out["codec"] = self.codec
        if self.timing is not None:
            out["timing"] = self.timing
        if self.words is not None:
            out["words"] = self.words
        if self.locate is not None:
            out["locate"] = self.locate
        if self.context is not None:
            out["context"] = self.context
        return out

    def _located(self, verdict: dict) -> dict:
        """A verdict's explanation with `locate`'s sentence appended (once), when it located that backend."""
        found = (self.locate or {}).get(verdict["backend"])
        sentence = found.get("sentence") if isinstance(found, dict) else None
        if isinstance(sentence, str) and sentence and not verdict["explanation"].endswith(sentence):
            verdict["explanation"] = f"{verdict['explanation']} {sentence}"
        return verdict

    @staticmethod
    def from_dict(d: dict) -> CompareReport:
        if d.get("schema") != REPORT_SCHEMA:
            raise XBackendError(f"report has schema {d.get('schema')!r}, expected {REPORT_SCHEMA!r}",
                                fix="run xbackend compare again with this version of xbackend")
        try:
            return CompareReport(
                request=dict(d["request"]), reference=d["reference"], backends=tuple(d["backends"]),
                verdicts=tuple(Verdict.from_dict(v) for v in d.get("verdicts") or ()),
                repeatability=tuple(Repeatability.from_dict(r) for r in d.get("repeatability") or ()),
                drift=tuple(d.get("drift") or ()), not_diagnosed=tuple(d.get("not_diagnosed") or ()),
                failures=tuple(d.get("failures") or ()), traces=dict(d.get("traces") or {}),
                arbiter=d.get("arbiter"), created=d.get("created"), command=d.get("command"),
                audio=d.get("audio"), codec=d.get("codec"), timing=d.get("timing"),
                words=d.get("words"), locate=d.get("locate"), context=d.get("context"))
        except (KeyError, TypeError, ValueError) as exc:
            raise XBackendError(f"report is missing or has a malformed field ({type(exc).__name__}: {exc})",
                                fix="run xbackend compare again") from None


def count(n, noun: str) -> str:
    """`1 step`, `3 steps`: a number with its noun, in words a reader expects."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def plain(value, none: str = "none") -> str:
    """A value as prose: null as `none`, booleans as yes/no, a mapping as `key value, ...` (no Python reprs)."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {plain(v, none)}" for k, v in value.items()) or none
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v, none) for v in value) or none
    return str(value)
