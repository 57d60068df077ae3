"""One paragraph per verdict, with the numbers behind it.

Rules every sentence here keeps: nothing the figures contradict (no "same logits" when the drift
is beyond tolerance), drift beyond tolerance always stated with its size in tolerance units, and
nothing unmeasured printed as a number ("not measured: one run").
"""

from __future__ import annotations

from ..advisories import sentence
from ..results import NOT_MEASURED, Point, Verdict, times, where
from ..samplers import describe_identity


def _num(x) -> str:
    return NOT_MEASURED if x is None else f"{x:.3g}"


def drift_sentence(v: Verdict) -> str:
    """Teacher-forced drift against the tolerance and the run-to-run drift."""
    f, tol = v.figures, v.figures.get("tolerance", 0.0)
    size = f["forced_max_abs"]
    state = (f"within the tolerance of {tol:g}" if size <= tol else
             f"{times(size / tol) if tol > 0 else 'infinitely'} the tolerance of {tol:g}: BEYOND tolerance")
    return (f"Teacher-forced onto {v.vs}'s tokens, {v.backend}'s logits differ by at most {size:.3g} over "
            f"{f['steps']} steps ({state}; run-to-run drift {_num(f.get('run_to_run_drift'))}).")


def arbiter_sentence(v: Verdict) -> str:
    a = v.figures.get("arbiter")
    if not a:
        return ""
    head = (f"Against the numeric arbiter ({a['spec']}, teacher-forced on {a['vs']}'s tokens), the median per-step "
            f"max |Δlogit| is {a['backend_median']:.3g} for {a['backend']} and {a['reference_median']:.3g} for {a['vs']}")
    if a["closer"] is None:
        return head + ": both are equally close to exact arithmetic."
    farther = a["backend"] if a["closer"] == a["vs"] else a["vs"]
    ratio = a["ratio"] if a["closer"] == a["vs"] else (1.0 / a["ratio"] if a["ratio"] else None)
    return head + f": {farther} is {times(ratio)} further from {a['spec'].split(':')[-1]} than {a['closer']}."


def explain(v: Verdict) -> str:
    """Why the verdict was reached, with its numbers; secondary findings are stated too."""
    text = _main(v)
    extra = [s for s in v.secondary if s.verdict == "NUMERIC_DRIFT" and s.note]
    if extra and v.verdict not in ("BACKEND_FAILED",):
        text += f" Also: the teacher-forced drift is {extra[0].note} (first at {extra[0].at}): it needs attention too."
    arb = arbiter_sentence(v) if v.verdict != "BACKEND_FAILED" else ""
    knob = (v.figures.get("compile") or {}).get("note") if v.verdict != "BACKEND_FAILED" else None
    return (text + (" " + arb if arb else "") + sentence(v.figures.get("known_issues") or [])
            + (f" Note: {knob}." if knob else ""))


