"""`matrix`: many machines' captures of the same run, one answer.

Each input is one machine's run directory (`compare`, `check --out`), baseline (`baseline create`)
or extracted bundle (`report`'s bundle.tar.gz, unpacked): same model, prompt codes, seed, steps,
alignment and sampling settings, or it is refused naming the field that differs. Per backend,
every machine's first native run (`native-0`, what a user gets from that seed) is held to the
reference machine's:

| cell | when |
| --- | --- |
| `identical` | every step's logits digest and every token equal over the common steps |
| `within` | no token differs and max abs Δlogit (where both saw the same inputs) <= `CHECK_TOLERANCES` of the tier |
| `diverged` | a token differs, or the drift is beyond that tolerance |
| `failed` | the backend failed on that machine (or wrote no trace) |
| `missing` | the machine (or the reference machine) did not run that backend |

The tolerances are `check`'s (a backend against itself on another machine of the same kind), and the
exit code is `check`'s: 0 when no cell diverged, 1 when one did, 3 when a backend failed there.
Machines whose native-0 digests agree on every common step form a group; an environment field
(flattened fingerprint: `chip`, `os`, `versions.mlx`, `env.MLX_ENABLE_TF32` ...) separates the groups
when each group has one value of it and no two groups share one. Known issues (`advisories`) are
checked against every cell's fingerprint. Nothing is run: numpy is all it needs.

An extracted bundle keeps a backend's native-0 only as windows; a window that starts at step 0 is
compared over its steps, one that starts later is left out (a note says so).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from .analysis.matrix import MatrixReport, Source, build_matrix, same_fields
from .errors import XBackendError
from .samplers import SamplingSettings
from .store.rundir import NATIVE_0, REPORT_JSON, TRACES, RunDir, load_run, safe_name
from .store.trace import Trace, TruncatedTraceWarning, load_trace

__all__ = ["run_matrix", "load_source", "MatrixReport"]

MAX_MACHINES = 256
_TRIMMED = re.compile(re.escape(NATIVE_0) + r"\.steps0-(\d{1,9})")


def _native0(root: Path, rel: str, label: str, notes: list[str]) -> tuple[Path | None, bool]:
    """The native-0 trace directory of one backend, or an extracted bundle's window of it from step 0."""
    from .store.claim import inside

    full = inside(root, f"{rel}/{NATIVE_0}", f"the trace path of {label}")
    if full.is_dir() and not full.is_symlink():
        return full, False
    folder = inside(root, rel, f"the trace path of {label}")
    if not folder.is_dir() or folder.is_symlink():
        return None, False
    windows = sorted((p for p in folder.iterdir() if p.name.startswith(NATIVE_0 + ".steps")), key=lambda p: p.name)
    first = next((p for p in windows if _TRIMMED.fullmatch(p.name) and p.is_dir() and not p.is_symlink()), None)
    if first is None and windows:
        notes.append(f"{label}: the bundle keeps native-0 only from a later step ({windows[0].name}); left out")
    return first, first is not None


def _load(path: Path) -> Trace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncatedTraceWarning)  # a run cut short is compared as far as it got
        return load_trace(path)


def load_source(path: str | Path, name: str) -> Source:
    """Read one machine's run directory, extracted bundle or baseline (untrusted: every field checked)."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        raise XBackendError(f"{path} is a bundle archive", asked="matrix reads directories, and unpacks nothing itself",
                            fix=f"unpack it first (`tar xzf {path}`) and pass its xbackend-bundle folder")
    if not path.is_dir():
        raise XBackendError(f"{path} is not a directory", fix="pass run directories, baselines or unpacked bundles")
    notes: list[str] = []
    if (path / REPORT_JSON).is_file():
        run: RunDir = load_run(path)
        r = run.report.request
        same = same_fields(r.get("model_digest"), (r.get("prompt") or {}).get("digest"), r["seed"], r["steps"],
                     r["alignment"], r.get("settings"))
        status = {b["name"]: b["status"] for b in run.report.backends}
        envs = {b["name"]: b.get("env") for b in run.report.backends}
        dirs = {label: run.report.traces.get(label, f"{TRACES}/{safe_name(label)}") for label in run.labels}
        kind = "run"
    else:
        from .check import BASELINE_JSON, load_baseline

        if not (path / BASELINE_JSON).is_file():
            raise XBackendError(f"{path} holds neither {REPORT_JSON} nor {BASELINE_JSON}",
                                fix="pass run directories (`xbackend compare`), baselines (`xbackend baseline "
                                    "create`) or unpacked bundles (`xbackend report`)")
        b = load_baseline(path)
        same = same_fields(b["model"]["digest"], b["prompt"].get("digest"), b["seed"], b["steps"], b["alignment"],
                     b["settings"])
        status = {label: "ok" for label in b["traces"]}
        env = b.get("env") if isinstance(b.get("env"), dict) else {}
        envs = {label: env.get(label) if isinstance(env.get(label), dict) else None for label in b["traces"]}
        dirs = {label: t["dir"] for label, t in b["traces"].items()}
        kind = "baseline"
    traces: dict[str, Trace | None] = {}
    for label, rel in dirs.items():
        where_, trimmed = _native0(path, rel, label, notes)
        kind = "bundle" if trimmed else kind
        traces[label] = _load(where_) if where_ is not None else None
        if traces[label] is not None:
            _check_trace(path, label, traces[label], same)
            envs[label] = traces[label].meta.get("env") or envs.get(label)
    return Source(name, path, kind, same, tuple(dirs), status, traces, envs, tuple(notes))


def _check_trace(path: Path, label: str, trace: Trace, same: dict) -> None:
    """A trace must record what its directory says was run (a crafted one could claim another seed)."""
    meta = trace.meta
    got = {"model digest": (meta.get("model") or {}).get("digest"), "prompt digest": (meta.get("prompt") or {}).get("digest"),
           "seed": meta.get("seed"),
           "sampling settings": SamplingSettings.from_meta(meta) if meta.get("settings") is not None else None}
    for key, value in got.items():
        if value is not None and value != same[key]:
            raise XBackendError(f"{trace.path} ({label} on {path}) records {key} {value}, but its directory says "
                                f"{same[key]}", fix="regenerate that machine's run; traces must not be mixed")


def machine_names(paths: list[Path]) -> list[str]:
    """Each machine named after its directory; a repeated name gets `#2`, `#3`."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        base = p.resolve().name or str(p)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return out


def run_matrix(paths: list[str | Path], reference: str | None = None) -> MatrixReport:
    """Read every machine's directory and hold each backend's runs to the reference machine's."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise XBackendError("matrix needs at least one directory", fix="pass the machines' run directories")
    if len(paths) > MAX_MACHINES:
        raise XBackendError(f"matrix takes at most {MAX_MACHINES} machines, got {len(paths)}",
                            fix="split the fleet into smaller matrices")
    return build_matrix([load_source(p, n) for p, n in zip(paths, machine_names(paths))], reference)
