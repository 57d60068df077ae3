"""`compare` and `repeat`: run the diagnosis protocol (docs/design.md, The protocol behind `compare`) in one worker
process per backend, then diagnose."""

from __future__ import annotations

import io
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import create_backend, load_plugin, require_available
from .capture.run import check_request, trace_bytes
from .requests import ARBITER_AUTO, ARBITER_NONE, DEFAULT_ARBITER, CaptureRequest, CompareRequest  # noqa: F401 (CompareRequest re-exported)
from .analysis.diagnose import BackendRuns, arbiter_comparison, arbiter_distance, diagnose, repeatability
from .store import validate
from .analysis.context import context_crossed
from .errors import BackendFailed, XBackendError
from .codecs import describe_codec
from .capture.models import ModelRef, resolve_model, tiny_codec
from .store.claim import Claim, claim
from .capture.prompt import Prompt, load_prompt
from .results import CompareReport, Repeatability, Verdict, exit_code
from .store.rundir import (ARBITER, FORCED, JOBS, PORTABLE, PROMPT_CODES, REPORT_JSON, TRACES, backend_dir,
                           clear_previous_run, distinct_dirs, load_partial, native, safe_name, unique_labels)
from .samplers import parse_mode
from .spec import parse_spec, parse_specs
from .tolerances import tolerance
from .store.files import write_file, write_json
from .store.trace import Trace
from .analysis.words import run_words, trace_text
from .capture.worker import RunOutcome, prepare_worker, request_to_json, run_worker

EventFn = Callable[[dict], None]
AUTO_ARBITER_BYTES = 4e9  # `auto` runs the fp64 arbiter for models up to ~0.5B parameters


FREE_RUN_SAMPLERS = ("portable", "candle")


def free_run_sampler(req: CompareRequest) -> str:
    """The sampler of compare's comparable free runs: decisions that depend on the logits only."""
    mode = req.sampler or "portable"
    if mode not in FREE_RUN_SAMPLERS:
        raise XBackendError(f"compare's free runs cannot use the {mode!r} sampler",
                            asked=f"available are {', '.join(FREE_RUN_SAMPLERS)} (native runs are always made too)",
                            fix="pass --sampler portable or --sampler candle")
    return mode




def _runs(label: str, base: CaptureRequest, out: Path, repeats: int, forced_from: Path | None,
          free_sampler: str = "portable") -> list[dict]:
    """Every run of one backend. The comparable free run is named `portable` whichever sampler
    made it (its meta.json says which: portable, or candle)."""
    spec = label.split("#")[0]
    runs = [(native(i), replace(base, backend=spec, sampler="native", run_index=i)) for i in range(repeats)]
    runs.append((PORTABLE, replace(base, backend=spec, sampler=free_sampler, run_index=repeats)))
    if forced_from is not None:
        runs.append((FORCED, replace(base, backend=spec, sampler=f"forced:{forced_from}", run_index=repeats + 1)))
    d = backend_dir(out, label)
    return [{"name": f"{label}/{name}", "out": str(d / name), "request": request_to_json(req)} for name, req in runs]


def _arbiter_run(label: str, spec: str, base: CaptureRequest, out: Path, repeats: int) -> dict:
    """The arbiter, teacher-forced on the reference's first native run (run in the reference's worker, last)."""
    d = backend_dir(out, label)
    req = replace(base, backend=spec, sampler=f"forced:{d / native(0)}", run_index=repeats + 2)
    return {"name": f"{label}/{ARBITER}", "out": str(d / ARBITER), "request": request_to_json(req)}


