"""Where in the network two backends part: module tolerances, the first module over its
tolerance, the amplifier, and the `xbackend.locate/1` document (docs/design.md, Locate).

Pure functions over the per-module differences `capture.layers` measured.

Tolerance of a module at a step: the tier table's logit tolerance (`tolerances.tolerance` of the
two tiers), scaled to that activation's magnitude, `T x max(m, SCALE_FLOOR) / LOGIT_SCALE` with m the
reference's max |activation|: the table is stated for logits of magnitude ~20, so a module may
move by the same fraction of its own magnitude as the logits may of theirs.

Amplifier (LEMON, FSE'20): at the located step, each module's relative difference
`d = max|Δ| / max(m, SCALE_FLOOR)` against the module that feeds it, `(d_l - d_prev) / (d_prev + EPS)`;
the largest score is the module that makes the difference grow, not one that inherits it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..backends.modulemap import ModuleEntry
from ..capture.layers import PassResult

SCHEMA = "xbackend.locate/1"
LOGIT_SCALE = 20.0  # the logit magnitude the tier table's tolerances are stated for (tolerances.py)
SCALE_FLOOR = 0.05  # an activation smaller than this is held to the tolerance of this magnitude
EPS = 1e-7  # LEMON's epsilon


def module_tolerance(tier_tolerance: float, scale: float) -> float:
    return tier_tolerance * max(scale, SCALE_FLOOR) / LOGIT_SCALE


@dataclass(frozen=True)
class Over:
    """A module over its tolerance at a step (or the largest one, when `over` is False)."""

    module: str
    mode: str
    step: int
    max_abs: float
    tolerance: float

    def to_dict(self) -> dict:
        return {"module": self.module, "mode": self.mode, "step": self.step, "max_abs": _r(self.max_abs),
                "tolerance": _r(self.tolerance)}


def _r(x: float | None) -> float | None:
    """4 significant digits; None for a non-finite figure (a shape mismatch), so report.json stays strict JSON."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.4g}")


def ratios(p: PassResult, entries: list[ModuleEntry], tier_tolerance: float) -> dict[str, list[float | None]]:
    """max|Δ| / tolerance per module and window step (None where the module did not run)."""
    out = {}
    for e in entries:
        row = []
        for d in p.diffs[e.name]:
            row.append(None if d is None else d[0] / module_tolerance(tier_tolerance, d[1]))
        out[e.name] = row
    return out


def first_over(p: PassResult, entries: list[ModuleEntry], tier_tolerance: float) -> Over | None:
    """The earliest step, then the earliest module in execution order, whose difference exceeds its tolerance."""
    for i, step in enumerate(p.steps):
        for e in entries:
            d = p.diffs[e.name][i]
            if d is not None and d[0] > module_tolerance(tier_tolerance, d[1]):
                return Over(e.name, p.mode, step, d[0], module_tolerance(tier_tolerance, d[1]))
    return None


def amplifier(p: PassResult, entries: list[ModuleEntry], step: int) -> dict | None:
    """The module with the largest LEMON rate of change at `step`."""
    i = p.steps.index(step)

    def rel(name: str) -> float | None:
        d = p.diffs[name][i]
        return None if d is None else d[0] / max(d[1], SCALE_FLOOR)

    best = None
    for e in entries:
        d = rel(e.name)
        if d is None:
            continue
        prev = rel(entries[e.after].name) if e.after is not None else 0.0
        prev = 0.0 if prev is None else prev
        score = (d - prev) / (prev + EPS)
        if best is None or score > best["score"]:
            best = {"module": e.name, "step": step, "score": score, "relative_difference": d,
                    "previous": entries[e.after].name if e.after is not None else None,
                    "previous_relative_difference": prev}
    if best is not None:
        for key in ("score", "relative_difference", "previous_relative_difference"):
            best[key] = _r(best[key])
    return best


def cache_section(p: PassResult, labels: tuple[str, str]) -> dict:
    """Keys attended and the newest cached position of every attention module, per window step, and
    the first (step, module) where the two backends differ in either."""
    rows, first = [], None
    for name, keys in p.keys.items():
        last = p.last_position[name]
        rows.append({"module": name, "steps": list(p.steps), "keys": {labels[0]: keys["reference"],
                                                                      labels[1]: keys["backend"]},
                     "last_position": {labels[0]: last["reference"], labels[1]: last["backend"]}})
    for i, step in enumerate(p.steps):
        for row in rows:
            (ka, kb), (la, lb) = (row["keys"].values(), row["last_position"].values())
            if first is None and (ka[i] != kb[i] or la[i] != lb[i]):
                first = {"module": row["module"], "step": step, "keys": {labels[0]: ka[i], labels[1]: kb[i]},
                         "last_position": {labels[0]: la[i], labels[1]: lb[i]}}
    return {"modules": rows, "first_difference": first}


