"""`locate`: for one backend of a compare run, the first module where it parts from the reference.

Both are re-run in this process, teacher-forced on the reference's first native run, up to step S
(default: the verdict's first divergence), on the devices and dtypes of the run, CUDA graphs off;
every mapped module (backends/modulemap.py) is compared over the window of steps ending at S, in
two modes (capture/layers.py), and judged against module tolerances (analysis/locate.py). The result is
added to the run's report.json (`locate`, by backend) and returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .analysis.locate import SCHEMA, LocateResult, summarize
from .backends import Job, create_backend, load_plugin, require_available
from .backends.base import ALIGNMENTS
from .backends.modulemap import module_map
from .capture.layers import MODES, run_pass
from .capture.models import resolve_model
from .capture.prompt import load_prompt
from .capture.run import LoadedBackend
from .errors import XBackendError
from .samplers import Sampler, SamplingSettings
from .store import validate
from .store.claim import inside
from .store.rundir import FORCED, NATIVE_0, PROMPT_CODES, REPORT_JSON, RunDir, load_run, unique_labels
from .store.files import write_json
from .tolerances import tolerance

DEFAULT_WINDOW = 4
MAX_WINDOW = 64


@dataclass(frozen=True)
class LocateRequest:
    run_dir: str
    backend: str | None = None  # a label of the run; default: the first whose verdict needs attention
    at: int | None = None  # step S; default: the verdict's first divergence
    window: int = DEFAULT_WINDOW
    plugins: tuple[str, ...] = ()
    model: str | None = None  # default: the run's model, which must match its digest


def pick_backend(run: RunDir, asked: str | None) -> str:
    others = run.labels[1:]
    if asked is not None:
        if asked not in others:
            raise XBackendError(f"Backend {asked!r} is not a compared backend of {run.path}",
                                asked=f"the reference is {run.reference}; the others are {', '.join(others) or 'none'}",
                                fix="pass --backend with one of them")
        return asked
    for v in run.report.verdicts:
        if v.backend in others and not v.expected and v.verdict != "BACKEND_FAILED":
            return v.backend
    raise XBackendError(f"No backend of {run.path} needs attention",
                        asked=f"verdicts: {', '.join(f'{v.backend} {v.verdict}' for v in run.report.verdicts) or 'none'}",
                        fix="pass --backend LABEL (and --at STEP) to locate a backend anyway")


def run_locate(req: LocateRequest, *, write: bool = True) -> LocateResult:
    started = time.perf_counter()
    validate.integer("--window", req.window, 1, MAX_WINDOW)
    for plugin in req.plugins:
        load_plugin(plugin)
    run = load_run(req.run_dir)
    label = pick_backend(run, req.backend)
    ref_label = run.reference
    verdict = run.report.verdict_for(label)
    point = verdict.first_divergence if verdict is not None else None
    step = req.at if req.at is not None else (point.step if point is not None else None)
    if step is None:
        raise XBackendError(f"The verdict of {label} has no first divergence to locate",
                            fix="pass --at STEP")
    ref_trace = run.trace(ref_label, NATIVE_0)
    if ref_trace is None:
        raise XBackendError(f"The reference {ref_label} of {run.path} has no native run to force on",
                            fix="run xbackend compare again")
    validate.integer("--at", step, 0, max(ref_trace.steps - 1, 0),
                     f" (the reference's run {NATIVE_0} has {ref_trace.steps} steps)")
    r = run.report.request
    job = forced_job(run, run_model(run, req.model), ref_trace, step)
    sessions = tuple(LoadedBackend(require_available(create_backend(lab.split("#")[0])), job.model)
                     for lab in (ref_label, label))
    other_trace = run.trace(label, FORCED)
    notes = []
    if r.get("plugins") and not req.plugins:
        notes.append(f"compare ran with plugins {', '.join(map(str, r['plugins']))}; locate ran without them "
                     "(pass them with --plugin to locate what compare saw)")
    result = locate_pair(sessions[0], sessions[1], job, req.window, (ref_label, label),
                         point.stream if point else None, forced=other_trace, notes=tuple(notes))
    result = replace(result, run=dict(result.run, seconds_total=round(time.perf_counter() - started, 3)))
    if write:
        save(run, result)
    return result


def run_model(run: RunDir, asked: str | None):
    """The run's model (or the one asked for), which must have the digest the run recorded."""
    r = run.report.request
    model = resolve_model(asked or r["model"], r.get("model_config") if asked is None else None)
    if r.get("model_digest") and model.digest != r["model_digest"]:
        raise XBackendError(f"Model {model.name!r} has digest {model.digest}, but {run.path} was compared with "
                            f"model {r['model']!r} (digest {r['model_digest']})",
                            fix="pass --model with the checkpoint the run used")
    return model