def collect(label: str, tier: str, outcomes: list[RunOutcome],
            load: Callable[[Path], Trace | None] = load_partial) -> BackendRuns:
    traces = {o.name.split("/", 1)[1]: load(Path(o.out)) for o in outcomes}
    failures = []
    for o in outcomes:
        if o.status != "ok":
            tr = traces.get(o.name.split("/", 1)[1])
            failures.append({"run": o.name, "status": o.status, "error": o.error,
                             "failed_at": (tr.meta.get("failed_at") if tr else None) or (
                                 {"step": tr.steps, "stream": None} if tr else None),
                             "steps": tr.steps if tr else 0})
    prefix = native(0)[:-1]
    natives = [traces[k] for k in sorted((k for k in traces if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
               if traces[k] is not None]
    return BackendRuns(label=label, tier=tier, status="failed" if failures else "ok",
                       error=failures[0]["error"] if failures else None, native=natives,
                       portable=traces.get(PORTABLE), forced=traces.get(FORCED), failures=failures)


def resolve_arbiter(choice: str | None, model: ModelRef) -> tuple[str | None, str | None]:
    """(arbiter spec or None, why none). `auto` is cpu:fp64 when an fp64 copy of the model is small
    (`AUTO_ARBITER_BYTES`) and fits in half of this machine's memory."""
    if choice is None or choice.strip().lower() == ARBITER_NONE:
        return None, "turned off (--arbiter none)"
    if choice.strip().lower() != ARBITER_AUTO:
        return str(parse_spec(choice)), None
    if model.layout == "mlx":
        return None, (f"an MLX-native checkpoint cannot be loaded by the PyTorch arbiter {DEFAULT_ARBITER}; "
                      "pass --arbiter with an MLX spec to use one")
    need = 4 * model.weights.stat().st_size  # an fp64 copy of bf16 weights at worst
    if need > AUTO_ARBITER_BYTES:  # fp64 on the CPU reads the whole copy every step: minutes per 100 steps at 7B
        return None, (f"the model's fp64 copy (~{need / 1e9:.1f} GB) is over the {AUTO_ARBITER_BYTES / 1e9:g} GB "
                      f"that `auto` runs on the CPU; pass --arbiter {DEFAULT_ARBITER} to run it anyway")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    if memory is not None and need > memory // 2:
        return None, (f"the model's fp64 copy (~{need / 1e9:.1f} GB) does not fit in half of this machine's "
                      f"{memory / 1e9:.0f} GB; pass --arbiter {DEFAULT_ARBITER} to run it anyway")
    return DEFAULT_ARBITER, None


def run_compare(req: CompareRequest, out: str | Path, on_event: EventFn | None = None,
                min_backends: int = 1, *, force: bool = False) -> CompareReport:
    """Run every backend through the protocol and write `report.json` (and audio) to `out`.

    With one backend only its repeatability is measured (what a one-backend baseline needs).
    `out` must be new, empty or an earlier run directory, and not in use (see `outdir.claim`)."""
    started = time.perf_counter()
    out = Path(out)
    specs = parse_specs(",".join(req.backends))
    if len(specs) < min_backends:
        raise XBackendError(f"compare needs at least {min_backends} backends, got {len(specs)} ({','.join(req.backends)})",
                            fix="name a reference and at least one other, e.g. --backends cpu,mlx:cpu; "
                                "for one backend's repeatability use `xbackend repeat`")
    base = _check(req)
    free_run_sampler(req)  # a sampler the free runs cannot use is bad input, found before anything runs
    for spec in specs:
        create_backend(spec)  # a spec no backend takes (cpu:gpu, mlx:fp64) is bad input, found before --out is touched
    labels = distinct_dirs(unique_labels([str(s) for s in specs]))
    # the first worker imports its libraries and loads the model while the prompt is encoded
    # (not with plugins: one may replace the very spec, and the worker loads them only with its job)
    preload = None if req.plugins else (req.model, req.model_config)
    prepared = {labels[0]: prepare_worker(str(specs[0]), preload)}
    try:
        model, prompt = _resolve(req, out)
        runs_per_backend = req.repeats + 2  # native repeats, portable, forced
        validate.disk_space(out, sum(trace_bytes(model, req.steps, s.dtype) for s in specs) * runs_per_backend,
                            f"the traces of {len(specs)} backends x {runs_per_backend} runs x {req.steps} steps")
        with claim(out, "run", force=force) as claimed:
            base = start_run(claimed, prompt, base)
            return _run_backends(req, out, model, prompt, base, specs, labels, prepared, on_event, started)
    finally:
        for proc in prepared.values():  # prepared for a backend that never ran (unavailable, or an error)
            proc.kill()
            proc.wait()


def _check(req: CompareRequest, repeats: tuple[str, int] = ("--repeats", 1)) -> CaptureRequest:
    """The numbers, plugins and names of a request, checked before any worker starts."""
    validate.repeats(req.repeats, *repeats)
    validate.timeout(req.timeout)
    for plugin in req.plugins:
        load_plugin(plugin)
    base = CaptureRequest(backend="", model=req.model, model_config=req.model_config, seed=req.seed,
                          steps=req.steps, alignment=req.alignment, settings=req.settings,
                          prompt_frames=req.prompt_frames, compile=req.compile)
    check_request(base)
    return base


def _resolve(req: CompareRequest, out: Path) -> tuple[ModelRef, Prompt]:
    """The model, its decoder and the prompt: what a worker would trip over, found here first."""
    model = resolve_model(req.model, req.model_config)
    if req.decode_audio and model.dep_q:
        check_decoder(req.codec, model)  # before anything is written: a codec that cannot decode is bad input
    if out.exists() and not out.is_dir():
        raise XBackendError(f"--out {out} exists and is not a directory", fix="pass a directory path to --out")
    return model, load_prompt(req.prompt, model, req.steps, req.prompt_frames)


def save_codes(out: Path, codes: np.ndarray) -> str:
    """The prompt codes every worker reads, as `out/prompt_codes.npy` (atomic, through no link)."""
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    write_file(out / PROMPT_CODES, buf.getvalue())
    return str(out / PROMPT_CODES)


def start_run(claimed: Claim, prompt: Prompt, base: CaptureRequest) -> CaptureRequest:
    """Take the claimed `--out` over for this run: what an earlier xbackend run wrote there goes (only
    in a directory xbackend made, never in one taken with --force), and the prompt codes every
    backend will receive are written."""
    if claimed.owned:
        clear_previous_run(claimed.path)
    return replace(base, prompt=save_codes(claimed.path, prompt.codes), prompt_frames=prompt.own_frames)


def _run_backends(req: CompareRequest, out: Path, model: ModelRef, prompt, base: CaptureRequest, specs,
                  labels: list[str], prepared: dict, on_event: EventFn | None, started: float) -> CompareReport:
    """Every backend in its worker, in order (the next one's worker prepared meanwhile), then the report."""
    free_sampler = free_run_sampler(req)
    arbiter_spec, arbiter_off = resolve_arbiter(req.arbiter, model) if len(specs) > 1 else (None, "one backend")
    reasons = [create_backend(spec).unavailable_reason() for spec in specs]
    runnable = [label for label, reason in zip(labels, reasons) if not reason]
    backends: list[dict] = []
    runs: dict[str, BackendRuns] = {}
    job_dir = out / JOBS
    job_dir.mkdir(exist_ok=True)
    reader = TraceReader(out)
    audio = AudioDecoder(model, out, req.codec, reader.load) if req.decode_audio else None
    events = reader.watch(audio.watch(on_event) if audio else on_event)
    workers_s = 0.0
    forced_from = None  # the reference's first native run, once it completed
    arbiter = {"spec": arbiter_spec, "status": "off" if arbiter_spec is None else "not run", "error": arbiter_off,
               "trace": None}
    arbiter_trace = None
    for label, spec, reason in zip(labels, specs, reasons):
        entry = {"name": label, "spec": str(spec), "status": "ok", "error": None, "env": None}
        backends.append(entry)
        if reason:
            entry.update(status="unavailable", error=reason)
            runs[label] = BackendRuns(label, spec.tier, "unavailable", reason)
            if on_event:
                on_event({"event": "unavailable", "name": label, "error": reason})
            continue
        later = runnable[runnable.index(label) + 1:]
        if later and later[0] not in prepared:
            prepared[later[0]] = prepare_worker(str(specs[labels.index(later[0])]))
        job_runs = _runs(label, base, out, req.repeats, forced_from, free_sampler)
        if label == labels[0] and arbiter_spec is not None:
            why = create_backend(arbiter_spec).unavailable_reason()
            if why:
                arbiter.update(status="unavailable", error=why)
            else:
                job_runs.append(_arbiter_run(label, arbiter_spec, base, out, req.repeats))
        began = time.perf_counter()
        outcomes = run_worker({"plugins": [str(p) for p in req.plugins], "runs": job_runs},
                              job_dir / f"{safe_name(label)}.json", req.timeout, events,
                              prepared=prepared.pop(label, None))
        workers_s += time.perf_counter() - began
        judged = [o for o in outcomes if not o.name.endswith("/" + ARBITER)]
        runs[label] = collect(label, spec.tier, judged, reader.load)
        if label == labels[0] and runs[label].status == "ok":
            forced_from = runs[label].native[0].path
            done = next((o for o in outcomes if o.name.endswith("/" + ARBITER)), None)
            if done is not None:
                arbiter_trace = reader.load(Path(done.out)) if done.status == "ok" else None
                arbiter.update(status="ok" if arbiter_trace is not None else "failed",
                               error=None if done.status == "ok" else done.error,
                               trace=str(Path(done.out).relative_to(out)))
        if runs[label].status != "ok":
            entry.update(status="failed", error=runs[label].error)
        trace = (runs[label].native or [None])[0]
        entry["env"] = trace.meta.get("env") if trace is not None else None
    reader.pool.shutdown(wait=False)  # every trace it read is in `runs` by now
    report = build_report(req, model, prompt, labels, backends, runs, arbiter, arbiter_trace)
    report = replace(report, words=run_words({label: named_runs(r) for label, r in runs.items()}, labels[0],
                                         model.tokenizer),
                     timing=timing(runs, time.perf_counter() - started, arbiter_trace, workers_s))
    write_json(out / REPORT_JSON, report.to_dict())  # before any optional stage: a late failure loses nothing
    if audio is not None:
        codec = {"spec": req.codec, "used_for": "decoding each backend's audio tokens to audio/*.wav",
                 **describe_codec(model.codec or tiny_codec())}
        report = replace(report, audio=audio.results(runs), codec=codec,
                         timing=timing(runs, time.perf_counter() - started, arbiter_trace, workers_s))
        write_json(out / REPORT_JSON, report.to_dict())
    return report


def named_runs(runs: BackendRuns) -> dict[str, Trace | None]:
    """A backend's traces by run name (`native-0`, ..., `portable`, `forced`)."""
    return {**{native(i): t for i, t in enumerate(runs.native)}, PORTABLE: runs.portable, FORCED: runs.forced}


def timing(runs: dict[str, BackendRuns], wall: float, arbiter: Trace | None = None,
           workers_s: float | None = None) -> dict:
    """Where the time went: model loads and model steps (from the traces) against the whole command.

    A trace records the seconds its run spent loading the model (0 when it reused the one its
    worker had loaded) and `model_reused`; traces from before load-once lack it, and each loaded.
    `workers_s` is how long the worker processes ran (their start-up, imports and exit included); the
    first worker loads its model before its job arrives, so `worker_overhead_s` can be below 0."""
    traces = [t for r in runs.values() for t in [*r.native, r.portable, r.forced] if t is not None]
    traces += [arbiter] if arbiter is not None else []
    model = sum(t.meta.get("elapsed_s") or 0.0 for t in traces)
    load = sum(t.meta.get("load_s") or 0.0 for t in traces)
    loads = sum(not t.meta.get("model_reused", False) for t in traces)
    out = {"wall_s": round(wall, 3), "model_steps_s": round(model, 3), "model_load_s": round(load, 3),
           "loads": loads, "other_s": round(wall - model - load, 3), "runs": len(traces)}
    if workers_s is not None:
        out.update(workers_s=round(workers_s, 3), worker_overhead_s=round(workers_s - model - load, 3))
    return out


def build_report(req: CompareRequest, model: ModelRef, prompt, labels: list[str], backends: list[dict],
                 runs: dict[str, BackendRuns], arbiter: dict, arbiter_trace: Trace | None) -> CompareReport:
    ref = runs[labels[0]]
    window = max(int(d) for d in model.config["delays"]) + 2
    verdicts, drift, not_diagnosed = [], [], []
    distances: dict[str, dict] = {}
    if ref.status == "ok" and arbiter_trace is not None:
        distances[ref.label] = arbiter_distance(arbiter_trace, ref.native[0])
        for label in labels[1:]:
            forced = runs[label].forced
            if runs[label].status == "ok" and forced is not None:
                distances[label] = arbiter_distance(arbiter_trace, forced)
        arbiter = dict(arbiter, backends=[{"backend": k, **v} for k, v in distances.items()])
    if ref.status != "ok":  # nothing to compare against: say so, and blame no one else
        v, _ = diagnose(ref, ref, tolerance(ref.tier, ref.tier), window)
        verdicts.append(v)
        not_diagnosed = [{"backend": label, "reason": f"the reference {ref.label} is {ref.status}: {ref.error}"}
                         for label in labels[1:]]
    comparisons = []
    for label in labels[1:] if ref.status == "ok" else []:
        other = runs[label]
        versus = None
        if label in distances:
            versus = arbiter_comparison(arbiter["spec"], ref.label, distances[ref.label], label, distances[label],
                                        reference_spec=str(parse_spec(ref.label.split("#")[0])))
            comparisons.append(versus)
        v, records = diagnose(ref, other, tolerance(ref.tier, other.tier), window, versus)
        verdicts.append(v)
        drift.extend(records)
    if comparisons:
        arbiter = dict(arbiter, ratios=comparisons)
    repeat = [repeatability(r.label, r.native) for r in runs.values() if r.native]
    ran = [t.steps for r in runs.values() for t in [*r.native, r.portable, r.forced] if t is not None]
    report = CompareReport(
        request=req.to_record(model.name, model.digest, prompt.describe()), reference=labels[0],
        backends=tuple(backends), verdicts=tuple(verdicts),
        repeatability=tuple(repeat), drift=tuple(drift), not_diagnosed=tuple(not_diagnosed),
        failures=tuple(f for r in runs.values() for f in r.failures),
        traces={label: str(Path(TRACES) / safe_name(label)) for label in labels}, arbiter=arbiter,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in ["xbackend", *sys.argv[1:]]) if sys.argv else None,
        context=context_crossed(model.config, min(ran, default=0)).to_dict())
    return replace(report, verdicts=tuple(with_known_issues(v, report.known_issues(v)) for v in report.verdicts))


def with_known_issues(v: Verdict, found: list[dict]) -> Verdict:
    """A verdict that names the known issues that could explain it (its explanation then says so)."""
    return replace(v, figures={**v.figures, "known_issues": found}) if found else v


def check_decoder(spec: str, model: ModelRef) -> None:
    """Refuse, before any backend runs, a decoding codec that is unknown, missing or cannot load the model's Mimi."""
    from .codecs import create_codec, require_codec
    from .codecs.base import check_codebooks

    ref = model.codec or tiny_codec()
    codec = require_codec(create_codec(spec))
    codec.check(ref, check_codebooks(ref, model.dep_q))


class TraceReader:
    """Each run's trace read and its digests verified in a thread of its own as soon as its worker says
    it is done, so the parent's verification overlaps the runs that follow instead of following the last.
    A trace is read once; `load` waits for it (or reads one that was never announced)."""

    def __init__(self, out: Path):
        from concurrent.futures import ThreadPoolExecutor

        self.out = out
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="xbackend-verify")
        self.jobs: dict = {}

    def watch(self, on_event: EventFn | None) -> EventFn:
        def handler(event: dict) -> None:
            name = str(event.get("name", ""))
            if event.get("event") == "done" and "/" in name:
                label, run = name.rsplit("/", 1)
                path = backend_dir(self.out, label) / run
                self.jobs.setdefault(path, self.pool.submit(load_partial, path))
            if on_event:
                on_event(event)
        return handler

    def load(self, path: Path) -> Trace | None:
        path = Path(path)
        job = self.jobs.get(path)
        return job.result() if job is not None else load_partial(path)


