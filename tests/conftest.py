"""Shared test helpers: the bundled model, the peer golden data, and running the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "reference" / "models" / "tiny" / "model.safetensors"
PEER = ROOT.parent / "shared" / "peer" / "moshi-test-lm"

needs_tiny = pytest.mark.skipif(not TINY.is_file(), reason="bundled tiny model not built (run scripts/make_tiny.py)")
needs_peer = pytest.mark.skipif(not (PEER / "test_lm_model.safetensors").is_file(),
                                reason=f"upstream peer test data not found at {PEER}")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `xbackend` command in a subprocess (exit codes and stderr as a user sees them)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "xbackend", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=full_env)


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """Exit code as SPEC §5 says, one clear message, never a traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), proc.stderr
    for needle in needles:
        assert needle.lower() in proc.stderr.lower(), (needle, proc.stderr)


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