@dataclass(frozen=True)
class LocateResult:
    reference: str
    backend: str
    step: int
    stream: str | None
    window: tuple[int, int]
    tier_tolerance: float
    first: Over | None
    first_propagated: Over | None
    first_isolated: Over | None
    amplifier: dict | None
    modules: tuple[dict, ...]
    cache: dict
    heat: dict
    run: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def keys_at(self, module: str, step: int) -> dict | None:
        for row in self.cache.get("modules", []):
            if row["module"] == module and step in row["steps"]:
                i = row["steps"].index(step)
                return {label: ks[i] for label, ks in row["keys"].items()}
        return None

    def sentence(self) -> str:
        """The sentence the verdict's explanation gains (docs/design.md, Locate)."""
        a, b = self.window
        if self.first is None:
            return (f"No mapped module exceeds its tolerance in steps {a}-{b} (propagated and isolated, "
                    f"{len(self.modules)} modules).")
        f = self.first
        text = f"First diverges in {f.module} at step {f.step} ({f.mode}"
        iso = self.first_isolated
        if f.mode == "propagated":
            text += ("; isolated, no module exceeds its tolerance: the difference is inherited" if iso is None
                     else f"; isolated, first {iso.module} at step {iso.step}")
        text += f"; {f.max_abs:.3g} against a tolerance of {f.tolerance:.3g})"
        keys = self.keys_at(f.module, f.step)
        diff = self.cache.get("first_difference")
        if keys is None and diff is not None and diff["step"] <= f.step:
            keys, where = diff["keys"], f" in {diff['module']} at step {diff['step']}"
        else:
            where = ""
        if keys is not None:
            text += f"; keys attended{where}: " + ", ".join(f"{k} {v}" for k, v in keys.items())
        return text + "."

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "reference": self.reference, "backend": self.backend, "step": self.step,
                "stream": self.stream, "window": list(self.window), "tolerance": _r(self.tier_tolerance),
                "first": None if self.first is None else self.first.to_dict(),
                "first_propagated": None if self.first_propagated is None else self.first_propagated.to_dict(),
                "first_isolated": None if self.first_isolated is None else self.first_isolated.to_dict(),
                "amplifier": self.amplifier, "modules": list(self.modules), "cache": self.cache, "heat": self.heat,
                "run": self.run, "notes": list(self.notes), "sentence": self.sentence()}


def summarize(entries: list[ModuleEntry], passes: dict[str, PassResult], tier_tolerance: float,
              labels: tuple[str, str], step: int, stream: str | None, run: dict,
              notes: tuple[str, ...] = ()) -> LocateResult:
    prop, iso = passes["propagated"], passes["isolated"]
    fp, fi = first_over(prop, entries, tier_tolerance), first_over(iso, entries, tier_tolerance)
    first = fp or fi
    if fp is not None and fi is not None and (fp.module, fp.step) == (fi.module, fi.step):
        first = Over(fp.module, "propagated and isolated", fp.step, fp.max_abs, fp.tolerance)
    heat = {"steps": list(prop.steps), "modules": [e.name for e in entries],
            "propagated": _matrix(ratios(prop, entries, tier_tolerance), entries),
            "isolated": _matrix(ratios(iso, entries, tier_tolerance), entries)}
    rows = []
    for e in entries:
        row = dict(e.to_dict(), **_worst(prop, e, tier_tolerance))
        w = _worst(iso, e, tier_tolerance)
        row.update(isolated_max_abs=w["max_abs"], isolated_tolerance=w["tolerance"], isolated_over=w["over"],
                   isolated_first_over_step=w["first_over_step"])
        rows.append(row)
    amp_step = first.step if first is not None else prop.steps[-1]
    return LocateResult(labels[0], labels[1], step, stream, (prop.steps[0], prop.steps[-1]), tier_tolerance,
                        first, fp, fi, amplifier(prop if fp is not None or fi is None else iso, entries, amp_step),
                        tuple(rows), cache_section(prop, labels), heat, run, notes)


def _matrix(r: dict[str, list], entries: list[ModuleEntry]) -> list[list]:
    """[step][module] ratios, rounded (None where a module did not run)."""
    steps = len(next(iter(r.values()))) if r else 0
    return [[_r(r[e.name][i]) for e in entries] for i in range(steps)]


def _worst(p: PassResult, e: ModuleEntry, tier_tolerance: float) -> dict:
    """A module over the window: its worst step (by ratio to tolerance) and its first step over."""
    worst, first = None, None
    for i, d in enumerate(p.diffs[e.name]):
        if d is None:
            continue
        tol = module_tolerance(tier_tolerance, d[1])
        if first is None and d[0] > tol:
            first = p.steps[i]
        if worst is None or d[0] / tol > worst[0] / worst[2]:
            worst = (d[0], d[1], tol)
    if worst is None:
        return {"max_abs": None, "rel": None, "tolerance": None, "over": None, "first_over_step": None}
    return {"max_abs": _r(worst[0]), "rel": _r(worst[0] / worst[1]) if worst[1] else None, "tolerance": _r(worst[2]),
            "over": worst[0] > worst[2], "first_over_step": first}