class AudioDecoder:
    """Each backend's first native run decoded to WAV by a codec (spec), in a thread of its own
    as soon as that run is written, so decoding overlaps the runs that follow instead of the end."""

    def __init__(self, model: ModelRef, out: Path, codec: str,
                 load: Callable[[Path], Trace | None] = load_partial):
        from concurrent.futures import ThreadPoolExecutor

        self.model, self.out, self.codec, self.load = model, out, codec, load
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="xbackend-audio")
        self.jobs: dict = {}

    def watch(self, on_event: EventFn | None) -> EventFn:
        """An event handler that starts a decode when a `native-0` run is done, then passes the event on."""
        def handler(event: dict) -> None:
            name = str(event.get("name", ""))
            if event.get("event") == "done" and name.endswith("/" + native(0)):
                label = name.rsplit("/", 1)[0]
                self.jobs[label] = self.pool.submit(self.decode, label, backend_dir(self.out, label) / native(0))
            if on_event:
                on_event(event)
        return handler

    def decode(self, label: str, path: Path) -> str | None:
        from .codecs import audio
        from .store.rundir import AUDIO

        trace = self.load(path)
        if trace is None or trace.steps <= max(self.model.delays) or not self.model.dep_q:
            return None
        wav = self.out / AUDIO / f"{safe_name(label)}.wav"
        try:
            audio.tokens_to_wav(self.model, trace, wav, self.codec)
        except XBackendError as exc:
            return f"not decoded: {exc}"
        except Exception as exc:  # noqa: BLE001 - an optional stage: its failure is a note, never a lost run
            return f"not decoded: the codec failed ({type(exc).__name__}: {str(exc)[:200]})"
        return str(wav.relative_to(self.out))

    def results(self, runs: dict[str, BackendRuns]) -> dict:
        """Decoded paths (or why not) by backend; a backend whose native-0 never finished is tried now."""
        self.pool.shutdown(wait=True)
        written = {}
        for label, r in runs.items():
            done = self.jobs[label].result() if label in self.jobs else (
                self.decode(label, r.native[0].path) if r.native else None)
            if done is not None:
                written[label] = done
        return written


