"""The run directory `compare` writes, and `check` and `report` read: names, paths, partial runs.

    <run dir>/
      report.json                      the CompareReport (schema xbackend.report/1)
      prompt_codes.npy                 the exact codes every backend received
      traces/<backend>/native-<i>      native-sampler repeats (i = 0 .. repeats-1)
      traces/<backend>/portable        portable-sampler free run
      traces/<backend>/forced          teacher-forced on the reference's native-0 (not for the reference)
      traces/<reference>/arbiter       the numeric arbiter (e.g. cpu:fp64) forced on the reference's native-0
      audio/<backend>.wav              each backend's native-0 decoded by the reference codec
      jobs/<backend>.json              the worker job files

`<backend>` is the label with every character outside `[A-Za-z0-9_.-]` replaced by `_`
(`mlx:cpu` is stored as `mlx_cpu`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import XBackendError
from ..results import CompareReport
from .trace import Trace, TruncatedTraceWarning, load_trace

REPORT_JSON = "report.json"
PROMPT_CODES = "prompt_codes.npy"
TRACES = "traces"
AUDIO = "audio"
JOBS = "jobs"
PORTABLE = "portable"
FORCED = "forced"
ARBITER = "arbiter"


def native(i: int) -> str:
    """The name of the i-th native run."""
    return f"native-{i}"


NATIVE_0 = native(0)


def safe_name(label: str) -> str:
    """A backend label as a directory name: every run of characters outside [A-Za-z0-9_.-] becomes
    one `_`, so `mlx:cpu` is stored as `traces/mlx_cpu` and a second `cpu` (`cpu#2`) as `traces/cpu_2`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def unique_labels(specs: list[str]) -> list[str]:
    """`cpu,cpu` becomes `cpu`, `cpu#2`: a backend may be compared with a copy of itself."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}#{seen[s]}")
    return out


def distinct_dirs(labels: list[str], what: str = "backends") -> list[str]:
    """Refuse labels that would share a directory (`cpu#2` and a plugin's `cpu_2`, `mlx:cpu` and `mlx_cpu`)."""
    seen: dict[str, str] = {}
    for label in labels:
        name = safe_name(label)
        if name in seen:
            raise XBackendError(f"The {what} {seen[name]!r} and {label!r} would both be stored as {name!r}",
                                asked="their traces would overwrite each other",
                                fix=f"leave one of them out, or rename a plugin's {what[:-1]}")
        seen[name] = label
    return labels


def backend_dir(out: Path, label: str) -> Path:
    return Path(out) / TRACES / safe_name(label)


_TRACE_FILES = re.compile(r"(\.xbackend|meta\.json(\.tmp)?|digests\.txt|tokens\.bin|margins\.bin|inputs\.bin|logits-[^/]+\.bin)")
_RUN_FILES = (REPORT_JSON, "report.md", "repeat.json", "bundle.tar.gz", PROMPT_CODES)


def _json_or_none(file: Path):
    from .files import load_json

    try:
        return load_json(file, "file", "")
    except XBackendError:
        return None


def _is_trace_dir(path: Path) -> bool:
    return str((_json_or_none(path / "meta.json") or {}).get("schema", "")).startswith("xbackend.trace/")


def clear_previous_run(out: Path) -> list[Path]:
    """Remove what an earlier `compare`, `repeat` or `report` wrote into `out`, so that a reused
    `--out` never mixes the traces of backends that are no longer asked for with the new ones.

    Only xbackend's own files go: trace files inside directories whose meta.json is an xbackend
    trace, job files, the audio and plots an earlier report.json names, and the run's own
    reports; directories are removed only when that leaves them empty. Returns what was removed."""
    from .files import remove_file

    removed: list[Path] = []

    def unlink(path: Path) -> None:  # a regular file reached through no link from `out`, never anything else
        if remove_file(path, root=out):
            removed.append(path)

    old = _json_or_none(out / "report.json") or {}
    try:
        labels = list(old.get("traces") or {})
        audio = [str(a) for a in (old.get("audio") or {}).values()]
    except (AttributeError, TypeError):
        labels, audio = [], []
    for label in labels:
        unlink(out / "plots" / f"drift-{safe_name(str(label))}.png")
        unlink(out / "plots" / f"locate-{safe_name(str(label))}.png")
    for rel in audio:
        if re.fullmatch(r"audio/[A-Za-z0-9_.-]+\.wav", rel):
            unlink(out / rel)
    jobs = out / "jobs"
    for job in jobs.glob("*.json") if jobs.is_dir() and not jobs.is_symlink() else ():
        if {"runs", "plugins"} <= set(_json_or_none(job) or {}):
            unlink(job)
    traces = out / "traces"
    for meta in sorted(traces.glob("**/meta.json")) if traces.is_dir() and not traces.is_symlink() else []:
        if _is_trace_dir(meta.parent):
            for f in meta.parent.iterdir():
                if _TRACE_FILES.fullmatch(f.name):
                    unlink(f)
    for name in _RUN_FILES:
        unlink(out / name)
    emptied = {d for f in removed for d in f.parents if out in d.parents}
    for d in sorted(emptied, key=lambda d: -len(d.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    return removed


def load_partial(path: Path) -> Trace | None:
    """A trace as far as it got, or None when the run never started writing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncatedTraceWarning)
            return load_trace(path)
    except XBackendError:
        return None


@dataclass(frozen=True)
class RunDir:
    """A run directory written by `compare` and its parsed report."""

    path: Path
    report: CompareReport

    @property
    def labels(self) -> list[str]:
        return self.report.labels

    @property
    def reference(self) -> str:
        return self.report.reference

    def trace_dir(self, label: str, run: str) -> Path:
        """Where report.json says a run's trace is: a path from untrusted metadata, so it must stay
        inside the run directory (no absolute path, no `..`, no link on the way)."""
        from .claim import inside

        rel = self.report.traces.get(label, str(Path(TRACES) / safe_name(label)))
        return inside(self.path, f"{rel}/{run}", f"report.json's trace path of {label}")

    def trace(self, label: str, run: str) -> Trace | None:
        """A trace as far as it got, or None when that run wrote nothing."""
        return load_partial(self.trace_dir(label, run))


def load_run(path: str | Path) -> RunDir:
    """Read a run directory; one without `report.json` is not a run directory yet."""
    path = Path(path)
    file = path / REPORT_JSON
    if not file.is_file():
        raise XBackendError(f"No {REPORT_JSON} in {path}", asked=f"`report` reads {file}, written by `compare`",
                            fix=f"run xbackend compare first, e.g. `xbackend compare --backends cpu,mlx:cpu --out {path}`")
    from .claim import read_json

    data = read_json(file, "run directory report", fix="run xbackend compare again")
    if not isinstance(data, dict) or data.get("schema") != "xbackend.report/1":
        schema = data.get("schema") if isinstance(data, dict) else None
        raise XBackendError(f"{file} has schema {schema!r}, expected 'xbackend.report/1'",
                            fix="run xbackend compare again with this version of xbackend")
    from . import validate

    data = validate.report_json(str(file), data)
    try:
        return RunDir(path, CompareReport.from_dict(data))
    except XBackendError as exc:
        raise XBackendError(f"{file}: {exc}") from None
