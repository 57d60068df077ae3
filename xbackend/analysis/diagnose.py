"""The diagnosis: repeatability, first divergences, onsets and one verdict per backend.

Pure functions on loaded traces: no framework, no I/O beyond reading the traces. The rules (the
first that holds is the verdict, every other one a secondary finding):

1. BACKEND_FAILED: a crash, timeout, NaN/Inf logits or a zero-probability pick in any run.
2. SEMANTIC_MISMATCH: teacher-forced drift (per step, max over streams) exceeds the threshold
   `SEMANTIC_FACTOR x max(tolerance, run-to-run drift of either backend)` at an *onset* step and
   stays there (`persistent_onset`); `first_divergence` is the onset.
3. NONDETERMINISTIC_KERNELS / 4. NONDETERMINISTIC_SAMPLER: the backend's own repeats differ.
5. NUMERIC_DIVERGENCE at the earliest of: the portable divergence p when p <= n (or no n); the
   native divergence n when both native runs share one sampler (same algorithm and RNG stream);
   a spike over the threshold that does not persist.
6. SAMPLER_DIVERGENCE: n exists, the native samplers differ (or one is unrecorded), and the
   portable runs still agree at n.
7. NUMERIC_DRIFT: no token differs, logits not bitwise equal. 8. IDENTICAL: bitwise equal.

Drift beyond tolerance is always a finding (the verdict, or a secondary NUMERIC_DRIFT finding
with its size in tolerance units). A numeric arbiter (a `cpu:fp64` run teacher-forced on the
reference's tokens) says which side of a disagreement is closer to exact arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import metrics
from .explain import explain
from ..results import SEMANTIC_FACTOR, VERDICTS, Finding, Point, Repeatability, Verdict, times
from ..samplers import shares_sampler
from ..store.trace import Trace
from .context import context_length
from .knobs import compile_difference

PERSISTENCE = 0.5  # an onset persists when the next step and at least this share of the steps from it stay over


@dataclass(frozen=True)
class BackendRuns:
    """What one backend produced in a comparison; traces may be partial or missing."""

    label: str
    tier: str
    status: str  # ok | failed | unavailable
    error: str | None = None
    native: list[Trace] = field(default_factory=list)
    portable: Trace | None = None
    forced: Trace | None = None
    failures: list[dict] = field(default_factory=list)  # {run, error, failed_at, steps}


def first_token_divergence(a: Trace, b: Trace) -> Point | None:
    """First (step, stream), in decision order, where the two runs sampled different tokens."""
    found = metrics.first_token_divergence(a, b)
    return None if found is None else Point(*found)


def first_logits_difference(a: Trace, b: Trace, until: Point | None = None) -> Point | None:
    """First (step, stream) where logits differ bitwise, looking only where inputs are identical:
    every step before `until`, and at `until.step` the streams up to and including `until.stream`."""
    n = min(a.steps, b.steps) if until is None else min(until.step + 1, a.steps, b.steps)
    for step in range(n):
        if a.digests[step] == b.digests[step]:
            continue
        last = a.streams.index(until.stream) if until is not None and step == until.step else len(a.streams) - 1
        for stream in a.streams[: last + 1]:
            if not np.array_equal(a.logits(stream)[step], b.logits(stream)[step]):
                return Point(step, stream)
    return None


def drift_entry(m: metrics.StepMetrics, backend: str, vs: str, mode: str, tol: float) -> dict:
    """One `drift` record of report.json: per-stream summaries of every metric."""
    summaries = metrics.summarize_metrics(m)
    return {"backend": backend, "vs": vs, "mode": mode, "steps": int(m.max_abs.shape[0]), "tolerance": tol,
            "max_abs": float(m.max_abs.max(initial=0.0)),
            "top1_agreement": float(m.top1.mean()) if m.top1.size else 1.0,
            "streams": {s: {k: v.to_dict() for k, v in per.items()} for s, per in summaries.items()}}


def repeatability(label: str, runs: list[Trace]) -> Repeatability:
    """Bitwise repeatability of `runs` (repeats of one backend, same seed and inputs)."""
    if len(runs) < 2:
        return Repeatability(label, len(runs), None, None, digests=tuple(r.digests[-1] if r.digests else None
                                                                        for r in runs),
                             steps=tuple(r.steps for r in runs))
    logits_point, token_point, drift = None, None, 0.0
    for other in runs[1:]:
        tokens = first_token_divergence(runs[0], other)  # a shorter run is a failure, reported elsewhere
        logits = first_logits_difference(runs[0], other, until=tokens)
        drift = max(drift, metrics.same_input_drift(runs[0], other)["max_abs"])
        logits_point = _earliest(logits_point, logits, runs[0].streams)
        token_point = _earliest(token_point, tokens, runs[0].streams)
    return Repeatability(label, len(runs), logits_point is None, token_point is None, logits_point, token_point,
                         drift, tuple(r.digests[-1] if r.digests else None for r in runs),
                         tuple(r.steps for r in runs))


def _order(p: Point, streams: list[str]) -> tuple[int, int]:
    return p.step, streams.index(p.stream) if p.stream in streams else len(streams)


def _earliest(a: Point | None, b: Point | None, streams: list[str]) -> Point | None:
    if a is None or b is None:
        return a or b
    return min(a, b, key=lambda p: _order(p, streams))


@dataclass(frozen=True)
class Onset:
    """Where teacher-forced drift crosses the semantic threshold: a persistent onset and the spikes before it."""

    threshold: float
    onset: Point | None
    onset_max: float | None  # largest drift from the onset on
    share_over: float | None  # share of the steps from the onset on that stay over the threshold
    spikes: tuple[tuple[Point, float], ...]  # (where, drift) of every crossing that did not persist


def persistent_onset(drift: np.ndarray, streams: list[str], threshold: float) -> Onset:
    """The first step whose drift (max over streams) exceeds `threshold` and stays there.

    Persistence rule: step s is an onset when its drift and the next step's exceed the threshold
    and so do at least `PERSISTENCE` of the steps from s to the end of the run. A crossing that
    does not persist is a spike: a numeric event at that step (so is a crossing on the last step,
    which nothing can confirm). NaN drift counts as over the threshold.
    """
    d = np.where(np.isnan(drift), np.inf, drift) if drift.size else drift
    per_step = d.max(axis=1) if d.size else np.zeros(0)
    over = per_step > threshold
    left = np.cumsum(over[::-1])[::-1]  # steps over the threshold from s to the end
    spikes = []
    for s in np.flatnonzero(over):
        s = int(s)
        col = int(np.argmax(d[s] > threshold))
        point = Point(s, streams[col])
        remaining = len(over) - s
        if s + 1 < len(over) and over[s + 1] and left[s] >= math.ceil(PERSISTENCE * remaining):
            return Onset(threshold, point, float(per_step[s:].max()), float(left[s] / remaining), tuple(spikes))
        spikes.append((point, float(per_step[s])))
    return Onset(threshold, None, None, None, tuple(spikes))


def arbiter_distance(arbiter: Trace, run: Trace) -> dict:
    """max and median (over steps) of the per-step max |Δlogit| of `run` against the arbiter, on identical inputs."""
    m = metrics.step_metrics(arbiter, run)
    per_step = m.max_abs.max(axis=1) if m.max_abs.size else np.zeros(0)
    return {"max_abs": float(per_step.max(initial=0.0)),
            "median_abs": float(np.median(per_step)) if per_step.size else 0.0, "steps": int(per_step.size)}


def arbiter_comparison(spec: str, ref_label: str, ref: dict, label: str, other: dict) -> dict:
    """Which of two backends is closer to the arbiter (by the median distance), and by how much."""
    a, b = other["median_abs"], ref["median_abs"]
    if a == b:
        ratio, closer = 1.0, None
    elif b == 0.0:
        ratio, closer = math.inf, ref_label
    else:
        ratio, closer = a / b, ref_label if a > b else label
    return {"spec": spec, "backend": label, "vs": ref_label, "backend_median": a, "reference_median": b,
            "backend_max": other["max_abs"], "reference_max": ref["max_abs"],
            "ratio": None if math.isinf(ratio) else ratio, "closer": closer}


def diagnose(ref: BackendRuns, other: BackendRuns, tolerance: float, window: int,
             arbiter: dict | None = None) -> tuple[Verdict, list[dict]]:
    """The verdict for `other` against `ref` and the drift records (teacher-forced and portable) behind it.

    `window` is max-delay + 2: an onset inside it is "from the first steps" (weights, config, delays,
    alignment); later it is a cache, context or position bug. `arbiter` is `arbiter_comparison`'s result.
    """
    holds: dict[str, Point | None] = {}
    failed = _failure(ref, other)
    if failed:
        holds["BACKEND_FAILED"], error = failed
        return _verdict(other.label, ref.label, holds, [], {"error": error}), []
    streams = ref.native[0].streams
    rep, rep_ref = repeatability(other.label, other.native), repeatability(ref.label, ref.native)
    measured = [r.run_to_run_drift for r in (rep, rep_ref) if r.run_to_run_drift is not None]
    rr = max(measured) if measured else None
    forced = metrics.step_metrics(ref.native[0], other.forced)
    portable = metrics.step_metrics(ref.portable, other.portable)
    drift = [drift_entry(forced, other.label, ref.label, "forced", tolerance),
             drift_entry(portable, other.label, ref.label, "portable", tolerance)]
    fd = forced.max_abs
    forced_max = float(np.nanmax(fd)) if fd.size and not np.isnan(fd).all() else 0.0
    figures: dict = dict(tolerance=tolerance, run_to_run_drift=rep.run_to_run_drift,
                         reference_run_to_run_drift=rep_ref.run_to_run_drift, runs=rep.runs,
                         steps=int(fd.shape[0]), forced_max_abs=forced_max,
                         forced_median_abs=float(np.median(fd.max(axis=1))) if fd.size else 0.0,
                         tolerance_units=forced_max / tolerance if tolerance > 0 else None,
                         within_tolerance=forced_max <= tolerance, window=window)
    if forced_max > tolerance:
        over = np.argwhere(fd > tolerance)[0]
        figures["first_beyond_tolerance"] = Point(int(over[0]), streams[int(over[1])]).to_dict()
        s, c = np.unravel_index(int(np.nanargmax(fd)), fd.shape)
        figures["max_at"] = Point(int(s), streams[int(c)]).to_dict()
    on = persistent_onset(fd, streams, SEMANTIC_FACTOR * max(tolerance, rr or 0.0))
    figures["semantic_threshold"] = on.threshold
    figures["context"] = context_length(ref.native[0].meta)  # an onset exactly there is the attention window
    if on.onset is not None:
        holds["SEMANTIC_MISMATCH"] = on.onset
        figures.update(onset=on.onset.to_dict(), onset_max_abs=on.onset_max, onset_share_over=on.share_over,
                       onset_before=float(fd[: on.onset.step].max()) if on.onset.step else None)
    if on.spikes:
        figures["spikes"] = [{"step": p.step, "stream": p.stream, "max_abs": x} for p, x in on.spikes]
        after = fd[on.spikes[0][0].step + 1:]
        figures["spike_after_median"] = float(np.median(after.max(axis=1))) if after.size else None
    if rep.measured and not rep.logits_identical:
        holds["NONDETERMINISTIC_KERNELS"] = rep.first_logits_difference
    elif rep.measured and not rep.tokens_identical:
        holds["NONDETERMINISTIC_SAMPLER"] = rep.first_token_difference
    n = first_token_divergence(ref.native[0], other.native[0])
    p = first_token_divergence(ref.portable, other.portable)
    ids = [t.meta.get("sampler", {}).get("identity") for t in (ref.native[0], other.native[0])]
    shared = shares_sampler(*ids)
    knob = compile_difference(ref.native[0].meta, other.native[0].meta)
    if knob is not None:
        figures["compile"] = knob
    figures.update(native_divergence=None if n is None else n.to_dict(),
                   portable_divergence=None if p is None else p.to_dict(),
                   shared_sampler=shared, reference_sampler=ids[0], backend_sampler=ids[1])
    if p is not None:
        k = streams.index(p.stream)
        figures.update(delta_at_divergence=float(portable.max_abs[p.step, k]),
                       margin_at_divergence=float(min(portable.margin_a[p.step, k], portable.margin_b[p.step, k])),
                       explained_by_drift=metrics.drift_explains(float(portable.max_abs[p.step, k]),
                                                                 float(portable.margin_a[p.step, k]),
                                                                 float(portable.margin_b[p.step, k])))
    if n is not None:
        figures["native_delta_at_divergence"] = metrics.max_abs_at(ref.native[0], other.native[0], n.step, n.stream)
    causes = []
    if p is not None and (n is None or _order(p, streams) <= _order(n, streams)):
        causes.append(("portable", p))
    if n is not None and shared:
        causes.append(("native", n))
    if on.spikes and (on.onset is None or on.spikes[0][0].step < on.onset.step):
        causes.append(("spike", on.spikes[0][0]))
    findings: list[Finding] = []
    if causes:
        cause, point = min(causes, key=lambda c: _order(c[1], streams))
        holds["NUMERIC_DIVERGENCE"] = point
        figures["numeric_cause"] = cause
    if n is not None and not shared and (p is None or _order(p, streams) > _order(n, streams)):
        holds["SAMPLER_DIVERGENCE"] = n
        if p is not None:
            findings.append(Finding("NUMERIC_DIVERGENCE", p, f"portable runs diverge later, at {p}"))
    if n is not None and not shared and "SAMPLER_DIVERGENCE" not in holds:
        findings.append(Finding("SAMPLER_DIVERGENCE", n, "the native samplers differ too: native tokens would "
                                                         "differ at some point even on equal logits"))
    bitwise = (forced_max == 0.0 and ref.portable.digests == other.portable.digests
               and ref.native[0].digests == other.native[0].digests)
    if n is None and p is None and "NUMERIC_DIVERGENCE" not in holds:
        holds["IDENTICAL" if bitwise else "NUMERIC_DRIFT"] = None
    verdict = _first(holds)
    if forced_max > tolerance and verdict not in ("SEMANTIC_MISMATCH", "NUMERIC_DRIFT"):
        findings.append(Finding("NUMERIC_DRIFT", Point.from_dict(figures["first_beyond_tolerance"]),
                                f"beyond tolerance: max |Δlogit| {forced_max:.3g} is {times(forced_max / tolerance)} "
                                f"the tolerance of {tolerance:g}"))
    if arbiter is not None:
        figures["arbiter"] = arbiter
    return _verdict(other.label, ref.label, holds, findings, figures), drift


def _first(holds: dict) -> str:
    return next(v for v in VERDICTS if v in holds)


def _failure(ref: BackendRuns, other: BackendRuns) -> tuple[Point | None, str] | None:
    for runs in (ref, other):
        if runs.status != "ok" or runs.failures or not runs.native or runs.portable is None or (
                runs is other and runs.forced is None):
            f = runs.failures[0] if runs.failures else {}
            at = f.get("failed_at")
            point = Point(at["step"], at.get("stream")) if at else None  # stream None: the process died mid-step
            return point, f.get("error") or runs.error or "a run is missing"
    return None


def _verdict(label: str, vs: str, holds: dict, findings: list[Finding], figures: dict) -> Verdict:
    ordered = [v for v in VERDICTS if v in holds]
    secondary = [Finding(v, holds[v]) for v in ordered[1:]] + findings
    verdict = Verdict(label, vs, ordered[0], holds[ordered[0]], tuple(secondary), figures)
    return replace(verdict, recorded_explanation=explain(verdict))