@dataclass(frozen=True)
class RepeatResult:
    """`repeat`: one backend's bitwise repeatability over N runs, and runs that failed."""

    repeatability: Repeatability
    failures: tuple[dict, ...]
    identical_logits_runs: int
    identical_token_runs: int
    run_digests: tuple[str, ...]
    words: tuple[dict, ...] = ()  # per run: its words and the digest of its decoded audio

    @property
    def identical_text_runs(self) -> int:
        return sum(w["text"] == self.words[0]["text"] for w in self.words)

    @property
    def identical_audio_runs(self) -> int:
        first = self.words[0]["audio_digest"] if self.words else None
        return sum(w["audio_digest"] is not None and w["audio_digest"] == first for w in self.words)

    @property
    def exit_code(self) -> int:
        return exit_code(backend_failed=bool(self.failures), attention=self.repeatability.repeatable is not True)

    def to_dict(self) -> dict:
        return {**self.repeatability.to_dict(), "schema": "xbackend.repeat/1", "failures": list(self.failures),
                "identical_logits_runs": self.identical_logits_runs, "identical_token_runs": self.identical_token_runs,
                "run_digests": list(self.run_digests), "words": list(self.words),
                "identical_text_runs": self.identical_text_runs, "identical_audio_runs": self.identical_audio_runs,
                "exit_code": self.exit_code}


