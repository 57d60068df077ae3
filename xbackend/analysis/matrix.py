"""The fleet matrix (`xbackend matrix`, docs in `xbackend/matrix.py`): each machine's run of a backend held to the
reference machine's, the groups of machines that agree bitwise, and the fingerprint fields that separate them.

Pure: it takes machines already read (`Source`, traces validated by the store) and returns the typed
`MatrixReport` (`to_dict()` is matrix.json, schema xbackend.matrix/1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..advisories import LOGITS, NATIVE_TOKENS, advise, explaining
from ..errors import XBackendError
from ..results import Point, exit_code, times, where
from ..samplers import SamplingSettings
from ..store.trace import Trace
from ..tolerances import CHECK_TOLERANCES, tier_of
from . import metrics
from .metrics import finite_or_none

SCHEMA = "xbackend.matrix/1"
STATUSES = ("reference", "identical", "within", "diverged", "failed", "missing")
SAME = ("model digest", "prompt digest", "seed", "steps", "alignment", "sampling settings")


@dataclass(frozen=True)
class Source:
    """One machine's input: what it ran (the fields every machine must share) and its native-0 traces."""

    name: str
    path: Path
    kind: str  # run | baseline | bundle
    same: dict  # SAME -> value
    backends: tuple[str, ...]
    status: dict  # backend -> ok | failed | unavailable
    traces: dict  # backend -> Trace | None
    envs: dict  # backend -> fingerprint (the trace's, else the one its report recorded)
    notes: tuple[str, ...] = ()


def same_fields(model_digest, prompt_digest, seed, steps, alignment, settings) -> dict:
    return dict(zip(SAME, (model_digest, prompt_digest, seed, steps, alignment, SamplingSettings.from_dict(settings))))


def check_same(sources: list[Source]) -> None:
    """Every machine ran the same model, prompt, seed, steps, alignment and settings; else name the first mismatch."""
    first = sources[0]
    for s in sources[1:]:
        for key in SAME:
            if s.same[key] != first.same[key]:
                raise XBackendError(f"{s.path} was not run like {first.path}: its {key} is {s.same[key]}, "
                                    f"{first.name}'s {first.same[key]}",
                                    fix="pass only captures of the same model, prompt, seed, steps and settings")


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Cell:
    """One machine x backend, held to the reference machine's run of the same backend."""

    machine: str
    backend: str
    status: str
    tier: str | None = None
    tolerance: float | None = None
    steps: int = 0  # steps compared (common to both runs)
    first_bitwise_difference: int | None = None  # first step whose logits digest differs
    first_divergence: Point | None = None  # first token difference
    max_abs: float | None = None  # over the steps where both saw the same inputs
    max_abs_at: Point | None = None
    group: int | None = None
    known_issues: tuple[dict, ...] = ()
    env: dict = field(default_factory=dict, compare=False)  # the flattened fingerprint of this machine's run

    def to_dict(self) -> dict:
        return {"machine": self.machine, "backend": self.backend, "status": self.status, "tier": self.tier,
                "tolerance": self.tolerance, "steps": self.steps,
                "first_bitwise_difference": self.first_bitwise_difference,
                "first_divergence": None if self.first_divergence is None else self.first_divergence.to_dict(),
                "max_abs": finite_or_none(self.max_abs), "max_abs_at": None if self.max_abs_at is None else self.max_abs_at.to_dict(),
                "group": self.group, "known_issues": list(self.known_issues), "env": self.env}

    @staticmethod
    def from_dict(d: dict) -> Cell:
        return Cell(d["machine"], d["backend"], d["status"], d.get("tier"), d.get("tolerance"), int(d.get("steps") or 0),
                    d.get("first_bitwise_difference"), Point.from_dict(d.get("first_divergence")), d.get("max_abs"),
                    Point.from_dict(d.get("max_abs_at")), d.get("group"), tuple(d.get("known_issues") or ()),
                    dict(d.get("env") or {}))

    def drift_text(self) -> str:
        if self.max_abs is None:
            return "-"
        beyond = self.tolerance is not None and self.max_abs > self.tolerance
        return f"{self.max_abs:.3g}" + (f" ({times(self.max_abs / self.tolerance)} tol)" if beyond and self.tolerance
                                        else "")


