"""`compare` and `repeat`: run the protocol (docs/design.md, The protocol behind `compare`) in one worker process per backend, then diagnose."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import create_backend, load_plugin, require_available
from .capture import DEFAULT_SEED, CaptureRequest, check_request
from .diagnose import BackendRuns, diagnose, explain, repeatability
from .errors import BackendFailed, XBackendError
from .metrics import tolerance
from .codecs import describe_codec
from .models import ModelRef, resolve_model, tiny_codec
from .prompt import Prompt, load_prompt
from .samplers import SamplingSettings, parse_mode
from .spec import parse_specs
from .trace import Trace, TruncatedTraceWarning, load_trace, write_json_atomic
from .words import run_words
from .worker import RunOutcome, prepare_worker, request_to_json, run_worker

SCHEMA = "xbackend.report/1"
EventFn = Callable[[dict], None]


@dataclass(frozen=True)
class CompareRequest:
    backends: tuple[str, ...]
    model: str = "tiny"
    model_config: str | None = None
    prompt: str | None = None
    seed: int = DEFAULT_SEED
    steps: int = 100
    repeats: int = 2
    timeout: float = 600.0
    alignment: str = "aligned"
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    plugins: tuple[str, ...] = ()
    decode_audio: bool = True
    codec: str = "torch:cpu"  # the codec spec that decodes each backend's audio tokens
    sampler: str | None = None  # compare: the comparable free runs' (portable | candle); repeat: the runs' (native)


FREE_RUN_SAMPLERS = ("portable", "candle")


def free_run_sampler(req: CompareRequest) -> str:
    """The sampler of compare's comparable free runs: decisions that depend on the logits only."""
    mode = req.sampler or "portable"
    if mode not in FREE_RUN_SAMPLERS:
        raise XBackendError(f"compare's free runs cannot use the {mode!r} sampler",
                            asked=f"available are {', '.join(FREE_RUN_SAMPLERS)} (native runs are always made too)",
                            fix="pass --sampler portable or --sampler candle")
    return mode


def safe_name(label: str) -> str:
    """A backend label as a directory name: every run of characters outside [A-Za-z0-9_.-] becomes
    one `_`, so `mlx:cpu` is stored as `traces/mlx_cpu` and a second `cpu` (`cpu#2`) as `traces/cpu_2`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


_TRACE_FILES = re.compile(r"(meta\.json(\.tmp)?|digests\.txt|tokens\.bin|margins\.bin|inputs\.bin|logits-[^/]+\.bin)")
_RUN_FILES = ("report.json", "report.md", "repeat.json", "bundle.tar.gz", "prompt_codes.npy")


def _is_trace_dir(path: Path) -> bool:
    try:
        return str(json.loads((path / "meta.json").read_text()).get("schema", "")).startswith("xbackend.trace/")
    except (OSError, ValueError, AttributeError):
        return False


def clear_previous_run(out: Path) -> list[Path]:
    """Remove what an earlier `compare`, `repeat` or `report` wrote into `out`, so that a reused
    `--out` never mixes the traces of backends that are no longer asked for with the new ones.

    Only xbackend's own files go: trace files inside directories whose meta.json is an xbackend
    trace, job files, the audio and plots an earlier report.json names, and the run's own
    reports; directories are removed only when that leaves them empty. Returns what was removed."""
    removed: list[Path] = []

    def unlink(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)

    try:
        old = json.loads((out / "report.json").read_text())
        labels = list(old.get("traces") or {})
        audio = [str(a) for a in (old.get("audio") or {}).values()]
    except (OSError, ValueError, AttributeError):
        labels, audio = [], []
    for label in labels:
        unlink(out / "plots" / f"drift-{safe_name(str(label))}.png")
    for rel in audio:
        if re.fullmatch(r"audio/[A-Za-z0-9_.-]+\.wav", rel):
            unlink(out / rel)
    for job in (out / "jobs").glob("*.json"):
        try:
            is_job = {"runs", "plugins"} <= set(json.loads(job.read_text()))
        except (OSError, ValueError, TypeError):
            is_job = False
        if is_job:
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


def unique_labels(specs: list[str]) -> list[str]:
    """`cpu,cpu` becomes `cpu`, `cpu#2`: a backend may be compared with a copy of itself."""
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}#{seen[s]}")
    return out


def load_partial(path: Path) -> Trace | None:
    """A trace as far as it got, or None when the run never started writing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncatedTraceWarning)
            return load_trace(path)
    except XBackendError:
        return None


