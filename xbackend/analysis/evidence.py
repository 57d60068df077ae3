"""What a semantic mismatch's traces show about its cause (docs/design.md, Verdict rules).

A cause is named only when a test on the recorded logits or metadata shows it; every test that
ran and failed is listed as ruled out, so an explanation says "cause not identified" with what was
tried rather than guessing. The tests, on the onset stream's over-threshold steps (up to
`EVIDENCE_STEPS` of them):

| cause | test |
| --- | --- |
| recorded difference | the traces record different model digests, configs or input feeding (alignment) |
| stale cache / off-by-one position | the backend's logits at step s match the reference's at s-1 (or s+1) |
| a scale (temperature, logit scaling) | they match a·reference for one factor a != 1 (after removing a shift) |
| a permutation | they match the reference rolled by one offset, or the same values on other tokens |
| context / cache wrap | the onset is at the model's context length (`config.context`) |

"Match" means under the semantic threshold (`tolerances.over_threshold`) on at least `MATCH_SHARE`
of the tested steps.
"""

from __future__ import annotations

import numpy as np

from .metrics import visible_rows
from ..samplers import SamplingSettings
from ..tolerances import over_threshold
from ..store.trace import Trace

EVIDENCE_STEPS = 16
MATCH_SHARE = 0.75


def alignment_of(trace: Trace) -> dict:
    a = trace.meta.get("alignment") or {}
    return {"mode": a.get("mode"), "consumes_late": a.get("consumes_late")}


def fed_differently(a: Trace, b: Trace, names: tuple[str, str] | None = None) -> str | None:
    """Why two runs' model inputs differ by construction (upstream feeding of libraries that consume
    user codes at different steps), or None when both saw the same frame at every step."""
    x, y = alignment_of(a), alignment_of(b)
    if x["consumes_late"] is None or y["consumes_late"] is None:
        return None
    if "upstream" in (x["mode"], y["mode"]) and x["consumes_late"] != y["consumes_late"]:
        late = lambda r: "one step late" if r["consumes_late"] else "in the step they are passed"  # noqa: E731
        na, nb = names or (a.meta.get("backend"), b.meta.get("backend"))
        return (f"the traces record --alignment upstream: {na} consumes user codes "
                f"{late(x)}, {nb} {late(y)}, so the two models never saw the same frame "
                "at the same step; rerun with --alignment aligned")
    return None


def _recorded(ref: Trace, other: Trace, names: tuple[str, str]) -> tuple[str | None, list[str]]:
    fed = fed_differently(ref, other, names)
    if fed:
        return fed, []
    ra, oa = ref.meta.get("model") or {}, other.meta.get("model") or {}
    if ra.get("digest") != oa.get("digest"):
        return f"the traces record different model digests ({ra.get('digest')} and {oa.get('digest')})", []
    if ra.get("config") != oa.get("config"):
        keys = sorted(k for k in set(ra.get("config") or {}) | set(oa.get("config") or {})
                      if (ra.get("config") or {}).get(k) != (oa.get("config") or {}).get(k))
        return f"the traces record different model configs (differing keys: {', '.join(keys[:6])})", []
    if ref.meta.get("delays") != other.meta.get("delays"):
        return f"the traces record different delays ({ref.meta.get('delays')} and {other.meta.get('delays')})", []
    return None, [f"a different checkpoint, config, delays or feeding (both record model {ra.get('digest')}, "
                  f"alignment {alignment_of(ref)['mode']})"]


def _matches(pairs: list[tuple[np.ndarray, np.ndarray]], temp: float, top_k: int, tol: float, rr: float | None) -> bool:
    """Do the (reference-like, backend) row pairs agree under the semantic threshold on most of them?"""
    if not pairs:
        return False
    a = np.stack([x for x, _ in pairs])
    b = np.stack([y for _, y in pairs])
    visible, deviation, noise = visible_rows(a, b, temp, top_k)[:3]
    return float((~over_threshold(visible, deviation, noise, tol, rr)).mean()) >= MATCH_SHARE


