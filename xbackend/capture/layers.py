"""Module-level capture for `locate`: the reference and one backend stepped in turn, in one process.

Both are teacher-forced on the same tokens. At every step the reference runs first; each mapped
module's output is compared with the backend's at once, so only one step's activations are ever
held, and only the steps of the window are recorded at all.

- propagated: the backend runs on its own activations (its own KV cache);
- isolated: every mapped module of the backend is fed the reference's input of that module at
  every step (Numeric Suite's shadow mode). Its attention caches are then built from the
  reference's inputs: the reference's cache, recomputed by the backend's own projections.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from ..backends import Job, StepRecorder
from ..backends.modulemap import ModuleEntry
from ..backends.probe import ProbeStep
from ..errors import BackendFailed
from .run import LoadedBackend

MODES = ("propagated", "isolated")


@dataclass(frozen=True)
class PassResult:
    """One mode over the window: per module and window step, (max |Δ|, max |reference|)."""

    mode: str
    steps: tuple[int, ...]
    diffs: dict[str, list]  # module -> per window step [max_abs, scale] or None (module did not run)
    keys: dict[str, dict[str, list]]  # attention module -> {"reference": [...], "backend": [...]} per step
    last_position: dict[str, dict[str, list]]
    logits: list[list[np.ndarray]]  # the backend's logits per window step (stream order)
    logits_max_abs: list[float]  # per window step: max |Δlogit| between the two, over streams
    seconds: float


def _diff(ref: np.ndarray | None, other: np.ndarray | None) -> list | None:
    if ref is None or other is None:
        return None
    a, b = np.asarray(ref, np.float64).ravel(), np.asarray(other, np.float64).ravel()
    if a.shape != b.shape:
        return [float("inf"), float(np.max(np.abs(a))) if a.size else 0.0]
    return [float(np.max(np.abs(a - b))) if a.size else 0.0, float(np.max(np.abs(a))) if a.size else 0.0]


def run_pass(mode: str, ref: LoadedBackend, other: LoadedBackend, jobs: tuple[Job, Job],
             entries: list[ModuleEntry], start: int) -> PassResult:
    """Step both `jobs` (the reference's, the backend's; same steps) in turn, recording the window
    `start .. steps-1`; `mode` isolated feeds the backend the reference's module inputs."""
    began = time.perf_counter()
    isolated = mode == "isolated"
    steps = tuple(range(start, jobs[0].steps))
    names = [e.name for e in entries]
    diffs: dict[str, list] = {n: [] for n in names}
    attention = [e.name for e in entries if e.kind == "attention"]
    keys = {n: {"reference": [], "backend": []} for n in attention}
    last = {n: {"reference": [], "backend": []} for n in attention}
    logits, logits_max = [], []
    sessions = (ref, other)
    for s in sessions:
        s.load()
    recorders = [StepRecorder(job, s.model.streams, s.backend.on_logits) for s, job in zip(sessions, jobs)]
    probes = [s.backend.layer_probe(entries) for s in sessions]
    with probes[0], probes[1], contextlib.ExitStack() as stack:
        iters = [stack.enter_context(contextlib.closing(s.backend.steps(job, rec)))
                 for s, job, rec in zip(sessions, jobs, recorders)]
        for t in range(jobs[0].steps):
            keep = t >= start
            r_step, r_rec = _one(probes[0], iters[0], sessions[0], t, keep, isolated, None)
            o_step, o_rec = _one(probes[1], iters[1], sessions[1], t, keep, False, r_step.inputs if isolated else None)
            if not keep:
                continue
            for n in names:
                diffs[n].append(_diff(r_step.outputs.get(n), o_step.outputs.get(n)))
            for n in attention:
                for side, step in (("reference", r_step), ("backend", o_step)):
                    keys[n][side].append(step.keys.get(n))
                    last[n][side].append(step.last_position.get(n))
            logits.append(o_rec.logits)
            logits_max.append(max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(r_rec.logits, o_rec.logits)))
    return PassResult(mode, steps, diffs, keys, last, logits, logits_max, time.perf_counter() - began)


def _one(probe, steps, session: LoadedBackend, t: int, keep: bool, record_inputs: bool,
         feed: dict | None) -> tuple[ProbeStep, object]:
    probe.begin(t, keep, record_inputs, feed)
    try:
        record = next(steps)
    except StopIteration:
        raise BackendFailed(f"Backend {session.backend.label} stopped before step {t}") from None
    finally:
        probe.end()
    return probe.take(), record