def _runs(label: str, base: CaptureRequest, out: Path, repeats: int, forced_from: Path | None,
          free_sampler: str = "portable") -> list[dict]:
    """Every run of one backend. The comparable free run is named `portable` whichever sampler
    made it (its meta.json says which: portable, or candle)."""
    spec = label.split("#")[0]
    runs = [(f"native-{i}", replace(base, backend=spec, sampler="native", run_index=i)) for i in range(repeats)]
    runs.append(("portable", replace(base, backend=spec, sampler=free_sampler, run_index=repeats)))
    if forced_from is not None:
        runs.append(("forced", replace(base, backend=spec, sampler=f"forced:{forced_from}", run_index=repeats + 1)))
    d = out / "traces" / safe_name(label)
    return [{"name": f"{label}/{name}", "out": str(d / name), "request": request_to_json(req)} for name, req in runs]


def collect(label: str, tier: str, outcomes: list[RunOutcome]) -> BackendRuns:
    traces = {o.name.split("/", 1)[1]: load_partial(Path(o.out)) for o in outcomes}
    failures = []
    for o in outcomes:
        if o.status != "ok":
            tr = traces.get(o.name.split("/", 1)[1])
            failures.append({"run": o.name, "status": o.status, "error": o.error,
                             "failed_at": (tr.meta.get("failed_at") if tr else None) or (
                                 {"step": tr.steps, "stream": None} if tr else None),
                             "steps": tr.steps if tr else 0})
    native = [traces[k] for k in sorted(traces) if k.startswith("native-") and traces[k] is not None]
    return BackendRuns(label=label, tier=tier, status="failed" if failures else "ok",
                       error=failures[0]["error"] if failures else None, native=native,
                       portable=traces.get("portable"), forced=traces.get("forced"), failures=failures)


def start_run(req: CompareRequest, base: CaptureRequest, out: Path) -> tuple[ModelRef, Prompt, CaptureRequest]:
    """Resolve the model, encode the prompt once, and take `out` over for this run: what an earlier
    run wrote there goes, and the prompt codes every backend will receive are written."""
    model = resolve_model(req.model, req.model_config)
    if req.decode_audio and model.dep_q:
        check_decoder(req.codec, model)  # before anything is written: a codec that cannot decode is bad input
    prompt = load_prompt(req.prompt, model, req.steps)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_run(out)
    np.save(out / "prompt_codes.npy", prompt.codes)
    return model, prompt, replace(base, prompt=str(out / "prompt_codes.npy"))


def run_compare(req: CompareRequest, out: str | Path, on_event: EventFn | None = None,
                min_backends: int = 1) -> dict:
    """Run every backend through the protocol and write `report.json` (and audio) to `out`.

    With one backend only its repeatability is measured (what a one-backend baseline needs)."""
    started = time.perf_counter()
    out = Path(out)
    specs = parse_specs(",".join(req.backends))
    if len(specs) < min_backends:
        raise XBackendError(f"compare needs at least {min_backends} backends, got {len(specs)} ({','.join(req.backends)})",
                            fix="name a reference and at least one other, e.g. --backends cpu,mlx:cpu; "
                                "for one backend's repeatability use `xbackend repeat`")
    if req.repeats < 1:
        raise XBackendError(f"--repeats must be at least 1, got {req.repeats}")
    if req.timeout <= 0:
        raise XBackendError(f"--timeout must be positive, got {req.timeout}")
    free_run_sampler(req)  # a sampler the free runs cannot use is bad input, found before anything runs
    for plugin in req.plugins:
        load_plugin(plugin)
    base = CaptureRequest(backend="", model=req.model, model_config=req.model_config, seed=req.seed,
                          steps=req.steps, alignment=req.alignment, settings=req.settings)
    check_request(base)
    labels = unique_labels([str(s) for s in specs])
    prepared = {labels[0]: prepare_worker(str(specs[0]))}  # imports its libraries while the prompt is encoded
    try:
        model, prompt, base = start_run(req, base, out)
        return _run_backends(req, out, model, prompt, base, specs, labels, prepared, on_event, started)
    finally:
        for proc in prepared.values():  # prepared for a backend that never ran (unavailable, or an error)
            proc.kill()
            proc.wait()


