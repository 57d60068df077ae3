"""The diagnosis (docs/design.md, Verdict rules): repeatability, first divergences and one verdict per backend.

Pure functions on loaded traces: no framework, no I/O beyond reading the traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .trace import Trace

VERDICTS = ("BACKEND_FAILED", "SEMANTIC_MISMATCH", "NONDETERMINISTIC_KERNELS", "NONDETERMINISTIC_SAMPLER",
            "NUMERIC_DIVERGENCE", "SAMPLER_DIVERGENCE", "NUMERIC_DRIFT", "IDENTICAL")
SEMANTIC_FACTOR = 100.0


@dataclass(frozen=True)
class Point:
    """A (step, stream) position in a run."""

    step: int
    stream: str | None

    def to_dict(self) -> dict:
        return {"step": self.step, "stream": self.stream}


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
        for k, stream in enumerate(a.streams[: last + 1]):
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


def repeatability(label: str, runs: list[Trace]) -> dict:
    """Are repeats of one backend bitwise identical in logits (on identical inputs) and tokens?"""
    logits_point, token_point, drift = None, None, 0.0
    for other in runs[1:]:
        tokens = first_token_divergence(runs[0], other)  # a shorter run is a failure, reported elsewhere
        logits = first_logits_difference(runs[0], other, until=tokens)
        drift = max(drift, metrics.same_input_drift(runs[0], other)["max_abs"])
        logits_point = _earliest(logits_point, logits, runs[0].streams)
        token_point = _earliest(token_point, tokens, runs[0].streams)
    first = _earliest(logits_point, token_point, runs[0].streams) if runs else None
    return {
        "backend": label, "runs": len(runs),
        "logits_identical": logits_point is None, "tokens_identical": token_point is None,
        "first_nondeterministic_step": None if first is None else first.step,
        "first_nondeterministic_stream": None if first is None else first.stream,
        "first_logits_difference": None if logits_point is None else logits_point.to_dict(),
        "first_token_difference": None if token_point is None else token_point.to_dict(),
        "run_to_run_drift": drift,
        "digests": [r.digests[-1] if r.digests else None for r in runs],
        "steps": [r.steps for r in runs],
    }


def _earliest(a: Point | None, b: Point | None, streams: list[str]) -> Point | None:
    if a is None or b is None:
        return a or b
    return min(a, b, key=lambda p: (p.step, streams.index(p.stream)))


def diagnose(ref: BackendRuns, other: BackendRuns, tolerance: float, window: int) -> tuple[dict, list[dict]]:
    """The verdict for `other` against `ref` (docs/design.md, Verdict rules), the first rule that holds with the others as
    findings, and the drift records (teacher-forced and portable) behind it."""
    holds: dict[str, Point | None] = {}
    failed = _failure(ref, other)
    if failed:
        holds["BACKEND_FAILED"], error = failed
        return _verdict(other.label, ref.label, holds, {"error": error}), []
    figures: dict = {}
    rep = repeatability(other.label, other.native)
    rr = rep["run_to_run_drift"]
    forced = metrics.step_metrics(ref.native[0], other.forced)
    portable = metrics.step_metrics(ref.portable, other.portable)
    drift = [drift_entry(forced, other.label, ref.label, "forced", tolerance),
             drift_entry(portable, other.label, ref.label, "portable", tolerance)]
    forced_drift = forced.max_abs
    figures.update(tolerance=tolerance, run_to_run_drift=rr, steps=int(forced_drift.shape[0]),
                   forced_max_abs=float(forced_drift.max()) if forced_drift.size else 0.0,
                   forced_rms_of_step_max=float(np.sqrt(np.mean(forced_drift**2))) if forced_drift.size else 0.0)
    threshold = SEMANTIC_FACTOR * max(tolerance, rr)
    early = forced_drift[:window]
    over = np.argwhere(early > threshold)
    if over.size:
        s, k = over[0]
        figures["semantic_window"] = window
        figures["semantic_max_abs"] = float(early.max())
        holds["SEMANTIC_MISMATCH"] = Point(int(s), ref.native[0].streams[int(k)])
    if not rep["logits_identical"]:
        holds["NONDETERMINISTIC_KERNELS"] = _point(rep["first_logits_difference"])
    elif not rep["tokens_identical"]:
        holds["NONDETERMINISTIC_SAMPLER"] = _point(rep["first_token_difference"])
    n = first_token_divergence(ref.native[0], other.native[0])
    p = first_token_divergence(ref.portable, other.portable)
    figures["native_divergence"] = None if n is None else n.to_dict()
    figures["portable_divergence"] = None if p is None else p.to_dict()
    if p is not None:
        k = ref.portable.streams.index(p.stream)
        figures.update(delta_at_divergence=float(portable.max_abs[p.step, k]),
                       margin_at_divergence=float(min(portable.margin_a[p.step, k], portable.margin_b[p.step, k])),
                       explained_by_drift=metrics.drift_explains(float(portable.max_abs[p.step, k]),
                                                                 float(portable.margin_a[p.step, k]),
                                                                 float(portable.margin_b[p.step, k])))
    if p is not None and (n is None or (p.step, _idx(ref, p)) <= (n.step, _idx(ref, n))):
        holds["NUMERIC_DIVERGENCE"] = p
    if n is not None and (p is None or (p.step, _idx(ref, p)) > (n.step, _idx(ref, n))):
        holds["SAMPLER_DIVERGENCE"] = n
    bitwise = (figures["forced_max_abs"] == 0.0 and ref.portable.digests == other.portable.digests
               and ref.native[0].digests == other.native[0].digests)
    if n is None and p is None:
        holds["IDENTICAL" if bitwise else "NUMERIC_DRIFT"] = None
    figures["within_tolerance"] = figures["forced_max_abs"] <= tolerance
    return _verdict(other.label, ref.label, holds, figures), drift


def _idx(runs: BackendRuns, p: Point) -> int:
    return runs.native[0].streams.index(p.stream)


def _point(d: dict | None) -> Point | None:
    return None if d is None else Point(d["step"], d["stream"])


def _failure(ref: BackendRuns, other: BackendRuns) -> tuple[Point | None, str] | None:
    for runs in (ref, other):
        if runs.status != "ok" or runs.failures or not runs.native or runs.portable is None or (
                runs is other and runs.forced is None):
            f = runs.failures[0] if runs.failures else {}
            at = f.get("failed_at")
            point = Point(at["step"], at.get("stream")) if at else None  # stream None: the process died mid-step
            return point, f.get("error") or runs.error or "a run is missing"
    return None


def _verdict(label: str, vs: str, holds: dict, figures: dict) -> dict:
    ordered = [v for v in VERDICTS if v in holds]
    verdict = ordered[0]
    def where(point: Point | None) -> dict | None:
        return None if point is None else point.to_dict()

    return {"backend": label, "vs": vs, "verdict": verdict, "first_divergence": where(holds[verdict]),
            "secondary": [{"verdict": v, "first_divergence": where(holds[v])} for v in ordered[1:]],
            "figures": figures}


def explain(v: dict) -> str:
    """One paragraph, with the numbers, that says why the verdict was reached."""
    f, who, ref = v["figures"], v["backend"], v["vs"]
    at = v["first_divergence"]
    where = (f"step {at['step']}, stream {at['stream'] or 'unknown: the process died mid-step'}" if at
             else "no single step")
    tol = f.get("tolerance", 0.0)
    name = v["verdict"]
    if name == "BACKEND_FAILED":
        return (f"{who} could not complete its runs ({where}): {f.get('error', 'unknown error').rstrip('.')}. "
                "Whatever steps it completed are kept in its traces; nothing else can be concluded for it.")
    forced = (f"Teacher-forced onto {ref}'s tokens, its logits differ by at most {f['forced_max_abs']:.3g} "
              f"over {f['steps']} steps (tolerance {tol:g}; its own run-to-run drift {f['run_to_run_drift']:.3g}).")
    if name == "SEMANTIC_MISMATCH":
        return (f"Teacher-forced onto {ref}'s tokens, {who}'s logits already differ by up to {f['semantic_max_abs']:.3g} "
                f"within the first {f['semantic_window']} steps (first beyond {SEMANTIC_FACTOR:g}x tolerance at {where}): "
                f"{f['semantic_max_abs'] / max(tol, 1e-30):.0f}x the tolerance of {tol:g} and far above its own run-to-run "
                f"drift of {f['run_to_run_drift']:.3g}. Kernels do not do that: the two runs differ in weights, config, "
                "delays or input alignment. Check the model digests and the alignment recorded in both traces.")
    if name == "NONDETERMINISTIC_KERNELS":
        return (f"Two runs of {who} on identical inputs gave different logits, first at {where} "
                f"(run-to-run drift up to {f['run_to_run_drift']:.3g}): its kernels are not bitwise reproducible "
                "(e.g. GPU reductions), so every comparison with it carries that noise. " + forced)
    if name == "NONDETERMINISTIC_SAMPLER":
        return (f"{who}'s repeats with the same seed have bitwise-identical logits up to {where}, yet sample "
                "different tokens there: its sampler's seeding or RNG is not deterministic. " + forced)
    if name == "NUMERIC_DIVERGENCE":
        verdict = "explains" if f.get("explained_by_drift") else "does not explain"
        native = f["native_divergence"]
        return (f"With the portable sampler, whose decisions depend only on the logits and on (seed, step, stream), "
                f"tokens first differ at {where}. There |Δlogit| is {f['delta_at_divergence']:.3g} against a decision "
                f"margin of {f['margin_at_divergence']:.3g}: numeric drift {verdict} the flip. "
                + (f"Native runs diverge at step {native['step']} ({native['stream']}). " if native else
                   "Native runs do not diverge. ") + forced)
    if name == "SAMPLER_DIVERGENCE":
        portable = f["portable_divergence"]
        return (f"Native runs first differ at {where}, while the portable sampler keeps both backends on the same "
                f"tokens {'through all ' + str(f['steps']) + ' steps' if not portable else 'until step ' + str(portable['step'])}. "
                + forced + " Same logits, different native samplers: compare with the portable sampler, not token by token.")
    if name == "NUMERIC_DRIFT":
        state = "within" if f.get("within_tolerance") else "BEYOND"
        return (f"No token differs in any mode over {f['steps']} steps, but logits are not bitwise equal: max |Δlogit| "
                f"{f['forced_max_abs']:.3g}, {state} the tolerance of {tol:g}.")
    return f"Bitwise-equal logits and tokens in every mode (native, portable, teacher-forced) over {f['steps']} steps."
