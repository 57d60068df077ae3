"""One paragraph per verdict, with the numbers behind it.

Rules every sentence here keeps: nothing the figures contradict (no "same logits" when the drift
is beyond tolerance), drift beyond tolerance always stated with its size in tolerance units, and
nothing unmeasured printed as a number ("not measured: one run").
"""

from __future__ import annotations

from ..advisories import sentence
from ..results import NOT_MEASURED, Point, Verdict, times, where
from ..samplers import describe_identity
from ..tolerances import NOISE_FLOOR


def _num(x) -> str:
    return NOT_MEASURED if x is None else f"{x:.3g}"


def drift_sentence(v: Verdict) -> str:
    """Teacher-forced drift against the tolerance and the run-to-run drift, raw and as the sampler sees it."""
    f, tol = v.figures, v.figures.get("tolerance", 0.0)
    size = f.get("forced_max_abs")
    seen = f.get("visible_max")
    if size is None:
        return (f"Teacher-forced onto {v.vs}'s tokens, {v.backend}'s logits are not finite at some step "
                f"(run-to-run drift {_num(f.get('run_to_run_drift'))}).")
    if f.get("changes_no_decision"):
        state = (f"{times(size / tol) if tol > 0 else 'infinitely'} the tolerance of {tol:g} in raw logits, but what "
                 f"the sampler sees (after temperature and top-k, less a uniform shift) moves by at most {seen:.3g}, "
                 "within the tolerance" + ("; a change no sampler can see (a shift, or the tail below top-k): it "
                                           "changes no decision" if seen <= NOISE_FLOOR * tol else ""))
    elif size <= tol:
        state = f"within the tolerance of {tol:g}"
    else:
        state = f"{times(size / tol) if tol > 0 else 'infinitely'} the tolerance of {tol:g}: BEYOND tolerance"
    return (f"Teacher-forced onto {v.vs}'s tokens, {v.backend}'s logits differ by at most {size:.3g} over "
            f"{f['steps']} steps ({state}; run-to-run drift {_num(f.get('run_to_run_drift'))}).")


def arbiter_sentence(v: Verdict) -> str:
    a = v.figures.get("arbiter")
    if not a:
        return ""
    if a.get("refused"):
        return f"The numeric arbiter ({a['spec']}) does not arbitrate this pair: {a['refused']}."
    dist = lambda who, m, x: f"{who} median {m:.3g}, max {x:.3g}"  # noqa: E731
    head = (f"Against the numeric arbiter ({a['spec']}, teacher-forced on {a['vs']}'s tokens), per-step max |Δlogit|: "
            f"{dist(a['backend'], a['backend_median'], a['backend_max'])}; "
            f"{dist(a['vs'], a['reference_median'], a['reference_max'])}")
    if a.get("reference_is_arbiter"):
        return head + (f": {a['vs']} runs the arbiter's own spec, so {a['backend']}'s figures are its distance to "
                       f"{a['spec'].split(':')[-1]} arithmetic.")
    if a["closer"] is None:
        return head + ": equally close to exact arithmetic by both median and max." if (
            a["backend_max"] == a["reference_max"]) else head + ": equally close by the median."
    farther = a["backend"] if a["closer"] == a["vs"] else a["vs"]
    ratio = a["ratio"] if a["closer"] == a["vs"] else (1.0 / a["ratio"] if a["ratio"] else None)
    by_max = (a["backend_max"] > a["reference_max"]) == (farther == a["backend"])
    return head + (f": by the median {farther} is {times(ratio)} further from {a['spec'].split(':')[-1]} than "
                   f"{a['closer']}" + ("" if by_max else ", though its max is the smaller") + ".")


def _also(v: Verdict) -> str:
    """Secondary findings that need attention on their own (never one that contradicts the verdict)."""
    out = []
    for s in v.secondary:
        if s.verdict == "NUMERIC_DRIFT" and s.note:
            out.append(f"the teacher-forced drift is {s.note} (first at {s.at})")
        elif s.verdict in ("SEMANTIC_MISMATCH", "NONDETERMINISTIC_KERNELS", "NONDETERMINISTIC_SAMPLER"):
            out.append(f"{s.verdict} at {s.at}")
    for sp in (v.figures.get("spikes") or [])[:3] if v.verdict != "NUMERIC_DIVERGENCE" or \
            v.figures.get("numeric_cause") != "spike" else []:
        out.append(f"a transient over the semantic threshold at {where(sp)} (a secondary spike)")
    return (" Also: " + "; ".join(out) + ": each needs attention.") if out else ""


