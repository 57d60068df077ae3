"""`matrix --out DIR`: matrix.json, report.md and matrix.png (machines x backends, drift per cell).

Everything is written through the atomic writer into a directory claimed as `matrix` output
(`outdir.claim`); an --out inside (or holding) one of the machines' directories is refused, so no
input is ever overwritten.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import XBackendError
from .markdown import details, md_table
from ..analysis.matrix import MatrixReport
from ..results import where

MATRIX_JSON = "matrix.json"
REPORT_MD = "report.md"
PLOT = "matrix.png"
KNOB_PREFIXES = ("env.", "MLX_ENABLE_TF32", "threads", "mlx_device", "dtype")
SYMBOL = {"reference": "ref", "identical": "=", "missing": "-", "failed": "FAILED"}


def knobs(env: dict[str, str]) -> str:
    return ", ".join(f"{k.removeprefix('env.')}={v}" for k, v in sorted(env.items()) if k.startswith(KNOB_PREFIXES))


def versions(env: dict[str, str]) -> str:
    return ", ".join(f"{k.removeprefix('versions.')} {v}" for k, v in sorted(env.items())
                     if k.startswith("versions.") and k.removeprefix("versions.") in ("torch", "mlx", "moshi", "moshi_mlx"))


def cell_text(c) -> str:
    if c.status in SYMBOL:
        return SYMBOL[c.status]
    return f"{c.status}: " + (where(c.first_divergence, short=True) if c.first_divergence else
                              f"bits @ {c.first_bitwise_difference}")


def render_markdown(m: MatrixReport) -> str:
    """The page: the answer, the machine x backend table, the groups and their separating fields, known issues."""
    r = m.request
    out = [f"# xbackend matrix: {len(m.machines)} machines, {', '.join(m.backends)}", "",
           f"Reference machine **{m.reference}**; model digest `{r.get('model_digest')}`, prompt digest "
           f"`{r.get('prompt_digest')}`, seed {r.get('seed')}, {r.get('steps')} steps, alignment `{r.get('alignment')}`. "
           "Each cell is that machine's first native run held to the reference machine's run of the same backend "
           "(max |Δlogit| where both saw the same inputs; tolerance: `check`'s, per tier).", "",
           f"**{m.explanation}**", "", "## Answer", ""]
    out += [f"- {line}" for line in m.answer] + ["", "## Machines x backends", ""]
    rows = []
    for c in m.cells:
        env = c.env
        rows.append([c.machine, c.backend, env.get("chip", "-"), env.get("mac.macos") or env.get("os", "-"),
                     versions(env) or "-", knobs(env) or "-", cell_text(c), c.drift_text(),
                     "-" if c.first_bitwise_difference is None else c.first_bitwise_difference,
                     "-" if c.group is None else c.group, "; ".join(k["text"] for k in c.known_issues) or "-"])
    out += [md_table(["machine", "backend", "chip", "OS", "versions", "knobs", "cell (first divergence)",
                      "max abs Δlogit", "first differing step", "group", "known issue that could explain it"], rows),
            "", f"![matrix]({PLOT})", "", "## Groups", ""]
    for b in m.backends:
        groups = m.groups_of(b)
        grows = [[g.index, ", ".join(g.machines), g.steps, "; ".join(f"{k} = {v}" for k, v in g.separated_by.items())
                  or "-"] for g in groups]
        out += [f"### {b}", "", md_table(["group", "machines (bitwise equal)", "common steps", "separated by"], grows)
                if grows else "No machine has a run of it.", ""]
    if m.advisories:
        out += ["## Known issues", "", md_table(["machine/backend", "known issue", "when"],
                                                [[a["backend"], a["text"], a["condition"]] for a in m.advisories]), ""]
    if m.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in m.notes] + [""]
    flat = {f"{c.machine}/{c.backend}": c.env for c in m.cells if c.env}
    keys = sorted({k for e in flat.values() for k in e})
    out += [details("every fingerprint field", md_table(["field", *flat], [[k, *(e.get(k, "-") for e in flat.values())]
                                                                           for k in keys])), ""]
    return "\n".join(out)


def plot_matrix(m: MatrixReport, path: Path) -> Path:
    """A heat map: log10 max |Δlogit| per cell (identical cells in their own colour), first divergence written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    names = [d["name"] for d in m.machines]
    names = [m.reference] + [n for n in names if n != m.reference]
    grid = np.full((len(names), len(m.backends)), np.nan)
    for c in m.cells:
        if c.max_abs is not None and c.max_abs > 0 and math.isfinite(c.max_abs):
            grid[names.index(c.machine), m.backends.index(c.backend)] = math.log10(c.max_abs)
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(m.backends), 1.2 + 0.45 * len(names)), constrained_layout=True)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="magma_r", aspect="auto", vmin=-8, vmax=1)
    ax.set_facecolor("#d9f0d3")  # identical, reference, missing: no drift to draw
    for c in m.cells:
        ax.text(m.backends.index(c.backend), names.index(c.machine), cell_text(c), ha="center", va="center",
                fontsize=7, color="black" if c.status != "diverged" else "white")
    ax.set_xticks(range(len(m.backends)), m.backends)
    ax.set_yticks(range(len(names)), names)
    ax.set_title(f"max |Δlogit| against {m.reference} (log10); '=' bitwise identical", fontsize=9)
    fig.colorbar(image, ax=ax, label="log10 max |Δlogit|")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def write_matrix(m: MatrixReport, out: str | Path, *, force: bool = False) -> dict[str, Path]:
    """matrix.json, report.md and matrix.png in `out` (claimed as matrix output; never one of the inputs)."""
    from ..store.claim import claim, overlaps
    from ..store.files import write_file, write_json

    out = Path(out)
    for p in (Path(d["path"]) for d in m.machines):
        if overlaps(p, out):
            raise XBackendError(f"--out {out} overlaps the input {p}", asked="matrix never writes into a machine's "
                                "directory", fix="pass an --out directory outside every input")
    with claim(out, "matrix", force=force):
        files = {"json": out / MATRIX_JSON, "markdown": out / REPORT_MD, "plot": out / PLOT}
        write_json(files["json"], m.to_dict())
        plot_matrix(m, files["plot"])
        write_file(files["markdown"], render_markdown(m).encode())
    return files