def run_repeat(req: CompareRequest, out: str | Path, on_event: EventFn | None = None, *,
               force: bool = False) -> RepeatResult:
    """Run one backend `req.repeats` times, same seed and inputs: is it bitwise repeatable?"""
    out = Path(out)
    specs = parse_specs(",".join(req.backends))
    if len(specs) != 1:
        raise XBackendError(f"repeat runs one backend, got {len(specs)} ({','.join(req.backends)})",
                            fix="pass one spec, e.g. --backend mps; to compare backends use `xbackend compare`")
    (spec,) = specs
    base = replace(_check(req, repeats=("--runs", 2)), backend=str(spec), sampler=req.sampler or "native")
    check_request(base)
    if parse_mode(base.sampler)[0] == "forced":
        raise XBackendError("repeat cannot use the forced sampler", asked=f"--sampler {base.sampler}",
                            fix="pass --sampler native, portable, greedy or candle")
    require_available(create_backend(spec))
    model, prompt = _resolve(req, out)
    validate.disk_space(out, trace_bytes(model, req.steps, spec.dtype) * req.repeats,
                        f"the traces of {req.repeats} runs x {req.steps} steps")
    with claim(out, "repeat", force=force) as claimed:
        return _repeat(req, out, on_event, spec, model, start_run(claimed, prompt, base))