def _main(v: Verdict) -> str:
    f, who, ref = v.figures, v.backend, v.vs
    at = where(v.first_divergence, none="no single step")
    tol = f.get("tolerance", 0.0)
    name = v.verdict
    if name == "BACKEND_FAILED":
        return (f"{who} could not complete its runs ({at}): {str(f.get('error', 'unknown error')).rstrip('.')}. "
                "Whatever steps it completed are kept in its traces; nothing else can be concluded for it.")
    forced = drift_sentence(v)
    if name == "SEMANTIC_MISMATCH":
        onset = Point.from_dict(f["onset"])
        before = f.get("onset_before")
        if onset.step == f.get("context"):
            cause = (f"from step {onset.step} on, exactly the model's context length ({f['context']}): the first step "
                     "whose attention drops the oldest key. An attention window or KV-cache bug (a window one key "
                     "too wide or too narrow, a ring cache that wraps wrongly), not kernels.")
        elif onset.step < f.get("window", 0):
            cause = ("from the first steps: the two runs differ in weights, config, delays or input alignment. "
                     "Check the model digests and the alignment recorded in both traces.")
        else:
            cause = (f"from step {onset.step} on, after {onset.step} steps of agreement (drift up to "
                     f"{_num(before)} before): a cache, context or position bug, not kernels.")
        return (f"Teacher-forced onto {ref}'s tokens, {who}'s logits jump past {f['semantic_threshold']:.3g} "
                f"(100x the larger of the tolerance {tol:g} and the run-to-run drift) at {onset} and stay there "
                f"({f['onset_share_over']:.0%} of the steps from it on; up to {f['onset_max_abs']:.3g}, "
                f"{times(f['onset_max_abs'] / tol) if tol > 0 else 'infinitely'} the tolerance). Kernels do not do "
                f"that; the mismatch persists {cause}")
    if name == "NONDETERMINISTIC_KERNELS":
        return (f"Two runs of {who} on identical inputs gave different logits, first at {at} "
                f"(run-to-run drift up to {_num(f.get('run_to_run_drift'))}): its kernels are not bitwise "
                "reproducible (e.g. GPU reductions), so every comparison with it carries that noise. " + forced)
    if name == "NONDETERMINISTIC_SAMPLER":
        return (f"{who}'s repeats with the same seed have bitwise-identical logits up to {at}, yet sample "
                "different tokens there: its sampler's seeding or RNG is not deterministic. " + forced)
    if name == "NUMERIC_DIVERGENCE":
        return _numeric(v, at) + " " + forced
    if name == "SAMPLER_DIVERGENCE":
        portable = f.get("portable_divergence")
        samplers = (f"{who} samples with {describe_identity(f.get('backend_sampler'))}, {ref} with "
                    f"{describe_identity(f.get('reference_sampler'))}")
        head = (f"Native runs first differ at {at}, and the native samplers differ ({samplers}), while the "
                f"portable sampler keeps both backends on the same tokens "
                f"{'through all ' + str(f['steps']) + ' steps' if not portable else 'until ' + where(portable)}. ")
        if f.get("within_tolerance"):
            tail = (" The logits agree within tolerance, so the native tokens differ because the samplers do: "
                    "compare with the portable sampler, not token by token.")
        else:
            tail = " The samplers explain the native divergence, but the logits themselves drift beyond tolerance."
        return head + forced + tail
    if name == "NUMERIC_DRIFT":
        return (f"No token differs in any mode over {f['steps']} steps, but logits are not bitwise equal. " + forced)
    return f"Bitwise-equal logits and tokens in every mode (native, portable, teacher-forced) over {f['steps']} steps."


def _numeric(v: Verdict, at: str) -> str:
    f, who, ref = v.figures, v.backend, v.vs
    cause = f.get("numeric_cause")
    if cause == "native":
        return (f"Both backends sample natively with the same sampler ({describe_identity(f.get('backend_sampler'))}) "
                f"and the same seed, so only the logits can make their tokens differ: native tokens first differ at "
                f"{at}, where |Δlogit| is {f['native_delta_at_divergence']:.3g}."
                + (f" The portable runs diverge at {where(f.get('portable_divergence'))}."
                   if f.get("portable_divergence") else " The portable runs do not diverge."))
    if cause == "spike":
        spike = f["spikes"][0]
        after = f.get("spike_after_median")
        return (f"Teacher-forced drift spikes to {spike['max_abs']:.3g} at {at}, past the threshold of "
                f"{f['semantic_threshold']:.3g} (100x the larger of the tolerance and the run-to-run drift), and "
                f"returns to baseline (median per-step drift after it: {_num(after)}): a numeric event at that step "
                "(e.g. a kernel glitch), not a persistent semantic change.")
    native = f.get("native_divergence")
    explained = f.get("explained_by_drift")
    verdict = "explains" if explained else "does not explain" if explained is False else "cannot say whether it explains"
    return (f"With the portable sampler, whose decisions depend only on the logits and on (seed, step, stream), "
            f"tokens first differ at {at}. There |Δlogit| is {f['delta_at_divergence']:.3g} against a decision "
            f"margin of {f['margin_at_divergence']:.3g}: numeric drift {verdict} the flip. "
            + (f"Native runs diverge at {where(native)}." if native else "Native runs do not diverge."))
