"""The diagnosis: repeatability, first divergences, onsets and one verdict per backend.

Pure functions on loaded traces: no framework, no I/O beyond reading the traces. The rules (the
first that holds is the verdict, every other one a secondary finding; docs/design.md, Verdict rules):

1. BACKEND_FAILED: a crash, timeout, NaN/Inf logits or a zero-probability pick in any run.
2. SEMANTIC_MISMATCH: on identical inputs (teacher-forced, and the native runs before their tokens
   part) the distributions the sampler draws from go over the semantic threshold
   (`tolerances.over_threshold`, on `metrics.visible_metrics`) in some stream, persistently from an
   onset (`persistent_onset`: per stream, holes and alternation persist); the cause is named only
   where `evidence.semantic_evidence` shows it.
3. NONDETERMINISTIC_KERNELS / 4. NONDETERMINISTIC_SAMPLER: the backend's own repeats differ.
5. NUMERIC_DIVERGENCE at the earliest of: the portable divergence p when p <= n (or no n); the
   native divergence n when both native runs declare one sampler and their logits are not bitwise
   equal on the identical inputs up to n; a spike over the threshold that does not persist.
6. SAMPLER_DIVERGENCE: n exists, the portable runs still agree at n, and the native samplers differ
   (or one is unrecorded), or the logits were bitwise equal up to n whatever was declared.
7. NUMERIC_DRIFT: no token differs, logits not bitwise equal. 8. IDENTICAL: bitwise equal. Neither
   holds when any other rule does.

Drift beyond tolerance is always a finding (the verdict, or a secondary NUMERIC_DRIFT finding
with its size in tolerance units). A numeric arbiter (a `cpu:fp64` run teacher-forced on the
reference's tokens) says which side of a disagreement is closer to exact arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import metrics
from .evidence import fed_differently, semantic_evidence
from .explain import explain
from ..results import VERDICTS, Finding, Point, Repeatability, Verdict, times
from ..samplers import shares_sampler
from ..store.trace import Trace
from ..tolerances import CONCENTRATED, CONCENTRATED_SHARE, GROSS, NOISE_FLOOR, over_threshold
from .context import context_length
from .knobs import compile_difference



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


PERSISTENCE = 0.5  # share of a stream's observed steps, from an onset, that stay over (holes and alternation persist)
CONFIRM = 8  # ... and of the first CONFIRM of them: an onset is followed by more crossings, not one in 30 steps


@dataclass(frozen=True)
class Onset:
    """Where sampler-visible distance goes over the semantic threshold and stays: per-stream onsets and spikes."""

    onset: Point | None  # the earliest stream onset in decision order
    onsets: tuple[tuple[Point, float], ...]  # every stream's onset and its share of observed steps over from it
    spikes: tuple[Point, ...]  # crossings that belong to no persistent run of their stream
    source: str | None = None  # forced | native: which identical-input runs show the onset


def _stream_onset(over: np.ndarray, observed: np.ndarray, truncated: bool) -> tuple[int | None, float | None]:
    """The first over step of one stream from which it stays over on most observed steps (see `persistent_onset`)."""
    steps = np.flatnonzero(observed)
    flags = over[steps]
    for i in np.flatnonzero(flags):
        rest = flags[i:]
        window = rest[:CONFIRM]
        enough = rest.sum() >= 2 or (truncated and rest.size == 1)
        if enough and window.sum() >= math.ceil(PERSISTENCE * window.size) and rest.sum() >= math.ceil(
                PERSISTENCE * rest.size):
            return int(steps[i]), float(rest.mean())
    return None, None


def persistent_onset(over: np.ndarray, streams: list[str], observed: np.ndarray | None = None,
                     truncated: bool = False) -> Onset:
    """Per stream, the first step over the threshold from which the stream stays over.

    Rule: step s is stream k's onset when k is over at s and, over k's observed steps from s on, at
    least `PERSISTENCE` of them are over, as are that share of the first `CONFIRM` of them, and at
    least two are (one suffices when `truncated`: the observation ends there because tokens parted,
    as the native runs' identical-input prefix does). Holes and alternate steps therefore persist;
    one crossing that nothing follows is a spike. The onset is the earliest stream onset in decision
    order; every crossing of a stream before its own onset (or of a stream with none) is a spike.
    """
    over = np.asarray(over, dtype=bool)
    observed = np.ones(over.shape, dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
    over = over & observed
    onsets, spikes = [], []
    for k, stream in enumerate(streams):
        s, share = _stream_onset(over[:, k], observed[:, k], truncated)
        if s is not None:
            onsets.append((Point(s, stream), share))
        end = over.shape[0] if s is None else s
        spikes += [Point(int(t), stream) for t in np.flatnonzero(over[:end, k])]
    order = {st: i for i, st in enumerate(streams)}
    onsets.sort(key=lambda o: (o[0].step, order[o[0].stream]))
    spikes.sort(key=lambda p: (p.step, order[p.stream]))
    return Onset(onsets[0][0] if onsets else None, tuple(onsets), tuple(spikes))


def arbiter_distance(arbiter: Trace, run: Trace) -> dict:
    """max and median (over steps) of the per-step max |Δlogit| of `run` against the arbiter, on identical inputs."""
    m = metrics.step_metrics(arbiter, run)
    per_step = m.max_abs.max(axis=1) if m.max_abs.size else np.zeros(0)
    return {"max_abs": float(per_step.max(initial=0.0)),
            "median_abs": float(np.median(per_step)) if per_step.size else 0.0, "steps": int(per_step.size)}


def arbiter_comparison(spec: str, ref_label: str, ref: dict, label: str, other: dict,
                       reference_spec: str | None = None) -> dict:
    """Which of two backends is closer to the arbiter (by the median distance), and by how much.
    A reference that runs the arbiter's own spec is the arbiter: then only the backend's distance counts."""
    a, b = other["median_abs"], ref["median_abs"]
    if reference_spec is not None and str(reference_spec) == str(spec):
        ratio, closer = None, ref_label if a > b else None
        return {"spec": spec, "backend": label, "vs": ref_label, "backend_median": a, "reference_median": b,
                "backend_max": other["max_abs"], "reference_max": ref["max_abs"], "ratio": None,
                "closer": closer, "reference_is_arbiter": True}
    if a == b:
        ratio, closer = 1.0, None
    elif b == 0.0:
        ratio, closer = math.inf, ref_label
    else:
        ratio, closer = a / b, ref_label if a > b else label
    return {"spec": spec, "backend": label, "vs": ref_label, "backend_median": a, "reference_median": b,
            "backend_max": other["max_abs"], "reference_max": ref["max_abs"],
            "ratio": None if math.isinf(ratio) else ratio, "closer": closer}


def identical_input_mask(a: Trace, b: Trace, until: Point | None) -> tuple[int, np.ndarray]:
    """(steps, `[steps, streams]` mask) of the decisions two free runs took on identical inputs: every
    step before their first token difference `until`, and at it the streams up to and including its stream."""
    n = min(a.steps, b.steps) if until is None else min(until.step + 1, a.steps, b.steps)
    mask = np.ones((n, len(a.streams)), dtype=bool)
    if until is not None and n == until.step + 1:
        mask[until.step, a.streams.index(until.stream) + 1:] = False
    return n, mask


def _nanmax(x: np.ndarray) -> float:
    x = np.where(np.isnan(x), np.inf, x)
    return float(x.max(initial=0.0))


def semantic_onset(ref: BackendRuns, other: BackendRuns, tol: float, rr: float | None,
                   n: Point | None) -> tuple[Onset, dict]:
    """The persistent onset over teacher-forced steps and over the native runs' identical-input prefix.

    A native onset counts where the backend's own forced run is not over at that decision (its
    native path computes something else than its forced path on the same inputs)."""
    streams = ref.native[0].streams
    vis = metrics.visible_metrics(ref.native[0], other.forced)
    over = over_threshold(vis.visible, vis.deviation, vis.noise, tol, rr)
    forced = persistent_onset(over, streams)
    steps, observed = identical_input_mask(ref.native[0], other.native[0], n)
    nvis = metrics.visible_metrics(ref.native[0], other.native[0], steps=steps)
    nover = over_threshold(nvis.visible, nvis.deviation, nvis.noise, tol, rr) & observed
    if steps and over.shape[0] >= steps:
        nover &= ~over[:steps]  # where the forced run is over too, the forced run decides
    native = persistent_onset(nover, streams, observed, truncated=n is not None)
    order = {st: i for i, st in enumerate(streams)}
    key = lambda p: (p.step, order[p.stream])  # noqa: E731
    candidates = [(o, "forced") for o in forced.onsets] + [(o, "native") for o in native.onsets]
    candidates.sort(key=lambda c: key(c[0][0]))
    spikes = tuple(sorted(set(forced.spikes) | set(native.spikes), key=key))
    onset = Onset(candidates[0][0][0] if candidates else None, tuple(c[0] for c in candidates), spikes,
                  candidates[0][1] if candidates else None)
    figures = {"visible_max": _nanmax(vis.visible), "visible_median": float(np.median(vis.visible.max(axis=1)))
               if vis.visible.size else 0.0, "tv_max": _nanmax(vis.tv),
               "topk_set_changed_steps": int(vis.topk_changed.any(axis=1).sum()),
               "native_visible_max": _nanmax(np.where(observed, nvis.visible, 0.0)) if steps else 0.0,
               "over_threshold": {"forced": _points(over, streams), "native": _points(nover, streams)}}
    if vis.visible.size:  # how far the most changed token stands out, where the rule looks (visible large enough)
        z = vis.deviation / np.maximum(vis.noise, NOISE_FLOOR * tol)
        gate = np.where(np.isnan(vis.visible), np.inf, vis.visible) > max(CONCENTRATED_SHARE * tol, GROSS * (rr or 0.0))
        figures["concentration_max"] = _nanmax(np.where(gate, z, 0.0))
    return onset, {"vis": vis, "over": over, "native_vis": nvis, "native_over": nover, **figures}


def _points(mask: np.ndarray, streams: list[str], limit: int = 64) -> list[dict]:
    return [Point(int(s), streams[int(k)]).to_dict() for s, k in np.argwhere(mask)[:limit]]


def diagnose(ref: BackendRuns, other: BackendRuns, tolerance: float, window: int,
             arbiter: dict | None = None) -> tuple[Verdict, list[dict]]:
    """The verdict for `other` against `ref` and the drift records (teacher-forced and portable) behind it.

    `window` is max-delay + 2: an onset inside it is "from the first steps". `arbiter` is
    `arbiter_comparison`'s result."""
    holds: dict[str, Point | None] = {}
    failed = _failure(ref, other)
    if failed:
        holds["BACKEND_FAILED"], error = failed
        return _verdict(other.label, ref.label, holds, [], {"error": error}), []
    streams = ref.native[0].streams
    rep, rep_ref = repeatability(other.label, other.native), repeatability(ref.label, ref.native)
    measured = [r.run_to_run_drift for r in (rep, rep_ref) if r.run_to_run_drift is not None]
    rr = max(measured) if measured else None
    tol_eff = max(tolerance, rr or 0.0)
    forced = metrics.step_metrics(ref.native[0], other.forced)
    portable = metrics.step_metrics(ref.portable, other.portable)
    drift = [drift_entry(forced, other.label, ref.label, "forced", tolerance),
             drift_entry(portable, other.label, ref.label, "portable", tolerance)]
    n = first_token_divergence(ref.native[0], other.native[0])
    p = first_token_divergence(ref.portable, other.portable)
    on, seen = semantic_onset(ref, other, tolerance, rr, n)
    fd = forced.max_abs
    forced_max = float(np.nanmax(fd)) if fd.size and not np.isnan(fd).all() else 0.0
    if fd.size and np.isnan(fd).any():
        forced_max = math.inf
    visible_max = seen["visible_max"]
    within = min(forced_max, visible_max) <= tolerance
    figures: dict = dict(tolerance=tolerance, run_to_run_drift=rep.run_to_run_drift,
                         reference_run_to_run_drift=rep_ref.run_to_run_drift, runs=rep.runs,
                         steps=int(fd.shape[0]), forced_max_abs=forced_max if math.isfinite(forced_max) else None,
                         forced_median_abs=float(np.median(fd.max(axis=1))) if fd.size else 0.0,
                         tolerance_units=forced_max / tolerance if tolerance > 0 and math.isfinite(forced_max)
                         else None, within_tolerance=bool(within), window=window,
                         changes_no_decision=bool(forced_max > tolerance and visible_max <= tolerance),
                         semantic_tolerance=tol_eff, semantic_gross=GROSS * tol_eff,
                         semantic_concentration=CONCENTRATED,
                         semantic_concentrated_min=max(CONCENTRATED_SHARE * tolerance, GROSS * (rr or 0.0)),
                         **{k: v for k, v in seen.items() if k not in ("vis", "over", "native_vis", "native_over")})
    figures["free_sampler"] = (ref.portable.meta.get("sampler") or {}).get("mode") or "portable"
    if forced_max > tolerance:
        over = np.argwhere(np.where(np.isnan(fd), np.inf, fd) > tolerance)[0]
        figures["first_beyond_tolerance"] = Point(int(over[0]), streams[int(over[1])]).to_dict()
        s, c = np.unravel_index(int(np.argmax(np.where(np.isnan(fd), np.inf, fd))), fd.shape)
        figures["max_at"] = Point(int(s), streams[int(c)]).to_dict()
    figures["context"] = context_length(ref.native[0].meta)  # an onset exactly there is the attention window
    if on.onset is not None:
        holds["SEMANTIC_MISMATCH"] = on.onset
        k = streams.index(on.onset.stream)
        shown_vis = seen["vis"] if on.source == "forced" else seen["native_vis"]
        share = dict((o.to_dict()["stream"], x) for o, x in on.onsets if o == on.onset)
        figures.update(onset=on.onset.to_dict(), onset_source=on.source,
                       onset_share_over=share.get(on.onset.stream),
                       onsets=[{**o.to_dict(), "share_over": x} for o, x in on.onsets],
                       onset_visible=float(shown_vis.visible[on.onset.step, k]),
                       onset_tv_max=float(shown_vis.tv[on.onset.step:, k].max()),
                       onset_before=float(shown_vis.visible[: on.onset.step, k].max()) if on.onset.step else None)
        shown = seen["over"] if on.source == "forced" else seen["native_over"]
        figures["evidence"] = semantic_evidence(ref, other, on, shown[:, k], tolerance, rr)
    if on.spikes:
        vis = seen["vis"]
        figures["spikes"] = [{"step": q.step, "stream": q.stream,
                              "visible": float(vis.visible[q.step, streams.index(q.stream)])
                              if q.step < vis.visible.shape[0] else None,
                              "max_abs": float(fd[q.step, streams.index(q.stream)]) if q.step < fd.shape[0] else None}
                             for q in on.spikes[:16]]
    if rep.measured and not rep.logits_identical:
        holds["NONDETERMINISTIC_KERNELS"] = rep.first_logits_difference
    elif rep.measured and not rep.tokens_identical:
        holds["NONDETERMINISTIC_SAMPLER"] = rep.first_token_difference
    ids = [t.meta.get("sampler", {}).get("identity") for t in (ref.native[0], other.native[0])]
    declared = shares_sampler(*ids)
    bitwise_at_n = n is not None and first_logits_difference(ref.native[0], other.native[0], until=n) is None
    shared = declared and not bitwise_at_n  # measurement over declaration
    knob = compile_difference(ref.native[0].meta, other.native[0].meta)
    if knob is not None:
        figures["compile"] = knob
    figures.update(native_divergence=None if n is None else n.to_dict(),
                   portable_divergence=None if p is None else p.to_dict(),
                   shared_sampler=declared, reference_sampler=ids[0], backend_sampler=ids[1],
                   native_logits_bitwise_equal=bool(bitwise_at_n) if n is not None else None)
    if bitwise_at_n:  # the logits did not part the tokens: a sampler did, whatever was declared
        figures["reference_sampler_repeatable"] = rep_ref.tokens_identical
        figures["declared_identity_held"] = None if rep_ref.tokens_identical is False else not declared
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
    before_onset = lambda q: on.onset is None or _order(q, streams) < _order(on.onset, streams)  # noqa: E731
    # a flip at or after a semantic onset is the mismatch's consequence, not a finding of its own
    if p is not None and (n is None or _order(p, streams) <= _order(n, streams)) and before_onset(p):
        causes.append(("portable", p))
    if n is not None and shared and before_onset(n):
        causes.append(("native", n))
    if on.spikes and (on.onset is None or _order(on.spikes[0], streams) < _order(on.onset, streams)):
        causes.append(("spike", on.spikes[0]))
    findings: list[Finding] = []
    if causes:
        cause, point = min(causes, key=lambda c: _order(c[1], streams))
        holds["NUMERIC_DIVERGENCE"] = point
        figures["numeric_cause"] = cause
    sampler_made_n = n is not None and (bitwise_at_n or not declared)
    if sampler_made_n and (p is None or _order(p, streams) > _order(n, streams)):
        holds["SAMPLER_DIVERGENCE"] = n
        if p is not None:
            findings.append(Finding("NUMERIC_DIVERGENCE", p, f"the {figures['free_sampler']} free runs diverge later, "
                                                                 f"at {p}"))
    if sampler_made_n and "SAMPLER_DIVERGENCE" not in holds:
        findings.append(Finding("SAMPLER_DIVERGENCE", n, "the native samplers differ too: native tokens would "
                                                         "differ at some point even on equal logits"))
    bitwise = (forced_max == 0.0 and ref.portable.digests == other.portable.digests
               and ref.native[0].digests == other.native[0].digests)
    if n is None and p is None and not holds:  # nothing else holds: only then is there nothing to report
        holds["IDENTICAL" if bitwise else "NUMERIC_DRIFT"] = None
    verdict = _first(holds)
    if not within and verdict not in ("SEMANTIC_MISMATCH", "NUMERIC_DRIFT") and "first_beyond_tolerance" in figures:
        findings.append(Finding("NUMERIC_DRIFT", Point.from_dict(figures["first_beyond_tolerance"]),
                                f"beyond tolerance: max |Δlogit| {forced_max:.3g} is {times(forced_max / tolerance)} "
                                f"the tolerance of {tolerance:g}"))
    if arbiter is not None:
        why = fed_differently(ref.native[0], other.forced, (ref.label, other.label))
        figures["arbiter"] = arbiter if why is None else {**arbiter, "refused": why}
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
