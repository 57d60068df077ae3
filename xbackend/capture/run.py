"""One capture: one backend, one model, one prompt, one sampler mode, written as a trace."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..backends import Backend, Job, StepRecorder, create_backend, require_available
from ..backends.base import ALIGNMENTS
from ..store import validate
from ..errors import BackendFailed, XBackendError
from .models import ModelRef, resolve_model
from .prompt import CODES_SUFFIXES, Prompt, check_codes_range, codes_digest, load_prompt, read_codes
from ..requests import CaptureRequest  # noqa: F401 (re-exported: its old home)
from ..samplers import DEFAULT_SEED, Sampler, parse_mode  # noqa: F401 (DEFAULT_SEED: re-exported)
from ..store.claim import claim
from ..store.trace import COMPACT, Trace, TraceWriter, load_trace, step_bytes


def forced_plan(source: str, model: ModelRef, steps: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens to force `[steps, streams]` (-1 = let the model decide), and user codes if the source has them.

    A trace gives its sampled tokens as they are. An undelayed codes file `[K, T]` (row 0 text,
    then audio codebooks, as `LMModel.forward` takes) is delayed here: stream k at step s takes
    codes[k, s - delay_k].
    """
    path = Path(source).expanduser()
    if path.is_dir():
        ref = load_trace(path)
        if ref.streams != model.streams:
            raise XBackendError(f"Forced trace {path} has streams {ref.streams}, model {model.name} has {model.streams}",
                                fix="force with a trace of the same model")
        if ref.steps < steps:
            raise XBackendError(f"Forced trace {path} has {ref.steps} steps, fewer than the {steps} asked for",
                                fix=f"pass --steps {ref.steps}")
        tokens = ref.tokens[:steps].astype(np.int64)
        bad = (tokens < -1) | (tokens >= np.asarray(model.vocab)[None, :])
        if bad.any():
            step, col = (int(x) for x in np.argwhere(bad)[0])
            raise XBackendError(f"Forced trace {path} has token {tokens[step, col]} at step {step}, {ref.streams[col]}, "
                                f"outside model {model.name}'s vocabulary of {model.vocab[col]}",
                                fix="force with a trace of the same model")
        return tokens, None  # -1 (unknown, e.g. in an imported run): the model decides there
    if path.suffix.lower() not in CODES_SUFFIXES or not path.is_file():
        raise XBackendError(f"Forced source {path} is neither a trace directory nor a codes file",
                            fix="pass forced:TRACE_DIR or forced:codes.npy / codes.safetensors")
    codes = read_codes(path)
    n_gen, n_all = 1 + model.dep_q, 1 + int(model.config["n_q"])
    if codes.shape[0] not in (n_gen, n_all):
        raise XBackendError(f"Codes file {path} has shape {list(codes.shape)}",
                            asked=f"model {model.name} needs [{n_all}, T] (text, then all audio codebooks) "
                            f"or [{n_gen}, T] (text and generated codebooks)",
                            fix="save the codes in the layout LMModel.forward takes")
    for k in range(codes.shape[0]):
        vocab = model.vocab[k] if k < n_gen else int(model.config["card"])
        check_codes_range(codes[k:k + 1], vocab, f"Codes file {path} row {k}")
    tokens = np.full((steps, n_gen), -1, dtype=np.int64)
    for k, delay in enumerate(model.delays):
        for s in range(steps):
            if 0 <= s - delay < codes.shape[1]:
                tokens[s, k] = codes[k, s - delay]
    user = codes[n_gen:] if codes.shape[0] == n_all and model.n_user else None
    return tokens, user


def make_sampler(req: CaptureRequest, model: ModelRef) -> tuple[Sampler, np.ndarray | None]:
    mode, arg = parse_mode(req.sampler)
    if mode != "forced":
        return Sampler(mode, req.seed, req.settings, dep_q=model.dep_q), None
    tokens, user = forced_plan(arg, model, req.steps)
    return Sampler(mode, req.seed, req.settings, forced_tokens=tokens, forced_from=str(arg)), user