def explain(v: Verdict) -> str:
    """Why the verdict was reached, with its numbers; secondary findings that need attention are stated too."""
    text = _main(v)
    if v.verdict != "BACKEND_FAILED":
        text += _also(v)
    arb = arbiter_sentence(v) if v.verdict != "BACKEND_FAILED" else ""
    knob = (v.figures.get("compile") or {}).get("note") if v.verdict != "BACKEND_FAILED" else None
    return (text + (" " + arb if arb else "") + sentence(v.figures.get("known_issues") or [])
            + (f" Note: {knob}." if knob else ""))


def free_sampler_name(f: dict) -> str:
    """The comparable free runs' sampler, named as it ran."""
    if f.get("free_sampler") == "candle":
        return "candle's sampler (its TopK replayed bit-exactly on the recorded logits)"
    return "the portable sampler"


def _threshold(f: dict) -> str:
    return (f"over the semantic threshold (sampler-visible |Δlogit| beyond {f.get('semantic_gross', 0):.3g}, or beyond "
            f"{_num(f.get('semantic_concentrated_min'))} with one token {f.get('semantic_concentration', 0):g}x the "
            f"step's own drift noise; tolerance {f.get('semantic_tolerance', f.get('tolerance', 0)):g})")


def _semantic(v: Verdict) -> str:
    f, who, ref = v.figures, v.backend, v.vs
    onset = Point.from_dict(f["onset"])
    source = ("teacher-forced onto " + ref + "'s tokens" if f.get("onset_source") == "forced" else
              "in the native runs, on identical inputs before their tokens part")
    ev = f.get("evidence") or {}
    others = [o for o in f.get("onsets") or [] if (o["step"], o["stream"]) != (onset.step, onset.stream)]
    text = (f"{source[0].upper() + source[1:]}, the distributions {who}'s sampler draws from (after temperature "
            f"and top-k) go {_threshold(f)} at {onset} and stay there on {f['onset_share_over']:.0%} of that stream's "
            f"steps from it (sampler-visible distance {_num(f.get('onset_visible'))} there, before it at most "
            f"{_num(f.get('onset_before'))}; total variation of the two distributions up to {_num(f.get('onset_tv_max'))}).")
    if others:
        text += " Other streams persist too: " + ", ".join(f"{o['stream']} from step {o['step']}" for o in others[:4]) + "."
    text += " The tier's numerics do not do that."
    if ev.get("cause"):
        text += f" Cause, as the traces show it: {ev['detail']}."
    else:
        text += " Cause not identified" + (f"; ruled out: {'; '.join(ev.get('ruled_out') or [])}." if ev.get(
            "ruled_out") else ".")
    return text


def _main(v: Verdict) -> str:
    f, who, ref = v.figures, v.backend, v.vs
    at = where(v.first_divergence, none="no single step")
    name = v.verdict
    if name == "BACKEND_FAILED":
        return (f"{who} could not complete its runs ({at}): {str(f.get('error', 'unknown error')).rstrip('.')}. "
                "Whatever steps it completed are kept in its traces; nothing else can be concluded for it.")
    forced = drift_sentence(v)
    if name == "SEMANTIC_MISMATCH":
        return _semantic(v) + " " + forced
    if name == "NONDETERMINISTIC_KERNELS":
        return (f"Two runs of {who} on identical inputs gave different logits, first at {at} "
                f"(run-to-run drift up to {_num(f.get('run_to_run_drift'))}): its kernels are not bitwise "
                "reproducible (e.g. GPU reductions), so every comparison with it carries that noise. " + forced)
    if name == "NONDETERMINISTIC_SAMPLER":
        return (f"{who}'s repeats with the same seed have bitwise-identical logits up to {at}, yet sample "
                "different tokens there: its sampler's seeding or RNG is not deterministic. " + forced)
    if name == "NUMERIC_DIVERGENCE":
        return _numeric(v, at) + " " + forced + _tolerance_rule(v)
    if name == "SAMPLER_DIVERGENCE":
        return _sampler(v, at) + " " + forced
    if name == "NUMERIC_DRIFT":
        return (f"No token differs in any mode over {f['steps']} steps, but logits are not bitwise equal. " + forced)
    return f"Bitwise-equal logits and tokens in every mode (native, free run, teacher-forced) over {f['steps']} steps."


