"""`--compile auto|on|off`: auto compiles exactly what upstream moshi compiles on the device, the trace says
what was asked and what really compiled, and compiled against eager is a knob, not an incomparability."""

from __future__ import annotations

import json

import pytest

from xbackend.backends.torch_backend import torch_compile_wanted
from xbackend.capture.run import CaptureRequest, capture
from xbackend.analysis.diff import comparability, diff
from xbackend.errors import XBackendError
from xbackend.analysis.knobs import compile_difference
from xbackend.store.trace import load_trace

from .helpers import assert_clean_error, run_cli


def without_no_compile() -> dict:
    return {"NO_TORCH_COMPILE": ""}  # empty: moshi and xbackend read it as unset (run_cli merges os.environ)


def test_choice_follows_upstream_switch(monkeypatch):
    monkeypatch.delenv("NO_TORCH_COMPILE", raising=False)
    assert torch_compile_wanted("auto") is True and torch_compile_wanted("on") is True
    assert torch_compile_wanted("off") is False
    monkeypatch.setenv("NO_TORCH_COMPILE", "1")
    assert torch_compile_wanted("auto") is False and torch_compile_wanted("off") is False
    with pytest.raises(XBackendError, match="NO_TORCH_COMPILE is set"):
        torch_compile_wanted("on")


def test_bad_choice_and_on_against_the_env_are_bad_input(tmp_path):
    proc = run_cli("capture", "--compile", "maybe", "--steps", "2", "-o", str(tmp_path / "t"))
    assert_clean_error(proc, 2, "--compile must be one of auto, on, off", "maybe")
    proc = run_cli("capture", "--compile", "on", "--steps", "2", "-o", str(tmp_path / "t"),
                   env={"NO_TORCH_COMPILE": "1"})
    assert_clean_error(proc, 2, "NO_TORCH_COMPILE is set")
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_auto_respects_no_torch_compile(tmp_path):
    """conftest sets NO_TORCH_COMPILE (as a user may): auto runs eagerly and says so."""
    tr = capture(CaptureRequest(backend="cpu", steps=2, sampler="greedy"), tmp_path / "t")
    e = tr.meta["effective"]
    assert e["compile"] == "auto" and e["torch_compile_requested"] is False and e["torch_compiled"] == []


@pytest.mark.slow
def test_cpu_auto_compiles_what_moshi_compiles_and_diff_reports_the_knob(tmp_path):
    """On the CPU moshi's transformer layers enter no_compile(): `auto` compiles the output RMSNorm only.

    Compiled and eager greedy runs are comparable; their diff names the knob. (Cold, the CPU compile takes
    ~33 s for the bundled model; inductor's cache makes later runs faster.)"""
    env = without_no_compile()
    auto, off = tmp_path / "auto", tmp_path / "off"
    proc = run_cli("capture", "-b", "cpu", "--steps", "4", "--sampler", "greedy", "--compile", "auto",
                   "-o", str(auto), "--json", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["effective"]["compile"] == "auto"
    assert out["effective"]["torch_compile_requested"] is True
    assert out["effective"]["torch_compiled"] == ["_rms_norm"]  # not apply_rope, not gating: no_compile() off CUDA
    assert out["effective"]["torch_compile"] is True
    assert out["first_step_ms"] > out["ms_per_step"]  # the compile lands in the first step, timed apart
    proc = run_cli("capture", "-b", "cpu", "--steps", "4", "--sampler", "greedy", "--compile", "off",
                   "-o", str(off), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b = load_trace(off), load_trace(auto)
    assert b.meta["effective"]["torch_compiled"] == ["_rms_norm"] and a.meta["effective"]["torch_compiled"] == []
    assert a.meta["effective"]["compile"] == "off"
    assert comparability(a, b) == []
    knob = compile_difference(a.meta, b.meta)
    assert knob == {"reference": [], "backend": ["_rms_norm"], "note": knob["note"]}
    result = diff(a, b)
    assert any("differ in torch.compile: torch.compile of _rms_norm vs eager" in n for n in result.notes), result.notes


def test_compile_difference_is_none_for_like_runs_and_non_torch():
    torch_meta = {"effective": {"torch_compiled": ["_rms_norm"]}}
    assert compile_difference(torch_meta, torch_meta) is None
    assert compile_difference(torch_meta, {"effective": {"ran_on": "cpu"}}) is None  # an MLX run: no torch knob
    assert compile_difference({"effective": {"torch_compiled": []}}, torch_meta)["backend"] == ["_rms_norm"]