def check_request(req: CaptureRequest) -> None:
    """Every number and name of a request, before anything runs."""
    validate.steps(req.steps)
    validate.seed(req.seed)
    if req.alignment not in ALIGNMENTS:
        raise XBackendError(f"Unknown alignment {req.alignment!r}", asked=f"available are {', '.join(ALIGNMENTS)}")
    validate.settings(req.settings)
    validate.integer("run_index", req.run_index, 0, 2**31)
    if req.prompt_frames is not None:
        validate.integer("--prompt-frames", req.prompt_frames, 1, 2**31)
    validate.compile_choice(req.compile)
    parse_mode(req.sampler)


def stored_dtype(backend_dtype: str) -> str:
    """How a backend's logits are stored: 2 bytes where the model computes them in bf16/fp16 (exact), else float32."""
    return COMPACT.get(backend_dtype, "float32")


def trace_bytes(model: ModelRef, steps: int, backend_dtype: str) -> int:
    """Bytes one run's trace takes on disk (logits in their stored dtype, tokens, margins, inputs, digests)."""
    meta = {"streams": model.streams, "vocab": model.vocab, "logits_dtype": stored_dtype(backend_dtype),
            "n_inputs": model.n_user}
    return steps * step_bytes(meta) + 65536


class LoadedBackend:
    """A backend and its model, loaded once for any number of runs (load once per backend per command).

    Resolving (`open_backend`) is cheap; the weights are loaded by the first run that needs them,
    inside that run, so a checkpoint that fails to load is recorded in that run's trace. Every run
    starts from fresh streaming state and re-seeds the library's RNG, so a run on a reused model is
    bitwise the run a fresh process would make (tests/test_load_once.py proves it).
    """

    def __init__(self, backend: Backend, model: ModelRef, loaded: bool = False):
        self.backend, self.model = backend, model
        self.loaded = loaded
        self.charged = loaded  # the load is accounted for: loaded before, or recorded by an earlier run's trace
        self.load_s = 0.0  # seconds the one load took
        self.runs = 0
        self.failure: Exception | None = None  # what a `preload` raised, for the first run to raise in its trace

    def preload(self) -> None:
        """Load now, before any run asks (a worker does it while the parent still prepares the prompt);
        a failure is kept and raised by the first run's `load`, so that run's trace records it."""
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - re-raised, unchanged, inside the first run
            self.failure = exc
        self.charged = False  # the first run records the load it did not wait for

    def load(self) -> float:
        """Load the weights unless already loaded; returns the load's seconds to record, once (0 after)."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        if not self.loaded:
            started = time.perf_counter()
            self.backend.load(self.model)
            if self.backend.on_load is not None:  # a plugin's patch of the upstream model (wrap_backend)
                self.backend.on_load(self.backend.upstream_model())
            self.backend.synchronize()  # MPS/CUDA/MLX load asynchronously: the load ends when the weights are there
            self.loaded = True
            self.load_s = time.perf_counter() - started
        if self.charged:
            return 0.0
        self.charged = True
        return self.load_s


def open_backend(spec: str, model: str = "tiny", model_config: str | None = None) -> LoadedBackend:
    """Resolve the model and create the backend (its availability checked); weights load at the first run."""
    return LoadedBackend(require_available(create_backend(spec)), resolve_model(model, model_config))


def capture(req: CaptureRequest, out: str | Path, progress: Callable[[int, int], None] | None = None,
            sampler: Sampler | None = None, *, force: bool = False) -> Trace:
    """Run `req` in a backend of its own and write its trace to `out`; failures keep the steps done so far.

    `sampler` replaces the one `req.sampler` names (replay builds its own forced sampler). `out` must
    be new, empty or an earlier trace; another run writing there is refused (`force` writes beside
    files xbackend did not make, deleting none)."""
    check_request(req)
    return run_loaded(open_backend(req.backend, req.model, req.model_config), req, out, progress, sampler,
                      force=force)


def run_loaded(session: LoadedBackend, req: CaptureRequest, out: str | Path,
               progress: Callable[[int, int], None] | None = None, sampler: Sampler | None = None, *,
               force: bool = False) -> Trace:
    """Run `req` on `session`'s backend (loading its model if no run has yet) and write the trace to `out`.

    `req.backend` and `req.model` are not looked up again: the session's are used, and recorded.
    """
    check_request(req)
    backend, model = session.backend, session.model
    validate.disk_space(out, trace_bytes(model, req.steps, backend.spec.dtype), f"{req.steps} steps of {req.backend}")
    sampler, forced_user = (sampler, None) if sampler is not None else make_sampler(req, model)
    if forced_user is not None:
        prompt = Prompt(forced_user, str(req.sampler.partition(":")[2]), "codes", codes_digest(forced_user))
    else:
        prompt = load_prompt(req.prompt, model, req.steps, req.prompt_frames)
    job = Job(model, prompt.codes, req.steps, req.seed, sampler, req.alignment, req.run_index)
    backend.host_decisions = sampler.host_only
    backend.compile_choice = req.compile
    reused = session.charged
    meta = {
        "backend": backend.label, "library": backend.library, "spec": dataclasses.asdict(backend.spec),
        "model": model.describe(), "prompt": prompt.describe(), "seed": req.seed,
        "sampler": sampler.describe(native=backend.native_sampler()), "settings": req.settings.to_dict(),
        "alignment": {"mode": req.alignment, "consumes_late": backend.consumes_late,
                      "user_delays": model.user_delays},
        "delays": model.delays, "steps_requested": req.steps, "run_index": req.run_index,
        "effective": backend.effective(), "env": backend.env(), "model_reused": reused,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with claim(out, "trace", force=force):
        return _run(session, req, sampler, job, meta, Path(out), progress)


def _run(session: LoadedBackend, req: CaptureRequest, sampler: Sampler, job: Job, meta: dict, out: Path,
         progress: Callable[[int, int], None] | None) -> Trace:
    backend, model = session.backend, session.model
    writer = TraceWriter(out, meta, model.streams, model.vocab, model.n_user, stored_dtype(backend.spec.dtype))
    first_done: list[float] = []

    def on_step(record) -> None:
        writer.write_step(record.logits, record.tokens, record.margins, record.inputs)
        if not first_done:
            first_done.append(time.perf_counter())
        if progress:
            progress(writer.steps, req.steps)

    recorder = StepRecorder(job, model.streams, backend.on_logits)
    session.runs += 1
    load_s = 0.0
    try:
        load_s = session.load()
        writer.meta["effective"] = backend.effective()  # loading can settle knobs (quantized layers, weights)
        loaded = time.perf_counter()
        backend.generate(job, recorder, on_step)
        backend.synchronize()
        writer.meta["effective"] = backend.effective()  # running settles what was compiled
    except BackendFailed as exc:
        writer.close("failed", error=str(exc), failed_at=recorder.position(), load_s=round(load_s, 4))
        raise
    except XBackendError as exc:
        writer.close("failed", error=str(exc), load_s=round(load_s, 4))
        raise
    except KeyboardInterrupt:
        writer.close("interrupted", error="interrupted by the user")
        raise
    except SystemExit as exc:  # plugin code ending the process would pass for success (exit 0)
        writer.close("failed", error=f"sys.exit({exc.code!r}) called at step {writer.steps}",
                     failed_at=recorder.position(), load_s=round(load_s, 4))
        raise BackendFailed(f"Backend {backend.label} called sys.exit({exc.code!r}) at step {writer.steps}",
                            asked=f"the {writer.steps} complete steps are kept in {out}") from None
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        writer.close("failed", error=f"crashed at step {writer.steps}: {message}", failed_at=recorder.position(),
                     load_s=round(load_s, 4))
        raise BackendFailed(f"Backend {backend.label} crashed at step {writer.steps} ({message})",
                            asked=f"the {writer.steps} complete steps are kept in {out}") from exc
    writer.close("complete", **run_timing(load_s, loaded, first_done[0] if first_done else None,
                                          time.perf_counter(), writer.steps))
    return load_trace(out, verify=False)  # just written by this process


def run_timing(load_s: float, loaded: float, first: float | None, done: float, steps: int) -> dict:
    """Load time (0 for a run on a model loaded before), the first step apart (MPS builds its graphs,
    CUDA captures its graphs there), and the mean of the other steps; with a single step, that step is the mean."""
    first = loaded if first is None else first
    rest = max(steps - 1, 0)
    per_step = (done - first) / rest if rest else (first - loaded)
    return {"load_s": round(load_s, 4), "elapsed_s": round(done - loaded, 4),
            "first_step_ms": round(1000 * (first - loaded), 3), "ms_per_step": round(1000 * per_step, 3)}