def forced_job(run: RunDir, model, ref_trace, step: int) -> Job:
    """Steps 0..`step` teacher-forced on the reference's tokens, with the run's prompt codes, seed,
    settings and alignment."""
    r = run.report.request
    if r.get("alignment", "aligned") not in ALIGNMENTS:
        raise XBackendError(f"{run.path}'s report.json has alignment {r.get('alignment')!r}",
                            asked=f"alignments are {', '.join(ALIGNMENTS)}", fix="run xbackend compare again")
    prompt = load_prompt(str(inside(run.path, PROMPT_CODES, "the run's prompt codes")), model, step + 1)
    seed = validate.seed(r["seed"])
    tokens = ref_trace.tokens[:step + 1].astype(np.int64)
    sampler = Sampler("forced", seed, SamplingSettings.from_dict(r.get("settings")), forced_tokens=tokens,
                      forced_from=str(ref_trace.path))
    return Job(model, prompt.codes, step + 1, seed, sampler, r.get("alignment", "aligned"))


def locate_pair(ref: LoadedBackend, other: LoadedBackend, job: Job, window: int = DEFAULT_WINDOW,
                labels: tuple[str, str] | None = None, stream: str | None = None, forced=None,
                notes: tuple[str, ...] = ()) -> LocateResult:
    """Both backends teacher-forced by `job` (its forced sampler) through step S = `job.steps - 1`, every
    mapped module compared over the `window` steps ending at S, in both modes. `forced`: the backend's
    forced trace of the run, to check that the instrumented run reproduces it."""
    validate.integer("--window", window, 1, MAX_WINDOW)
    labels = tuple(unique_labels(list(labels or (ref.backend.label, other.backend.label))))
    step = job.steps - 1
    entries = module_map(job.model.config)
    start = max(0, step - window + 1)
    passes = {mode: run_pass(mode, ref, other, (job, replace(job, run_index=1)), entries, start) for mode in MODES}
    tier_tol = tolerance(ref.backend.spec.tier, other.backend.spec.tier)
    run_info = {
        "devices": {labels[0]: ref.backend.device_name(), labels[1]: other.backend.device_name()},
        "tiers": {labels[0]: ref.backend.spec.tier, labels[1]: other.backend.spec.tier},
        "cuda_graphs": False, "steps_run": step + 1, "passes": list(MODES),
        "seconds": {mode: round(p.seconds, 3) for mode, p in passes.items()},
        "load_seconds": {labels[0]: round(ref.load_s, 3), labels[1]: round(other.load_s, 3)},
        "reproduces": reproduces(passes["propagated"], forced),
    }
    return summarize(entries, passes, tier_tol, labels, step, stream, run_info, notes)


def reproduces(p, forced) -> dict:
    """Does the instrumented run give the logits the run's forced trace recorded? max |Δlogit| per window step."""
    if forced is None:
        return {"forced_trace": False, "max_abs": None}
    out = []
    for i, step in enumerate(p.steps):
        if step >= forced.steps:
            out.append(None)
            continue
        out.append(max(float(np.max(np.abs(forced.logits(stream)[step].astype(np.float64) - l)))
                       for stream, l in zip(forced.streams, p.logits[i])))
    known = [x for x in out if x is not None]
    return {"forced_trace": True, "max_abs": out, "identical": bool(known) and max(known) == 0.0}


def save(run: RunDir, result: LocateResult) -> None:
    """Add the result to report.json's `locate` section (by backend); the verdict's explanation gains its sentence."""
    save_entry(run, result.backend, result.to_dict())


def save_entry(run: RunDir, label: str, entry: dict) -> None:
    located = dict(run.report.locate or {})
    old = located.get(label, {}).get("sentence") if isinstance(located.get(label), dict) else None
    verdicts = tuple(_without(v, old) if v.backend == label else v for v in run.report.verdicts)
    located[label] = entry
    write_json(run.path / REPORT_JSON, replace(run.report, verdicts=verdicts, locate=located).to_dict())


def _without(verdict, sentence: str | None):
    """A verdict read back from report.json, its explanation without an earlier located sentence."""
    text = verdict.recorded_explanation
    if sentence and text is not None and text.endswith(" " + sentence):
        return replace(verdict, recorded_explanation=text[:-len(sentence) - 1])
    return verdict


def locate_all(out: str | Path, report, plugins: tuple[str, ...] = (), window: int = DEFAULT_WINDOW):
    """`compare --locate`: locate every backend whose verdict needs attention (not a failed one); a
    backend that cannot be located gets its reason in the `locate` section. Returns the report as written."""
    out = Path(out)
    for v in report.verdicts:
        if v.expected or v.verdict == "BACKEND_FAILED" or v.backend == report.reference:
            continue
        try:
            run_locate(LocateRequest(run_dir=str(out), backend=v.backend, window=window, plugins=plugins))
        except XBackendError as exc:
            save_entry(load_run(out), v.backend, {"schema": SCHEMA, "backend": v.backend, "error": str(exc)})
    return load_run(out).report
