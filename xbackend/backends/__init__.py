"""Backend registry. Built-ins register through the same hook plugins use.

`torch` and `mlx` are imported only when a backend of theirs is created.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from ..errors import BackendUnavailable, XBackendError
from ..registry import Registry
from ..spec import BackendSpec, parse_spec
from .base import Backend, Job, LoadHook, LogitsHook, StepRecord, StepRecorder

Factory = Callable[[BackendSpec], Backend]
ENTRY_POINT_GROUP = "xbackend.backends"


def _torch(spec: BackendSpec) -> Backend:
    from .torch_backend import TorchBackend

    return TorchBackend(spec)


def _mlx(spec: BackendSpec) -> Backend:
    from .mlx_backend import MlxBackend

    return MlxBackend(spec)


BACKENDS: Registry[Backend] = Registry("backend", ENTRY_POINT_GROUP, {"cpu": _torch, "cuda": _torch, "mps": _torch,
                                                                      "mlx": _mlx},
                                       fix="run `xbackend backends`, or load a plugin with --plugin FILE.py")
BUILTIN_NAMES = tuple(BACKENDS.builtins)
BUILTIN_SPECS = ("cpu", "cpu:fp64", "cuda", "cuda:bf16", "mps", "mps:fp16", "mps:bf16", "mlx", "mlx:cpu", "mlx:gpu",
                 "mlx:gpu:bf16", "mlx:gpu:bf16:q8", "mlx:q8", "mlx:q4")


def register_backend(name: str, factory: Factory) -> None:
    """Register `factory(spec) -> Backend` under `name` (the first part of a backend spec)."""
    BACKENDS.register(name, factory)


def unregister_backend(name: str) -> None:
    """Undo `register_backend(name, ...)`: a plugin name disappears, a built-in name (`cpu`, `mlx`, ...)
    gets its built-in factory back. Tests use it so that no registration outlives its test."""
    BACKENDS.unregister(name)


def load_entry_points() -> None:
    """Register third-party backends from the `xbackend.backends` entry-point group (once)."""
    BACKENDS.load_entry_points()


def load_plugin(path: str | Path) -> None:
    """Execute a plugin file; it registers backends by calling `xbackend.register_backend`."""
    from ..store.files import regular_file

    path = Path(path)
    regular_file(path, "Plugin file", "pass --plugin FILE.py", follow=True)
    if path.suffix != ".py":
        raise XBackendError(f"Plugin {path} is not a Python file", fix="pass --plugin FILE.py")
    spec = importlib.util.spec_from_file_location(f"xbackend_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries results (--json) and worker events only
            spec.loader.exec_module(module)
    except SystemExit as exc:  # a plugin may not end the command (exit 0 with nothing done)
        raise XBackendError(f"Plugin {path} called sys.exit({exc.code!r}) while loading",
                            fix="register backends in the plugin; do not exit") from None
    except Exception as exc:
        raise XBackendError(f"Plugin {path} failed to load ({type(exc).__name__}: {str(exc)[:300]})") from None


def registered() -> list[str]:
    return BACKENDS.names()


def create_backend(spec: BackendSpec | str) -> Backend:
    """A backend instance for `spec`; unknown names raise with the list of known ones."""
    return BACKENDS.create(parse_spec(spec) if isinstance(spec, str) else spec)


def require_available(backend: Backend) -> Backend:
    """Raise `BackendUnavailable` (exit 3) with the reason when `backend` cannot run here."""
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"Backend {backend.label} is unavailable: {reason}",
                                 fix="run `xbackend backends` to see what runs on this machine")
    return backend


def wrap_backend(spec: BackendSpec | str, on_logits: LogitsHook | None = None,
                 on_load: LoadHook | None = None) -> Factory:
    """A factory for `spec` with plugin hooks, for fault injection and custom kernels in tests:

    - `on_logits(run, step, stream, logits) -> logits`: each stream's logits pass through it
      before sampling and recording;
    - `on_load(model)`: receives the loaded upstream model (moshi `LMModel` for cpu/cuda/mps,
      moshi_mlx `Lm` for mlx) once, after its weights are loaded and before any step, and may patch
      its modules (a forward hook, a replaced `layers[i]` that keeps the original as its only child
      module). The run's step is in the model's own state: PyTorch
      `transformer.layers[i]._streaming_state.offset_cpu` (the step being run, inside layer i; it
      counts up when the layer returns), MLX `lm.transformer_cache[i].self_attn.offset` (steps
      cached). A PyTorch backend with `on_load` runs the host path, CUDA graphs off, so a patch that
      reads Python state runs at every step.

    The requested spec's device, dtype and quantization apply (registered as `flip`, the spec
    `flip:bf16` runs the wrapped backend in bf16, and is labelled and tolerated as bf16). The
    factory registered for `spec` now is the one wrapped, so a plugin may re-register a built-in
    name around itself (`register_backend("cpu", wrap_backend("cpu", ...))`)."""
    return BACKENDS.wrap(parse_spec(spec) if isinstance(spec, str) else spec, on_logits=on_logits, on_load=on_load)


__all__ = ["Backend", "Job", "StepRecord", "StepRecorder", "register_backend", "unregister_backend", "create_backend",
           "require_available", "wrap_backend", "load_plugin", "registered", "BUILTIN_SPECS"]
