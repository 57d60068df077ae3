"""What several test modules share: the bundled model and peer data, hardware markers, the real CLI
in a subprocess, one capture helper, and a registry scope that undoes every registration."""

from __future__ import annotations

import contextlib
import functools
import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from xbackend.testing.traces import MOSHI_7B_VOCAB

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "reference" / "models" / "tiny" / "model.safetensors"
PEER = ROOT.parent / "shared" / "peer" / "moshi-test-lm"


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


HAVE_MLX = have("mlx") and have("moshi_mlx")

needs_tiny = pytest.mark.skipif(not TINY.is_file(), reason="bundled tiny model not built (run scripts/make_tiny.py)")
needs_peer = pytest.mark.skipif(not (PEER / "test_lm_model.safetensors").is_file(),
                                reason=f"upstream peer test data not found at {PEER}")
_skip_mlx = pytest.mark.skipif(not HAVE_MLX, reason="mlx or moshi_mlx not installed (pip install 'xbackend[mlx]')")


def needs_mlx(test):
    """Mark an MLX test: the `mlx` marker selects it (`-m mlx`), the skip says why it did not run here."""
    return pytest.mark.mlx(_skip_mlx(test))


@functools.lru_cache(maxsize=None)
def unavailable(spec: str) -> str | None:
    """Why `spec` cannot run on this machine, or None when it can."""
    from xbackend import create_backend

    return create_backend(spec).unavailable_reason()


def hardware(spec: str) -> list:
    """The markers of a test that runs `spec`: mps, cuda, mlx (and mlx_gpu for Metal) select it."""
    name, *rest = spec.split(":")
    marks = {"mps": [pytest.mark.mps], "cuda": [pytest.mark.cuda], "mlx": [pytest.mark.mlx]}.get(name, [])
    if name == "mlx" and "cpu" not in rest:
        marks.append(pytest.mark.mlx_gpu)  # `mlx` and `mlx:gpu` use Metal on a Mac
    return marks


def without(spec: str):
    """For a test of what a machine lacking `spec` says: skipped where `spec` runs."""
    return pytest.mark.skipif(unavailable(spec) is None, reason=f"{spec} runs here; the test is about a machine without it")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `xbackend` command in a subprocess (exit codes and stderr as a user sees them)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "xbackend", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=full_env)


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """The exit code of docs/design.md, one clear message, never a traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), proc.stderr
    for needle in needles:
        assert needle.lower() in proc.stderr.lower(), (needle, proc.stderr)


def run(path: Path, name: str, backend: str = "cpu", **kw):
    """One in-process capture of the bundled model into `path / name`; keywords are `CaptureRequest`'s."""
    from xbackend import CaptureRequest, capture

    return capture(CaptureRequest(backend=backend, **kw), path / name)


@contextlib.contextmanager
def registry_scope() -> Iterator[None]:
    """Backends and codecs registered inside (directly or by a plugin file) are unregistered on the way out,
    and built-in names a test re-registered get their built-in factories back."""
    from xbackend.backends import BACKENDS
    from xbackend.codecs import REGISTRY as CODECS

    before = {registry: set(registry.names()) for registry in (BACKENDS, CODECS)}
    try:
        yield
    finally:
        for registry, names in before.items():
            for name in set(registry.names()) - names | set(registry.builtins):
                registry.unregister(name)


def fake_env(name: str) -> dict:
    return {"os": "macOS 15.1", "chip": "Apple M3 Max", "machine": "arm64", "python": "3.12.4", "device": name,
            "dtype": "fp32", "threads": 8, "versions": {"torch": "2.5.1", "mlx": "0.21.0", "numpy": "2.1.0"},
            "env": {"NO_TORCH_COMPILE": "1"}}


def synthetic_run(root: Path, steps: int = 100, vocab=MOSHI_7B_VOCAB) -> Path:
    """A run directory as `compare` writes it, without a model: three backends (cpu, mps, mlx) with
    planted drift, mps diverging at step 30 (portable) and mlx at step 80 (native), and a hand-built
    report.json. Numpy only, so the core install can read it too."""
    from xbackend.testing.traces import default_meta, synthetic_trace

    def spike(at_step, at_stream, token):
        def edit(step, stream, z):
            if step == at_step and stream == at_stream:
                z[token] = z.max() + 50.0
            return z
        return edit

    traces = {
        ("cpu", "native-0"): {}, ("cpu", "portable"): {},
        ("mps", "native-0"): {"noise": 1e-3}, ("mps", "forced"): {"noise": 1e-3},
        ("mps", "portable"): {"noise": 1e-3, "edit": spike(30, 1, 7)},
        ("mlx", "native-0"): {"noise": 2e-3, "edit": spike(80, 0, 11)}, ("mlx", "forced"): {"noise": 2e-3},
        ("mlx", "portable"): {"noise": 2e-3},
    }
    for i, ((label, run), kw) in enumerate(traces.items()):
        synthetic_trace(root / "traces" / label / run, steps=steps, vocab=vocab, seed=1, noise_seed=10 + i,
                        meta=default_meta(backend=label), **kw)
    verdict = {"vs": "cpu", "secondary": [], "note": "", "explanation": "planted"}
    figures = {"tolerance": 1e-3, "forced_max_abs": 0.004, "run_to_run_drift": 0.0, "steps": steps}
    report = {
        "schema": "xbackend.report/1", "created": "2025-01-01T00:00:00+00:00",
        "command": "xbackend compare --backends cpu,mps,mlx --steps 100",
        "request": {"backends": ["cpu", "mps", "mlx"], "model": "moshiko-7b", "model_digest": "0123456789abcdef",
                    "prompt": {"source": "hello.wav", "digest": "feedface", "frames": steps, "kind": "audio"},
                    "seed": 299792458, "steps": steps, "repeats": 2, "timeout": 600.0, "alignment": "aligned",
                    "settings": {"temp_text": 0.7, "top_k_text": 25, "temp_audio": 0.8, "top_k_audio": 250},
                    "plugins": []},
        "reference": "cpu",
        "reference_repeatability": {"backend": "cpu", "runs": 2, "logits_identical": True, "tokens_identical": True},
        "backends": [{"name": n, "spec": n, "status": "ok", "error": None, "env": fake_env(n)} for n in ("cpu", "mps", "mlx")],
        "verdicts": [
            {**verdict, "backend": "mps", "verdict": "NUMERIC_DIVERGENCE", "first_divergence": {"step": 30, "stream": "audio0"},
             "figures": {**figures, "portable_divergence": {"step": 30, "stream": "audio0"}}},
            {**verdict, "backend": "mlx", "verdict": "SAMPLER_DIVERGENCE", "first_divergence": {"step": 80, "stream": "text"},
             "figures": {**figures, "native_divergence": {"step": 80, "stream": "text"}}},
        ],
        "repeatability": [], "drift": [], "failures": [],
        "traces": {n: f"traces/{n}" for n in ("cpu", "mps", "mlx")},
    }
    (root / "report.json").write_text(json.dumps(report))
    return root