@dataclass(frozen=True)
class Group:
    """Machines whose runs of one backend agree bitwise on every common step."""

    backend: str
    index: int  # 0 is the reference machine's group
    machines: tuple[str, ...]
    steps: int
    separated_by: dict = field(default_factory=dict)  # field -> this group's value

    def to_dict(self) -> dict:
        return {"backend": self.backend, "index": self.index, "machines": list(self.machines), "steps": self.steps,
                "separated_by": self.separated_by}

    @staticmethod
    def from_dict(d: dict) -> Group:
        return Group(d["backend"], int(d["index"]), tuple(d["machines"]), int(d["steps"]), dict(d.get("separated_by") or {}))


@dataclass(frozen=True)
class MatrixReport:
    """The fleet's answer; `to_dict()` is matrix.json (schema xbackend.matrix/1)."""

    reference: str
    machines: tuple[dict, ...]  # name, path, kind, fingerprint summary
    backends: tuple[str, ...]
    request: dict
    cells: tuple[Cell, ...]
    groups: tuple[Group, ...]
    advisories: tuple[dict, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def backend_failed(self) -> bool:
        return any(c.status == "failed" for c in self.cells)

    @property
    def expected(self) -> bool:
        return not self.backend_failed and not any(c.status == "diverged" for c in self.cells)

    @property
    def exit_code(self) -> int:
        return exit_code(backend_failed=self.backend_failed, attention=not self.expected)

    def cell(self, machine: str, backend: str) -> Cell | None:
        return next((c for c in self.cells if c.machine == machine and c.backend == backend), None)

    def groups_of(self, backend: str) -> list[Group]:
        return [g for g in self.groups if g.backend == backend]

    @property
    def answer(self) -> list[str]:
        """One sentence per backend: which machines agree, where the others part, and what separates them."""
        out = []
        for b in self.backends:
            groups = self.groups_of(b)
            if not groups:
                out.append(f"{b}: no machine has a run to compare")
                continue
            ref_cell = self.cell(self.reference, b)
            if ref_cell is None or ref_cell.status != "reference":
                out.append(f"{b}: no run on the reference machine {self.reference} to hold the others to; "
                           + "; ".join(f"group {g.index}: {', '.join(g.machines)}" for g in groups))
                continue
            if len(groups) == 1:
                out.append(f"{b}: all {len(groups[0].machines)} machines agree bitwise over {groups[0].steps} steps "
                           f"({', '.join(groups[0].machines)})")
                continue
            ref = groups[0]
            parts = [f"{b}: {len(groups)} groups over {ref.steps} common steps; group 0: {', '.join(ref.machines)} "
                     f"(the reference machine's)"]
            for g in groups[1:]:
                cells = [self.cell(m, b) for m in g.machines]
                first = min((c for c in cells if c and c.status in ("diverged", "within")),
                            key=lambda c: (c.first_bitwise_difference or 0), default=None)
                how = "-"
                if first is not None:
                    how = (f"logits part at step {first.first_bitwise_difference}, "
                           + (f"tokens at {where(first.first_divergence)}" if first.first_divergence else "no token differs")
                           + f", max |Δlogit| {first.drift_text()}")
                sep = ", ".join(f"{k} = {v}" for k, v in g.separated_by.items())
                parts.append(f"group {g.index}: {', '.join(g.machines)} parts from it ({how})"
                             + (f"; every machine in it has {sep}" if sep else ""))
            out.append("; ".join(parts))
        return out

    @property
    def explanation(self) -> str:
        diverged = [c for c in self.cells if c.status == "diverged"]
        failed = [c for c in self.cells if c.status == "failed"]
        head = ("EXPECTED" if self.expected else "NEEDS ATTENTION") + f": {len(self.machines)} machines, " \
               f"{len(self.backends)} backends against {self.reference}"
        if diverged:
            head += f"; {len(diverged)} cell{'s' if len(diverged) > 1 else ''} diverged ({', '.join(f'{c.machine}/{c.backend}' for c in diverged[:8])})"
        if failed:
            head += f"; {len(failed)} failed"
        return head

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "reference": self.reference, "machines": list(self.machines),
                "backends": list(self.backends), "request": self.request, "cells": [c.to_dict() for c in self.cells],
                "groups": [g.to_dict() for g in self.groups], "advisories": list(self.advisories),
                "notes": list(self.notes), "answer": self.answer, "explanation": self.explanation,
                "expected": self.expected, "exit_code": self.exit_code}

    @staticmethod
    def from_dict(d: dict) -> MatrixReport:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise XBackendError(f"matrix result has schema {d.get('schema') if isinstance(d, dict) else None!r}, "
                                f"expected {SCHEMA!r}", fix="run xbackend matrix again")
        try:
            return MatrixReport(d["reference"], tuple(d["machines"]), tuple(d["backends"]), dict(d["request"]),
                                tuple(Cell.from_dict(c) for c in d["cells"]),
                                tuple(Group.from_dict(g) for g in d["groups"]), tuple(d.get("advisories") or ()),
                                tuple(d.get("notes") or ()))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise XBackendError(f"matrix result is missing or has a malformed field ({type(exc).__name__}: {exc})",
                                fix="run xbackend matrix again") from None


