"""Figures of the analysis: the entropy plot of `xbackend inspect --plot` (moved here from
`analysis.inspection`, so analysis does not import report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..analysis.inspection import Inspection
from ..errors import XBackendError
from . import save_figure


def plot_inspection(result: Inspection, path: str | Path, diverged_at: int | None = None) -> Path:
    """Entropy against step (text above, audio below), loops shaded, a divergence as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if not path.parent.is_dir():  # never create folders the user did not ask for (/nonexistent/dir)
        raise XBackendError(f"Cannot write plot {path}: folder {path.parent} does not exist",
                            fix="create the folder first, or pass a path in an existing one")
    if path.is_dir():
        raise XBackendError(f"Cannot write plot {path}: it is a directory", fix="pass a file name ending in .png")
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True, constrained_layout=True)
    audio = [s for s in result.streams if s.stream != "text"]
    colors = dict(zip([s.stream for s in audio], plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(audio), 1)))))
    for s in result.streams:
        ax = axes[0] if s.stream == "text" else axes[1]
        color = "black" if s.stream == "text" else colors[s.stream]
        ax.plot(np.arange(s.entropy.size), s.entropy, color=color, linewidth=1.0, label=s.stream)
        if s.loop is not None:
            ax.axvspan(s.loop.start, s.loop.start + s.loop.span - 1, color=color, alpha=0.12)
            ax.annotate(f"{s.stream} loop p={s.loop.period} @ {s.loop.start}", (s.loop.start, 0.97),
                        xycoords=("data", "axes fraction"), fontsize=7, va="top", color=color)
    for ax, what in ((axes[0], "text"), (axes[1], "audio")):
        ax.set_ylabel(f"{what} entropy (nats, T=1)")
        ax.grid(True, alpha=0.3)
        if diverged_at is not None:
            ax.axvline(diverged_at, color="red", linestyle="--", linewidth=1.0)
    axes[1].legend(fontsize=7, ncol=4, loc="lower right")
    axes[0].set_title(f"{result.backend or Path(result.path).name}: {result.steps} steps"
                      + (f", diverges at step {diverged_at}" if diverged_at is not None else ""), fontsize=10)
    axes[1].set_xlabel("step (80 ms)")
    save_figure(fig, path)
    return path
