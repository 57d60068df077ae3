"""report.md's "Where in the network" section and its step x module heat maps, from report.json's
`locate` section (written by `xbackend locate`; untrusted when read back, so checked here first)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..store.rundir import RunDir, safe_name
from .markdown import details, md_table

PLOTS = "plots"
MAX_MODULES, MAX_STEPS = 20_000, 4096
TABLE_ROWS = 12


def checked(entry) -> tuple[dict | None, str | None]:
    """(the entry, None) when its fields have the types this page reads, else (None, what is wrong)."""
    if not isinstance(entry, dict):
        return None, "not an object"
    if "error" in entry:
        return (entry, None) if isinstance(entry["error"], str) else (None, "error is not text")
    heat = entry.get("heat")
    if not isinstance(heat, dict):
        return None, "heat is not an object"
    steps, modules = heat.get("steps"), heat.get("modules")
    if not (isinstance(steps, list) and 0 < len(steps) <= MAX_STEPS and all(_int(s) for s in steps)):
        return None, "heat.steps is not a list of steps"
    if not (isinstance(modules, list) and 0 < len(modules) <= MAX_MODULES and all(isinstance(m, str) for m in modules)):
        return None, "heat.modules is not a list of names"
    for mode in ("propagated", "isolated"):
        m = heat.get(mode)
        if not (isinstance(m, list) and len(m) == len(steps) and all(
                isinstance(r, list) and len(r) == len(modules) and all(x is None or _num(x) for x in r) for r in m)):
            return None, f"heat.{mode} is not a steps x modules matrix of numbers"
    rows = entry.get("modules")
    if not (isinstance(rows, list) and all(isinstance(r, dict) and isinstance(r.get("module"), str) for r in rows)):
        return None, "modules is not a list of module rows"
    for key in ("sentence",):
        if not isinstance(entry.get(key), str):
            return None, f"{key} is not text"
    return entry, None


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def plot_heat(entry: dict, path: Path, title: str, save: Callable) -> Path:
    """log10(max|Δ| / tolerance) per step and module, propagated beside isolated: over tolerance is above 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = entry["heat"]
    modules, steps = heat["modules"], heat["steps"]
    height = min(4 + 0.14 * len(modules), 60)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    for ax, mode in zip(axes, ("propagated", "isolated")):
        m = np.array([[math.nan if x is None else float(x) for x in row] for row in heat[mode]], dtype=np.float64).T
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.clip(np.log10(np.where(m > 0, m, 1e-6)), -6, 3)
        image = ax.imshow(z, aspect="auto", cmap="RdYlBu_r", vmin=-6, vmax=3, interpolation="nearest")
        ax.set_title(mode)
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([str(s) for s in steps], fontsize=7)
        ax.set_xlabel("step")
        every = max(1, len(modules) // 120)
        ax.set_yticks(range(0, len(modules), every))
        ax.set_yticklabels(modules[::every], fontsize=6)
    fig.subplots_adjust(left=0.3, right=0.84, wspace=0.08)
    fig.colorbar(image, ax=axes, label="log10(max |Δ| / tolerance); > 0 is over", shrink=0.5)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(fig, path)
    return path


def write_locate_plots(run: RunDir, save: Callable) -> dict[str, Path]:
    """One heat map per located backend: label -> PNG (`save(figure, path)` writes it)."""
    out = {}
    for label, entry in (run.report.locate or {}).items():
        entry, _ = checked(entry)
        if entry is None or "error" in entry or label not in run.labels:
            continue
        title = f"{label} against {entry.get('reference')}: module differences over the window ending at step " \
                f"{entry.get('step')}"
        out[label] = plot_heat(entry, run.path / PLOTS / f"locate-{safe_name(label)}.png", title, save)
    return out


def _fmt(x) -> str:
    return "-" if not _num(x) else f"{x:.3g}"


def locate_section(run: RunDir, plots: dict[str, Path]) -> list[str]:
    located = run.report.locate or {}
    if not located:
        return []
    out = ["## Where in the network", "",
           "`xbackend locate` re-ran each backend and the reference teacher-forced on the reference's tokens, "
           "every mapped module compared over a window of steps: *propagated* (each on its own activations) and "
           "*isolated* (each module of the backend fed the reference's input). Tolerances are the tier table's, "
           "scaled to each activation's magnitude (docs/design.md, Locate).", ""]
    for label, raw in located.items():
        entry, problem = checked(raw)
        out += [f"### {label}", ""]
        if entry is None:
            out += [f"report.json's locate section for {label} is malformed ({problem}).", ""]
            continue
        if "error" in entry:
            out += [f"Not located: {entry['error']}", ""]
            continue
        out += [entry["sentence"], ""]
        amp = entry.get("amplifier")
        if isinstance(amp, dict) and isinstance(amp.get("module"), str):
            out += [f"Amplifier (LEMON rate of change): `{amp['module']}` at step {amp.get('step')} "
                    f"(score {_fmt(amp.get('score'))}, after `{amp.get('previous')}`).", ""]
        over = [r for r in entry["modules"] if r.get("over") is True or r.get("isolated_over") is True]
        rows = [[f"`{r['module']}`", _step(r.get("first_over_step")), _fmt(r.get("max_abs")), _fmt(r.get("tolerance")),
                 _fmt(r.get("isolated_max_abs")), _step(r.get("isolated_first_over_step"))] for r in over[:TABLE_ROWS]]
        if rows:
            out += [md_table(["module", "first step over (propagated)", "max abs", "tolerance", "isolated max abs",
                              "first step over (isolated)"], rows), ""]
            if len(over) > TABLE_ROWS:
                out += [f"... and {len(over) - TABLE_ROWS} more modules over tolerance (report.json, locate).", ""]
        if label in plots:
            out += [f"![module heat map of {label}]({plots[label].relative_to(run.path).as_posix()})", ""]
        cache = entry.get("cache")
        first = cache.get("first_difference") if isinstance(cache, dict) else None
        if isinstance(first, dict):
            out += [details("KV cache: where the two first differ",
                            md_table(["module", "step", "keys attended", "newest cached position"],
                                     [[f"`{first.get('module')}`", first.get("step"), _pairs(first.get("keys")),
                                       _pairs(first.get("last_position"))]])), ""]
    return out


def _step(x) -> str:
    return str(x) if _int(x) else "-"


def _pairs(d) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) else "-"