def compare_cell(machine: str, backend: str, ref: Trace, other: Trace) -> Cell:
    """`other` (another machine) held to `ref` (the reference machine), same backend."""
    tier = tier_of(ref)
    if tier not in CHECK_TOLERANCES:
        raise XBackendError(f"No tolerance for tier {tier!r} of {backend}", asked=f"tiers are {', '.join(CHECK_TOLERANCES)}")
    tol = CHECK_TOLERANCES[tier]
    n = min(ref.steps, other.steps)
    first_bits = metrics.bitwise_equal_steps(ref, other)
    token = metrics.first_token_divergence(ref, other)
    drift = metrics.same_input_drift(ref, other) if ref.has_logits and other.has_logits and n else None
    max_abs = None if drift is None else drift["max_abs"]
    if first_bits is None and token is None:
        status = "identical"
    elif token is None and max_abs is not None and max_abs <= tol:
        status = "within"
    else:
        status = "diverged"
    return Cell(machine, backend, status, tier, tol, n, first_bits, None if token is None else Point(*token), max_abs,
                Point.from_dict(drift["at"]) if drift and drift["at"] else None)


def cell_effects(c: Cell) -> tuple[str, ...]:
    """What could make a diverged cell: logits beyond tolerance, and (native runs) tokens the sampler picked."""
    if c.status != "diverged":
        return ()
    beyond = c.max_abs is None or c.tolerance is None or c.max_abs > c.tolerance
    return ((LOGITS,) if beyond else ()) + ((NATIVE_TOKENS,) if c.first_divergence is not None else ())


def flat_env(env, prefix: str = "", depth: int = 0) -> dict[str, str]:
    """A fingerprint as `chip`, `versions.mlx`, `env.MLX_ENABLE_TF32` ... -> text (bounded: untrusted)."""
    out: dict[str, str] = {}
    if not isinstance(env, dict) or depth > 3:
        return out
    for key, value in list(env.items())[:256]:
        name = f"{prefix}{str(key)[:64]}"
        if isinstance(value, dict):
            out.update(flat_env(value, name + ".", depth + 1))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = "-" if value is None else str(value)[:120]
    return out


IGNORED = {"backend", "platform"}  # the label itself; the platform string repeats os and machine


