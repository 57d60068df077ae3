"""Benchmark figures as files the guide quotes (docs/performance.md): a figure on a page is only as
true as its last run, so every benchmark script writes its figures with what measured them (the
command), where (machine, CPU, cores, load average) and when; a re-run rewrites the file."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

from ..store.files import write_json

ROOT = Path(__file__).resolve().parent.parent.parent
FIGURES = ROOT / "docs" / "figures"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    """Where a figure was measured, as the guide states it."""
    import numpy as np

    return {"os": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(), "load_average": _load(),
            "python": platform.python_version(), "numpy": np.__version__}


def command(argv: list[str] | None = None) -> str:
    """The command line that re-measures the figures, with the script's path relative to the repository."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    head = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else argv[0]
    return shlex.join(["python", head, *argv[1:]])


def write_figures(path: str | Path, figures: dict, *, started: dict, argv: list[str] | None = None) -> dict:
    """Write `figures` to `path` (JSON) with the command, the machine (`started` is `machine()` taken before
    the measurement; the load average at the end is added) and the UTC date; returns the document."""
    doc = {"command": command(argv), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {**started, "load_average_end": _load()}, "figures": figures}
    write_json(Path(path), doc)
    return doc