def _scale(r: np.ndarray, o: np.ndarray, k: int) -> float:
    top = np.argsort(r)[-max(2, min(k, r.size)):]
    rc, oc = r[top] - r[top].mean(), o[top] - o[top].mean()
    denom = float(rc @ rc)
    return float(rc @ oc) / denom if denom > 0 else 1.0


def semantic_evidence(ref, other, onset, over: np.ndarray, tol: float, rr: float | None = None) -> dict:
    """The tested cause of a semantic onset (`diagnose.Onset`), or None, and what was ruled out;
    `over` (`[steps]`) marks the onset stream's decisions over the threshold: the ones tested."""
    a = ref.native[0]
    b = other.forced if onset.source == "forced" else other.native[0]
    point = onset.onset
    k = a.streams.index(point.stream)
    temp, top_k = SamplingSettings.from_meta(a.meta).for_stream(k)
    out: dict = {"cause": None, "detail": None, "ruled_out": []}
    detail, ruled = _recorded(a, b, (ref.label, other.label))
    out["ruled_out"] += ruled
    if detail:
        return {**out, "cause": "recorded difference", "detail": detail}
    n = min(a.steps, b.steps)
    steps = [s for s in range(point.step, min(n, over.shape[0])) if over[s]][:EVIDENCE_STEPS]
    ra, rb = a.logits(point.stream), b.logits(point.stream)
    rows = [(np.asarray(ra[s], dtype=np.float64), np.asarray(rb[s], dtype=np.float64)) for s in steps]
    for shift, name in ((-1, "previous"), (1, "next")):
        pairs = [(np.asarray(ra[s + shift], dtype=np.float64), y) for s, (_, y) in zip(steps, rows)
                 if 0 <= s + shift < n]
        if _matches(pairs, temp, top_k, tol, rr):
            return {**out, "cause": "stale cache / off-by-one position",
                    "detail": f"from step {point.step} on, {other.label}'s {point.stream} logits at step s "
                              f"match {ref.label}'s at step s{shift:+d} (the {name} step): a stale cache "
                              "or an off-by-one position"}
    out["ruled_out"].append("a stale cache or off-by-one position (the logits match neither the reference's "
                            "previous nor its next step)")
    scales = [_scale(x, y, max(top_k, 2)) for x, y in rows]
    scale = float(np.median(scales)) if scales else 1.0
    if abs(scale - 1.0) > 0.01 and _matches([(scale * x, y) for x, y in rows], temp, top_k, tol, rr):
        return {**out, "cause": "a scale", "scale": scale,
                "detail": f"the {point.stream} logits are {scale:.3g} x the reference's (up to a shift): a temperature "
                          "or a scaling of the logits"}
    out["ruled_out"].append(f"a scale (the best factor, {scale:.3g}, does not make them match)")
    offsets = [int((np.argmax(y) - np.argmax(x)) % x.size) for x, y in rows]
    offset = max(set(offsets), key=offsets.count) if offsets else 0
    if offset and _matches([(np.roll(x, offset), y) for x, y in rows], temp, top_k, tol, rr):
        return {**out, "cause": "a permutation", "offset": offset,
                "detail": f"the {point.stream} logits are the reference's rolled by {offset} tokens: an index or "
                          "vocabulary mapping"}
    if _matches([(np.sort(x), np.sort(y)) for x, y in rows], temp, top_k, tol, rr) and not _matches(rows, temp, top_k, tol, rr):
        return {**out, "cause": "a permutation",
                "detail": f"the {point.stream} logits hold the reference's values on other tokens: a permutation "
                          "(an index or vocabulary mapping)"}
    out["ruled_out"].append("a permutation (neither a roll nor the same values on other tokens)")
    context = ((a.meta.get("model") or {}).get("config") or {}).get("context")
    if isinstance(context, int) and not isinstance(context, bool) and abs(point.step - context) <= 1:
        return {**out, "cause": "context wrap", "context": context,
                "detail": f"the onset, step {point.step}, is at the model's context length ({context} steps): the "
                          "cache wraps or is trimmed there"}
    if isinstance(context, int):
        out["ruled_out"].append(f"a context wrap (context {context}, onset at step {point.step})")
    return out
