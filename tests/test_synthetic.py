"""Synthetic traces: Moshi-shaped, written through the real TraceWriter, with the real samplers."""

import warnings

from xbackend.testing.traces import synthetic_trace


def test_synthetic_traces_are_moshi_shaped(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = synthetic_trace(tmp_path / "t", steps=3, vocab=(320, 64, 64), seed=0, sampler="portable")
    assert t.streams == ["text", "audio0", "audio1"] and t.complete
    assert t.meta["sampler"]["mode"] == "portable" and (t.margins >= 0).all()
