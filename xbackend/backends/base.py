"""The backend contract: one small class per framework, the device a parameter.

A backend loads a `ModelRef`, then runs a `Job` step by step through its library's own step
API. At each sampling decision it hands the logits, as a numpy vector, to a `StepRecorder`,
which applies plugin hooks, checks them, and decides (or records the native decision).
Everything downstream sees numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..env import fingerprint, install_hint  # noqa: F401  (install_hint: its old home)
from ..errors import BackendFailed, BackendUnavailable
from ..capture.models import ModelRef
from ..samplers import Sampler, sampled_probs
from ..spec import BackendSpec

LogitsHook = Callable[[int, int, str, np.ndarray], np.ndarray]
LoadHook = Callable[[object], None]  # receives the loaded upstream model (moshi LMModel, moshi_mlx Lm)
ALIGNMENTS = ("aligned", "upstream")


@dataclass(frozen=True)
class Job:
    """One run: model, user codes `[n_user, frames]`, steps, seed, sampler, alignment."""

    model: ModelRef
    user_codes: np.ndarray
    steps: int
    seed: int
    sampler: Sampler
    alignment: str = "aligned"
    run_index: int = 0

    def frame(self, step: int, consumes_late: bool) -> np.ndarray:
        """The user frame to pass to the library's `step()` at `step`.

        Aligned means every backend's model sees prompt frame t-1-delay at step t (the MLX and
        Rust convention, which drops nothing). PyTorch `LMGen` consumes a frame in the step it
        is passed, so it gets frame t-1; `moshi_mlx` consumes it one step later, so it gets
        frame t. `upstream` passes frame t to every library, as their own examples do.
        """
        index = step if (self.alignment == "upstream" or consumes_late) else step - 1
        if index < 0 or index >= self.user_codes.shape[1]:
            return np.zeros(self.user_codes.shape[0], dtype=np.int64)  # never read by the model
        return self.user_codes[:, index]


@dataclass(frozen=True)
class StepRecord:
    logits: list[np.ndarray]
    tokens: list[int]
    margins: list[float]
    inputs: np.ndarray


class StepRecorder:
    """Collects one step's logits and decisions, in stream order (text, audio0, ...)."""

    def __init__(self, job: Job, streams: list[str], on_logits: LogitsHook | None = None):
        self.job, self.streams, self.on_logits = job, streams, on_logits
        self.sampler = job.sampler
        self.step = -1
        self._logits: list[np.ndarray] = []
        self._tokens: list[int] = []
        self._margins: list[float] = []

    @property
    def native(self) -> bool:
        return self.sampler.native

    @property
    def stream(self) -> int:
        return len(self._logits)

    def begin(self, step: int) -> None:
        self.step = step
        self._logits, self._tokens, self._margins = [], [], []

    def take(self, logits: np.ndarray) -> np.ndarray:
        """Accept the logits of the next stream; returns them after the plugin hook (if any)."""
        stream = self.stream
        if stream >= len(self.streams):
            raise BackendFailed(f"Backend sampled more than {len(self.streams)} streams at step {self.step}")
        logits = np.asarray(logits, dtype=np.float32)
        if self.on_logits is not None:
            logits = np.asarray(self.on_logits(self.job.run_index, self.step, self.streams[stream], logits.copy()),
                                dtype=np.float32)
        if not np.isfinite(logits).all():
            bad = int((~np.isfinite(logits)).sum())
            raise BackendFailed(f"NaN/Inf logits at step {self.step}, stream {self.streams[stream]} "
                                f"({bad} of {logits.size} values)")
        self._logits.append(logits)
        return logits

    def decide(self) -> int:
        """xbackend's decision for the stream whose logits were just taken."""
        stream = len(self._tokens)
        d = self.sampler.decide(self.step, stream, self._logits[stream])
        self._tokens.append(d.token)
        self._margins.append(d.margin)
        return d.token

    def decided(self, token: int, margin: float) -> None:
        """Record a decision the backend took itself by `decide`'s rule (e.g. on its device)."""
        self._tokens.append(int(token))
        self._margins.append(float(margin))

    def native_token(self, token: int, prob: float | None = None) -> None:
        """Record the library's own decision; a zero-probability pick is a backend failure.

        `prob` is the probability of `token` as the library computed it on its device (PyTorch:
        the float32 softmax `sample_token` drew from), when the backend has it; the host's
        float32 replay of the same ops (and the top-k) is checked as well.
        """
        stream = len(self._tokens)
        temp, top_k = self.sampler.settings.for_stream(stream)
        logits = self._logits[stream]
        valid = 0 <= token < logits.shape[-1]
        if not valid or sampled_probs(logits, temp, top_k)[token] == 0.0 or prob == 0.0:
            raise BackendFailed(
                f"The native sampler picked token {token} of zero probability at step {self.step}, "
                f"stream {self.streams[stream]} (top-k {top_k}, temperature {temp}, float32 softmax as "
                "upstream samples from). Note: PyTorch's exponential_ returning 0 or -0.0 on MPS does "
                "exactly this (pytorch#192577, #159103)")
        self._tokens.append(token)
        self._margins.append(math.nan)

    def position(self) -> dict:
        """Where the run is: the step and the stream awaiting its decision (for failure reports)."""
        stream = len(self._tokens)
        return {"step": max(self.step, 0), "stream": self.streams[stream] if stream < len(self.streams) else None}

    def finish(self, inputs: np.ndarray) -> StepRecord:
        if len(self._tokens) != len(self.streams):
            raise BackendFailed(f"Backend decided {len(self._tokens)} of {len(self.streams)} streams at step {self.step}")
        return StepRecord(self._logits, self._tokens, self._margins, np.asarray(inputs, dtype=np.int64))