def _repeat(req: CompareRequest, out: Path, on_event: EventFn | None, spec, model: ModelRef,
            base: CaptureRequest) -> RepeatResult:
    label = str(spec)
    runs = [{"name": f"{label}/run-{i}", "out": str(out / TRACES / f"run-{i}"),
             "request": request_to_json(replace(base, run_index=i))} for i in range(req.repeats)]
    (out / JOBS).mkdir(exist_ok=True)
    outcomes = run_worker({"plugins": [str(p) for p in req.plugins], "runs": runs},
                          out / JOBS / "repeat.json", req.timeout, on_event)
    traces = [t for t in (load_partial(Path(o.out)) for o in outcomes) if t is not None]
    if not traces:
        raise BackendFailed(f"Backend {label} wrote no trace in {req.repeats} runs ({outcomes[0].error})")
    result = RepeatResult(repeatability(label, traces),
                          tuple({"run": o.name, "status": o.status, "error": o.error} for o in outcomes
                                if o.status != "ok"),
                          sum(t.digests == traces[0].digests for t in traces),
                          sum(bool(np.array_equal(t.tokens, traces[0].tokens)) for t in traces),
                          tuple(_run_digest(t) for t in traces),
                          tuple(repeat_words(model, traces, out, req.decode_audio)))
    write_json(out / "repeat.json", result.to_dict())
    return result


