"""PyTorch MPS (Apple silicon). These cannot run on Linux: they skip with the reason, never pass silently."""

import numpy as np
import pytest

from xbackend import CaptureRequest, capture, create_backend

from .conftest import needs_tiny

REASON = create_backend("mps").unavailable_reason()
pytestmark = [needs_tiny, pytest.mark.mps, pytest.mark.skipif(REASON is not None, reason=f"mps: {REASON}")]


def test_mps_fp32_matches_cpu_teacher_forced(tmp_path):
    ref = capture(CaptureRequest(backend="cpu", steps=50), tmp_path / "cpu")
    mps = capture(CaptureRequest(backend="mps", steps=50, sampler=f"forced:{ref.path}"), tmp_path / "mps")
    assert mps.meta["effective"]["capture_path"] == "host"  # MPS has no float64 for device decisions
    for s in ref.streams:
        assert np.abs(mps.logits(s) - ref.logits(s)).max() <= 1e-3


def test_mps_native_sampler_never_picks_a_zero_probability_token(tmp_path):
    """pytorch#192577 / #159103: exponential_ returning 0 on MPS; capture would fail loudly."""
    for run in range(2):
        tr = capture(CaptureRequest(backend="mps", steps=100, run_index=run), tmp_path / f"n{run}")
        assert tr.complete


@pytest.mark.parametrize("spec", ["mps:fp16", "mps:bf16"])
def test_mps_half_precision_runs(tmp_path, spec):
    ref = capture(CaptureRequest(backend="cpu", steps=20), tmp_path / "cpu")
    tr = capture(CaptureRequest(backend=spec, steps=20, sampler=f"forced:{ref.path}"), tmp_path / "h")
    assert max(np.abs(tr.logits(s) - ref.logits(s)).max() for s in ref.streams) < 1.0
