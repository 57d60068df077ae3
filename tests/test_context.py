"""Across the context: every compare and check says whether its runs crossed the model's context, and a
window bug that starts exactly there is found there and named (issue #25, item 3)."""

from __future__ import annotations

import json
import shutil

import pytest

from xbackend.compare import CompareRequest, run_compare
from xbackend.analysis.context import context_crossed
from xbackend.results import CompareReport

from .helpers import TINY, needs_mlx, needs_tiny, run_cli

pytestmark = needs_tiny


def test_context_crossed_from_a_config_or_a_trace_meta():
    short = context_crossed({"context": 3000}, 600)
    assert (short.length, short.crossed, short.steps_to_cross) == (3000, False, 3050)
    assert short.note == "context 3000 not reached: cache-wrap bugs are not covered; --steps 3050"
    # step 3000 (0-based) is the first whose attention drops a key: 3000 steps do not reach it, 3001 do
    assert context_crossed({"model": {"config": {"context": 3000}}}, 3000).crossed is False
    long = context_crossed({"model": {"config": {"context": 3000}}}, 3001)
    assert long.crossed is True and long.note.startswith("context 3000 crossed: steps 3000 to 3000")
    for bad in ({}, {"context": None}, {"context": True}, {"context": -5}, {"context": "3000"}, {"model": "x"}):
        unknown = context_crossed(bad, 10)
        assert unknown.length is None and unknown.crossed is None and "records no context length" in unknown.note


def short_context_model(tmp_path, context: int):
    """The bundled model, copied with a shorter attention context in its config.json."""
    model = tmp_path / "tiny-context"
    shutil.copytree(TINY.parent, model)
    config = json.loads((model / "config.json").read_text())
    config["context"] = context
    (model / "config.json").write_text(json.dumps(config))
    return model


@needs_mlx
@pytest.mark.slow
def test_mlx_window_one_key_too_wide_is_found_at_exactly_the_context(tmp_path):
    """PyTorch moshi attends to the last `context` keys (RingKVCache of capacity context, mask
    pos_q - pos_k < context); moshi_mlx keeps `t + min(context, k_len - t)` keys, one more (the current
    step and `context` before it). With context 50 both agree for steps 0..49 and part from step 50."""
    model = short_context_model(tmp_path, 50)
    req = CompareRequest(backends=("cpu", "mlx:cpu"), model=str(model), steps=64, decode_audio=False,
                         arbiter="none", compile="off")
    report = run_compare(req, tmp_path / "run")
    v = report.verdict_for("mlx:cpu")
    assert v.verdict == "SEMANTIC_MISMATCH", v.explanation
    assert v.first_divergence.step == 50
    assert v.figures["context"] == 50
    assert "at the model's context length (50 steps)" in v.explanation  # the cause evidence.py tested
    assert v.figures["evidence"]["cause"] == "context wrap"
    assert v.figures["onset_before"] < v.figures["tolerance"]  # agreement up to step 49 (measured ~2e-5)
    assert report.context == {"length": 50, "steps": 64, "crossed": True, "steps_to_cross": 100,
                              "note": "context 50 crossed: steps 50 to 63 attend a sliding window of 50 steps, "
                                      "so cache-wrap bugs are covered"}
    again = CompareReport.from_dict(json.loads((tmp_path / "run" / "report.json").read_text()))
    assert again.context == report.context


def test_a_short_compare_says_the_context_was_not_reached(tmp_path):
    report = run_compare(CompareRequest(backends=("cpu",), steps=4, repeats=1, decode_audio=False, arbiter="none",
                                        compile="off"), tmp_path / "run")
    assert report.context["crossed"] is False and report.context["length"] == 3000
    assert report.context["note"] == "context 3000 not reached: cache-wrap bugs are not covered; --steps 3050"
    proc = run_cli("report", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "run" / "report.md").read_text()
    assert "- Context: context 3000 not reached: cache-wrap bugs are not covered; --steps 3050." in md
    assert "--compile off" in md  # the reproduce command runs it as it ran