def repeat_words(model: ModelRef, traces: list[Trace], out: Path, decode: bool = True) -> list[dict]:
    """Per run: its words and a digest of its decoded audio (written to audio/run-N.wav): how many of
    N runs say the same thing, and sound the same."""
    import soundfile as sf

    from .codecs.audio import decode_trace
    from .capture.prompt import SAMPLE_RATE
    from .store.rundir import AUDIO
    from .analysis.words import audio_digest

    rows = []
    for i, trace in enumerate(traces):
        row = {"run": i, "text": trace_text(trace), "audio_digest": None, "audio": None}
        if decode and trace.steps > max(model.delays) and model.dep_q:
            try:
                samples = decode_trace(model, trace)
            except XBackendError as exc:
                row["audio"] = f"not decoded: {exc}"
            except Exception as exc:  # noqa: BLE001 - an optional stage: its failure is a note, never a lost run
                row["audio"] = f"not decoded: the codec failed ({type(exc).__name__}: {str(exc)[:200]})"
            else:
                path = out / AUDIO / f"run-{i}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), samples, SAMPLE_RATE, subtype="PCM_16")
                row.update(audio_digest=audio_digest(samples), audio=str(path.relative_to(out)))
        rows.append(row)
    return rows


def _run_digest(trace: Trace) -> str:
    """One digest for a whole run: its step digests and its tokens."""
    import hashlib

    h = hashlib.sha256("".join(trace.digests).encode())
    h.update(np.ascontiguousarray(trace.tokens).tobytes())
    return h.hexdigest()[:16]