def separating(members: list[list[str]], envs: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """Fields with one value per group and a different value in every group: field -> value per group."""
    names = sorted({k for e in envs.values() for k in e} - IGNORED)
    out = {}
    for name in names:
        values = []
        for machines in members:
            seen = {envs[m].get(name, "(not recorded)") for m in machines}
            if len(seen) != 1:
                break
            values.append(seen.pop())
        if len(values) == len(members) and len(set(values)) == len(values):
            out[name] = values
    return out


def group_backend(backend: str, traces: dict[str, Trace], order: list[str]) -> list[tuple[list[str], int]]:
    """Machines of one backend grouped by their digests over the steps all of them have."""
    n = min(t.steps for t in traces.values())
    keyed: dict[tuple, list[str]] = {}
    for machine in order:
        if machine in traces:
            keyed.setdefault(tuple(traces[machine].digests[:n]), []).append(machine)
    return [(machines, n) for machines in keyed.values()]


def build_matrix(sources: list[Source], reference: str | None = None) -> MatrixReport:
    """The matrix of already loaded machines (see `run_matrix`)."""
    names = [s.name for s in sources]
    ref_name = reference if reference is not None else names[0]
    if ref_name not in names:
        raise XBackendError(f"--reference {ref_name} is not one of the machines",
                            asked=f"the machines are {', '.join(names)} (named after their directories)",
                            fix="pass one of those names")
    check_same(sources)
    ref = next(s for s in sources if s.name == ref_name)
    order = [ref_name] + [n for n in names if n != ref_name]
    by_name = {s.name: s for s in sources}
    backends = list(dict.fromkeys(b for s in [ref, *sources] for b in s.backends))
    envs = {(s.name, b): s.envs.get(b) for s in sources for b in s.backends}
    found = advise({f"{m}/{b}": env for (m, b), env in envs.items()})
    cells, groups = [], []
    for b in backends:
        present = {m: by_name[m].traces.get(b) for m in order if b in by_name[m].backends}
        usable = {m: t for m, t in present.items() if t is not None and by_name[m].status.get(b) == "ok"}
        found_groups = group_backend(b, usable, order) if usable else []
        member_envs = {m: flat_env(envs[(m, b)]) for m in present}
        seps = separating([g for g, _ in found_groups], member_envs) if len(found_groups) > 1 else {}
        index = {m: i for i, (g, _) in enumerate(found_groups) for m in g}
        for i, (machines, steps) in enumerate(found_groups):
            groups.append(Group(b, i, tuple(machines), steps, {k: v[i] for k, v in seps.items()}))
        base = usable.get(ref_name)
        for m in order:
            if m not in present:
                cells.append(Cell(m, b, "missing"))
                continue
            if m not in usable:
                cells.append(Cell(m, b, "failed", env=member_envs[m]))
                continue
            if m == ref_name:
                cell = Cell(m, b, "reference", tier_of(base), CHECK_TOLERANCES.get(tier_of(base)), base.steps)
            elif base is None:
                cell = Cell(m, b, "missing")
            else:
                cell = compare_cell(m, b, base, usable[m])
            known = explaining(found, (f"{m}/{b}", f"{ref_name}/{b}"), cell_effects(cell))
            cells.append(replace(cell, group=index.get(m), known_issues=tuple(known), env=member_envs[m]))
    machines = tuple({"name": s.name, "path": str(s.path), "kind": s.kind,
                      "chip": _first(s, "chip"), "os": _first(s, "os")} for s in sources)
    request = {k.replace(" ", "_"): (v.to_dict() if isinstance(v, SamplingSettings) else v) for k, v in ref.same.items()}
    notes = tuple(f"{s.name}: {n}" for s in sources for n in s.notes)
    return MatrixReport(ref_name, machines, tuple(backends), request, tuple(cells), tuple(groups), tuple(found), notes)


def _first(s: Source, key: str) -> str | None:
    """A machine-level fingerprint field, from the first backend that recorded it."""
    return next((flat_env(e).get(key) for e in s.envs.values() if flat_env(e).get(key)), None)