class Backend:
    """Base class: subclasses set `library`, and implement `load` and `generate`."""

    library = ""
    extra = ""  # the xbackend extra that installs `library` (pyproject.toml), "" for plugins
    consumes_late = False  # True when the library consumes user codes one step after they are passed
    host_decisions = False  # set when the sampler runs on the host only (candle): no device-side decisions
    compile_choice = "auto"  # --compile (env.COMPILE_CHOICES), set per run; a library without compilation ignores it

    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.on_logits: LogitsHook | None = None
        self.on_load: LoadHook | None = None
        self.label = str(spec)

    def unavailable_reason(self) -> str | None:
        """None when this backend can run here, else why not and how to fix it."""
        return None

    def device_name(self) -> str:
        return self.spec.device or self.spec.name

    def env(self) -> dict:
        return fingerprint(backend=self.label, library=self.library, device=self.device_name(),
                           dtype=self.spec.dtype, quant=self.spec.quant)

    def effective(self) -> dict:
        """Library knobs that change numerics (CUDA graphs, TF32...), recorded in the trace."""
        return {}

    def seed_rng(self, seed: int) -> None:
        """Seed the library's own RNG (used by the native sampler)."""

    def synchronize(self) -> None:
        """Wait for the device's queued work, so that timings end when the work does (MPS, CUDA, MLX)."""

    def native_sampler(self) -> dict | None:
        """Identity of the library's own sampler, `{"algorithm": ..., "rng": ...}`, recorded in every
        native trace: two runs whose identities are equal (same seed) can differ only through their
        logits. None when unknown: then no native divergence can be blamed on the logits alone."""
        return None

    def load(self, model: ModelRef) -> None:
        raise NotImplementedError

    def generate(self, job: Job, recorder: StepRecorder, on_step: Callable[[StepRecord], None]) -> None:
        raise NotImplementedError

    def upstream_model(self):
        """The loaded upstream model (moshi `LMModel`, moshi_mlx `Lm`) that `on_load` patches, or None."""
        return None

    # --- module-level recording (`locate`); backends without a module map leave these out -------

    def steps(self, job: Job, recorder: StepRecorder) -> Iterator[StepRecord]:
        """`generate` one step per `next()`, leaving no global state changed between steps, so two
        backends of one process can step in turn."""
        raise BackendUnavailable(f"Backend {self.label} cannot be stepped module by module",
                                 fix="locate runs PyTorch (cpu, cuda, mps) and MLX backends")

    def layer_probe(self, entries: list):
        """A recorder of the mapped modules' inputs and outputs (backends/modulemap.py), installed
        on the loaded model as a context manager."""
        raise BackendUnavailable(f"Backend {self.label} cannot record its modules",
                                 fix="locate runs PyTorch (cpu, cuda, mps) and MLX backends")