def _tolerance_rule(v: Verdict) -> str:
    if v.expected:
        return (" A decision flipped by drift within the tier's tolerance is an expected difference (the tier's "
                "numbers are healthy; a close decision flips under any healthy drift).")
    return ""


def _sampler(v: Verdict, at: str) -> str:
    f, who, ref = v.figures, v.backend, v.vs
    portable = f.get("portable_divergence")
    free = (f"{free_sampler_name(f)} keeps both backends on the same tokens "
            f"{'through all ' + str(f['steps']) + ' steps' if not portable else 'until ' + where(portable)}")
    if f.get("native_logits_bitwise_equal"):
        head = (f"Native runs first differ at {at}, where the two backends' logits are bitwise equal on identical "
                f"inputs (as at every decision before it): the logits did not part the tokens, a sampler did.")
        if f.get("reference_sampler_repeatable") is False:
            head += (f" {ref}'s own repeats with the same seed sample different tokens: the reference's sampler is "
                     f"not deterministic, and the divergence is its, not {who}'s.")
        elif f.get("shared_sampler"):
            head += (f" The traces declare one sampler ({describe_identity(f.get('backend_sampler'))}) with the same "
                     "seed, so that declared identity did not hold: the seeding or the sampler is not what it says.")
        else:
            head += (f" {who} samples with {describe_identity(f.get('backend_sampler'))}, {ref} with "
                     f"{describe_identity(f.get('reference_sampler'))}.")
        return head + f" Meanwhile {free}."
    samplers = (f"{who} samples with {describe_identity(f.get('backend_sampler'))}, {ref} with "
                f"{describe_identity(f.get('reference_sampler'))}")
    head = f"Native runs first differ at {at}, and the native samplers differ ({samplers}), while {free}."
    if f.get("within_tolerance"):
        return head + (" The logits agree within tolerance, so the native tokens differ because the samplers do: "
                       "compare with the free-run sampler, not token by token.")
    return head + " The samplers explain the native divergence, but the logits themselves drift beyond tolerance."


def _numeric(v: Verdict, at: str) -> str:
    f, who, ref = v.figures, v.backend, v.vs
    cause = f.get("numeric_cause")
    if cause == "native":
        return (f"Both backends sample natively with the same sampler ({describe_identity(f.get('backend_sampler'))}) "
                f"and the same seed, and their logits are not bitwise equal on the identical inputs before the "
                f"tokens part: native tokens first differ at {at}, where |Δlogit| is "
                f"{f['native_delta_at_divergence']:.3g}."
                + (f" The free runs ({free_sampler_name(f)}) diverge at {where(f.get('portable_divergence'))}."
                   if f.get("portable_divergence") else f" The free runs ({free_sampler_name(f)}) do not diverge."))
    if cause == "spike":
        spike = f["spikes"][0]
        return (f"At {at} the distribution {who}'s sampler draws from goes {_threshold(f)} (sampler-visible "
                f"distance {_num(spike.get('visible'))}, raw max |Δlogit| {_num(spike.get('max_abs'))}) and does not "
                "stay there: a transient numeric event at that step (e.g. a kernel glitch), not a persistent "
                "semantic change.")
    native = f.get("native_divergence")
    explained = f.get("explained_by_drift")
    verdict = "explains" if explained else "does not explain" if explained is False else "cannot say whether it explains"
    return (f"With {free_sampler_name(f)}, whose decisions depend only on the logits and on (seed, step, stream), "
            f"tokens first differ at {at}. There |Δlogit| is {f['delta_at_divergence']:.3g} against a decision "
            f"margin of {f['margin_at_divergence']:.3g}: numeric drift {verdict} the flip. "
            + (f"Native runs diverge at {where(native)}." if native else "Native runs do not diverge."))