def _run_backends(req: CompareRequest, out: Path, model, prompt, base: CaptureRequest, specs, labels: list[str],
                  prepared: dict, on_event: EventFn | None, started: float) -> dict:
    """Every backend in its worker, in order (the next one's worker prepared meanwhile), then the report."""
    free_sampler = free_run_sampler(req)
    reasons = [create_backend(spec).unavailable_reason() for spec in specs]
    runnable = [label for label, reason in zip(labels, reasons) if not reason]
    backends: list[dict] = []
    runs: dict[str, BackendRuns] = {}
    job_dir = out / "jobs"
    job_dir.mkdir(exist_ok=True)
    audio = AudioDecoder(model, out, req.codec) if req.decode_audio else None
    events = audio.watch(on_event) if audio else on_event
    workers_s = 0.0
    forced_from = None  # the reference's first native run, once it completed
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
        job = {"plugins": [str(p) for p in req.plugins],
               "runs": _runs(label, base, out, req.repeats, forced_from, free_sampler)}
        began = time.perf_counter()
        outcomes = run_worker(job, job_dir / f"{safe_name(label)}.json", req.timeout, events,
                              prepared=prepared.pop(label, None))
        workers_s += time.perf_counter() - began
        runs[label] = collect(label, spec.tier, outcomes)
        if label == labels[0] and runs[label].status == "ok":
            forced_from = runs[label].native[0].path
        if runs[label].status != "ok":
            entry.update(status="failed", error=runs[label].error)
        trace = (runs[label].native or [None])[0]
        entry["env"] = trace.meta.get("env") if trace is not None else None
    report = build_report(req, model, prompt, labels, backends, runs, out)
    report["words"] = run_words({label: named_runs(r) for label, r in runs.items()}, labels[0])
    if audio is not None:
        report["audio"] = audio.results(runs)
        report["codec"] = {"spec": req.codec, "used_for": "decoding each backend's audio tokens to audio/*.wav",
                           **describe_codec(model.codec or tiny_codec())}
    report["timing"] = timing(runs, time.perf_counter() - started, workers_s)
    write_json_atomic(out / "report.json", report)
    return report


def named_runs(runs: BackendRuns) -> dict[str, Trace | None]:
    """A backend's traces by run name (`native-0`, ..., `portable`, `forced`)."""
    return {**{f"native-{i}": t for i, t in enumerate(runs.native)}, "portable": runs.portable, "forced": runs.forced}


def timing(runs: dict[str, BackendRuns], wall: float, workers_s: float | None = None) -> dict:
    """Where the time went: model loads and model steps (from the traces) against the whole command.

    A trace records the seconds its run spent loading the model (0 when it reused the one its
    worker had loaded) and `model_reused`; traces from before load-once lack it, and each loaded.
    `workers_s` is how long the worker processes ran (their start-up, imports and exit included)."""
    traces = [t for r in runs.values() for t in [*r.native, r.portable, r.forced] if t is not None]
    model = sum(t.meta.get("elapsed_s") or 0.0 for t in traces)
    load = sum(t.meta.get("load_s") or 0.0 for t in traces)
    loads = sum(not t.meta.get("model_reused", False) for t in traces)
    out = {"wall_s": round(wall, 3), "model_steps_s": round(model, 3), "model_load_s": round(load, 3),
           "loads": loads, "other_s": round(wall - model - load, 3), "runs": len(traces)}
    if workers_s is not None:
        out.update(workers_s=round(workers_s, 3), worker_overhead_s=round(workers_s - model - load, 3))
    return out


