"""The PyTorch device path (decisions on the device, one copy per step, CUDA graphs kept) writes
the same traces, bit for bit, as the eager host path, in every sampler mode."""

import json

import numpy as np
import pytest

import xbackend
from xbackend import (BackendFailed, CaptureRequest, SamplingSettings, XBackendError, capture, create_backend,
                      parse_spec)
from xbackend.backends.torch_backend import CAPTURE_PATH_ENV, TorchBackend

from .helpers import needs_tiny
from .helpers import run as run_any

pytestmark = needs_tiny

MODES = ("native", "portable", "greedy", "forced")
# Exercises every branch of the rules: text greedy by temperature 0 (portable falls back to
# greedy), audio with a top-k wider than the vocabulary (no cut) and a temperature above 1.
ODD = SamplingSettings(temp_text=0.0, top_k_text=0, temp_audio=1.3, top_k_audio=5000)


def run(tmp_path, name, path, monkeypatch, **kw):
    """A capture on one PyTorch capture path (host or device)."""
    monkeypatch.setenv(CAPTURE_PATH_ENV, path)
    return run_any(tmp_path, name, **kw)


def assert_same_trace(a, b):
    assert a.steps == b.steps and a.digests == b.digests
    for s in a.streams:
        assert np.array_equal(a.logits(s).view(np.uint32), b.logits(s).view(np.uint32)), s
    assert np.array_equal(a.tokens, b.tokens)
    assert np.array_equal(a.margins.view(np.uint32), b.margins.view(np.uint32))  # NaN-safe, bitwise
    assert np.array_equal(a.inputs, b.inputs)


def paths_agree(tmp_path, monkeypatch, backend, steps, settings=SamplingSettings()):
    ref = run(tmp_path, "ref", "host", monkeypatch, backend=backend, steps=steps, settings=settings)
    for mode in MODES:
        sampler = f"forced:{ref.path}" if mode == "forced" else mode
        host = run(tmp_path, f"{mode}-host", "host", monkeypatch, backend=backend, steps=steps,
                   sampler=sampler, settings=settings)
        dev = run(tmp_path, f"{mode}-device", "device", monkeypatch, backend=backend, steps=steps,
                  sampler=sampler, settings=settings)
        assert host.meta["effective"]["capture_path"] == "host"
        assert dev.meta["effective"]["capture_path"] == "device"
        assert_same_trace(host, dev)
        if mode == "forced":
            assert np.array_equal(dev.tokens, ref.tokens)
        if mode != "native":
            assert np.isfinite(dev.margins).all()
    return dev


@pytest.mark.parametrize("settings", [SamplingSettings(), ODD], ids=["default", "odd"])
def test_device_path_matches_host_path_on_cpu(tmp_path, monkeypatch, settings):
    dev = paths_agree(tmp_path, monkeypatch, "cpu", 12, settings)
    assert dev.meta["effective"]["cuda_graphs"] is False


def test_device_path_is_the_default_without_plugins(tmp_path, monkeypatch):
    monkeypatch.delenv(CAPTURE_PATH_ENV, raising=False)
    assert create_backend("cpu").capture_path() == "device"
    backend = xbackend.wrap_backend("cpu", on_logits=lambda run, step, stream, x: x)(None)
    assert backend.capture_path() == "host"  # plugins need host logits before the decision
    explicit = create_backend("cpu")
    explicit.path_choice = "host"
    assert explicit.capture_path() == "host"
    monkeypatch.setenv(CAPTURE_PATH_ENV, "sideways")
    with pytest.raises(XBackendError, match="host, device or auto"):
        create_backend("cpu").capture_path()


def test_nan_fails_at_the_same_place_on_both_paths(tmp_path, monkeypatch, registry):
    """A NaN logit is caught after the one copy, at the same step and stream as on the host path."""
    import torch

    class Poisoned(TorchBackend):
        def load(self, model):
            super().load(model)
            with torch.no_grad():
                self.lm.linears[2].weight[7] = float("nan")  # audio2's logit 7

    xbackend.register_backend("poisoned", lambda spec: Poisoned(parse_spec("cpu")))
    for path in ("host", "device"):
        monkeypatch.setenv(CAPTURE_PATH_ENV, path)
        with pytest.raises(BackendFailed, match="NaN/Inf logits at step 0, stream audio2"):
            capture(CaptureRequest(backend="poisoned", steps=4, sampler="portable"), tmp_path / path)
        meta = json.loads((tmp_path / path / "meta.json").read_text())
        assert meta["status"] == "failed" and meta["failed_at"] == {"step": 0, "stream": "audio2"}


def test_a_zero_probability_native_pick_fails_on_the_device_path(tmp_path, monkeypatch):
    """The native check runs on the copied logits: a sampler picking outside top-k is caught."""
    from moshi.models import lm as lm_module

    def worst(logits, use_sampling=False, temp=1.0, top_k=0, top_p=0.0):
        return logits.argmin(dim=-1)

    monkeypatch.setattr(lm_module, "sample_token", worst)
    for path in ("host", "device"):
        with pytest.raises(BackendFailed, match="zero probability at step 0, stream text"):
            run(tmp_path, path, path, monkeypatch, steps=3)


def test_a_crash_keeps_the_finished_steps(tmp_path, monkeypatch):
    """The device path runs one step ahead; a crash still leaves every finished step written."""
    from moshi.models import lm as lm_module

    original = lm_module.sample_token
    kept = {}
    for path in ("host", "device"):
        calls = {"n": 0}

        def flaky(logits, use_sampling=False, temp=1.0, top_k=0, top_p=0.0):
            calls["n"] += 1
            if calls["n"] == 9 * 3 + 3:  # step 3, stream audio2
                raise RuntimeError("device lost")
            return original(logits, use_sampling, temp, top_k, top_p)

        monkeypatch.setattr(lm_module, "sample_token", flaky)
        with pytest.raises(BackendFailed, match="crashed at step 3"):
            run(tmp_path, path, path, monkeypatch, steps=6)
        with pytest.warns(xbackend.TruncatedTraceWarning):
            tr = xbackend.load_trace(tmp_path / path)
        assert tr.steps == 3
        kept[path] = tr
    a, b = kept["host"], kept["device"]
    assert a.digests == b.digests and np.array_equal(a.tokens, b.tokens)


def have_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not have_cuda(), reason="no CUDA device")
@pytest.mark.parametrize("settings", [SamplingSettings(), ODD], ids=["default", "odd"])
def test_graphed_device_path_matches_eager_host_path_on_cuda(tmp_path, monkeypatch, settings):
    dev = paths_agree(tmp_path, monkeypatch, "cuda", 16, settings)
    assert dev.meta["effective"]["cuda_graphs"] is True