def build_report(req: CompareRequest, model, prompt, labels: list[str], backends: list[dict],
                 runs: dict[str, BackendRuns], out: Path) -> dict:
    ref = runs[labels[0]]
    window = max(int(d) for d in model.config["delays"]) + 2
    verdicts, drift, not_diagnosed = [], [], []
    if ref.status != "ok":  # nothing to compare against: say so, and blame no one else
        v, _ = diagnose(ref, ref, tolerance(ref.tier, ref.tier), window)
        v["explanation"] = explain(v)
        verdicts.append(v)
        not_diagnosed = [{"backend": label, "reason": f"the reference {ref.label} is {ref.status}: {ref.error}"}
                         for label in labels[1:]]
    for label in labels[1:] if ref.status == "ok" else []:
        other = runs[label]
        tol = tolerance(ref.tier, other.tier)
        v, records = diagnose(ref, other, tol, window)
        v["explanation"] = explain(v)
        verdicts.append(v)
        drift.extend(records)
    repeat = [repeatability(r.label, r.native) for r in runs.values() if r.native]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["xbackend", *sys.argv[1:]]) if sys.argv else None,
        "request": {"backends": list(req.backends), "model": model.name, "model_config": req.model_config,
                    "model_digest": model.digest,
                    "prompt": prompt.describe(), "seed": req.seed, "steps": req.steps, "repeats": req.repeats,
                    "timeout": req.timeout, "alignment": req.alignment, "sampler": req.sampler or "portable",
                    "settings": req.settings.__dict__, "plugins": list(req.plugins)},
        "reference": labels[0],
        "reference_repeatability": next((r for r in repeat if r["backend"] == labels[0]), None),
        "backends": backends,
        "verdicts": verdicts,
        "not_diagnosed": not_diagnosed,
        "repeatability": repeat,
        "drift": drift,
        "failures": [f for r in runs.values() for f in r.failures],
        "traces": {label: str(Path("traces") / safe_name(label)) for label in labels},
    }


def check_decoder(spec: str, model) -> None:
    """Refuse, before any backend runs, a decoding codec that is unknown, missing or cannot load the model's Mimi."""
    from .codecs import create_codec, require_codec
    from .codecs.base import check_codebooks

    ref = model.codec or tiny_codec()
    codec = require_codec(create_codec(spec))
    codec.check(ref, check_codebooks(ref, model.dep_q))


class AudioDecoder:
    """Each backend's first native run decoded to WAV by a codec (spec), in a thread of its own
    as soon as that run is written, so decoding overlaps the runs that follow instead of the end."""

    def __init__(self, model, out: Path, codec: str):
        from concurrent.futures import ThreadPoolExecutor

        self.model, self.out, self.codec = model, out, codec
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="xbackend-audio")
        self.jobs: dict = {}

    def watch(self, on_event: EventFn | None) -> EventFn:
        """An event handler that starts a decode when a `native-0` run is done, then passes the event on."""
        def handler(event: dict) -> None:
            name = str(event.get("name", ""))
            if event.get("event") == "done" and name.endswith("/native-0"):
                label = name.rsplit("/", 1)[0]
                self.jobs[label] = self.pool.submit(self.decode, label, self.out / "traces" / safe_name(label) / "native-0")
            if on_event:
                on_event(event)
        return handler

    def decode(self, label: str, path: Path) -> str | None:
        from .audio import tokens_to_wav

        trace = load_partial(path)
        if trace is None or trace.steps <= max(self.model.delays) or not self.model.dep_q:
            return None
        wav = self.out / "audio" / f"{safe_name(label)}.wav"
        try:
            tokens_to_wav(self.model, trace, wav, self.codec)
        except XBackendError as exc:
            return f"not decoded: {exc}"
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


def exit_code(report: dict) -> int:
    """3 a backend failed or is unavailable, 1 a divergence or drift beyond tolerance, else 0 (docs/design.md, Exit codes)."""
    if any(b["status"] != "ok" for b in report["backends"]):
        return 3
    ref = report.get("reference_repeatability")
    if ref and not (ref["logits_identical"] and ref["tokens_identical"]):
        return 1  # a nondeterministic reference is a finding, as it is for any other backend
    for v in report["verdicts"]:
        if v["verdict"] not in ("IDENTICAL", "NUMERIC_DRIFT") or not v["figures"].get("within_tolerance", True):
            return 1
    return 0


def run_repeat(req: CompareRequest, out: str | Path, on_event: EventFn | None = None) -> dict:
    """Run one backend `req.repeats` times, same seed and inputs: is it bitwise repeatable?"""
    out = Path(out)
    specs = parse_specs(",".join(req.backends))
    if len(specs) != 1:
        raise XBackendError(f"repeat runs one backend, got {len(specs)} ({','.join(req.backends)})",
                            fix="pass one spec, e.g. --backend mps; to compare backends use `xbackend compare`")
    (spec,) = specs
    for plugin in req.plugins:
        load_plugin(plugin)
    base = CaptureRequest(backend=str(spec), model=req.model, model_config=req.model_config, prompt=req.prompt,
                          seed=req.seed, steps=req.steps, alignment=req.alignment, settings=req.settings,
                          sampler=req.sampler or "native")
    check_request(base)
    if parse_mode(base.sampler)[0] == "forced":
        raise XBackendError("repeat cannot use the forced sampler", asked=f"--sampler {base.sampler}",
                            fix="pass --sampler native, portable, greedy or candle")
    if req.repeats < 2:
        raise XBackendError(f"--runs must be at least 2 to say anything about repeatability, got {req.repeats}")
    require_available(create_backend(spec))
    model, prompt, base = start_run(req, base, out)
    label = str(spec)
    runs = [{"name": f"{label}/run-{i}", "out": str(out / "traces" / f"run-{i}"),
             "request": request_to_json(replace(base, run_index=i))} for i in range(req.repeats)]
    (out / "jobs").mkdir(exist_ok=True)
    outcomes = run_worker({"plugins": [str(p) for p in req.plugins], "runs": runs},
                          out / "jobs" / "repeat.json", req.timeout, on_event)
    traces = [t for t in (load_partial(Path(o.out)) for o in outcomes) if t is not None]
    if not traces:
        raise BackendFailed(f"Backend {label} wrote no trace in {req.repeats} runs ({outcomes[0].error})")
    result = repeatability(label, traces)
    result["failures"] = [{"run": o.name, "status": o.status, "error": o.error} for o in outcomes if o.status != "ok"]
    result["identical_logits_runs"] = sum(t.digests == traces[0].digests for t in traces)
    result["identical_token_runs"] = sum(np.array_equal(t.tokens, traces[0].tokens) for t in traces)
    result["run_digests"] = [_run_digest(t) for t in traces]
    result["words"] = repeat_words(model, traces, out, req.decode_audio)
    result["identical_text_runs"] = sum(w["text"] == result["words"][0]["text"] for w in result["words"])
    digests = [w["audio_digest"] for w in result["words"]]
    result["identical_audio_runs"] = sum(d is not None and d == digests[0] for d in digests)
    result["schema"] = "xbackend.repeat/1"
    write_json_atomic(out / "repeat.json", result)
    return result


def repeat_words(model, traces: list[Trace], out: Path, decode: bool = True) -> list[dict]:
    """Per run: its words and a digest of its decoded audio (written to audio/run-N.wav): how many of
    N runs say the same thing, and sound the same."""
    import soundfile as sf

    from .audio import decode_trace
    from .prompt import SAMPLE_RATE
    from .words import audio_digest

    rows = []
    for i, trace in enumerate(traces):
        row = {"run": i, "text": trace.text(), "audio_digest": None, "audio": None}
        if decode and trace.steps > max(model.delays) and model.dep_q:
            try:
                samples = decode_trace(model, trace)
            except XBackendError as exc:
                row["audio"] = f"not decoded: {exc}"
            else:
                path = out / "audio" / f"run-{i}.wav"
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
