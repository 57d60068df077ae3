import json
import math

import numpy as np
import pytest

from xbackend.analysis.diff import DiffResult, comparability, diff
from xbackend.errors import XBackendError
from xbackend.tolerances import TOLERANCES, tolerance
from xbackend.testing.traces import default_meta, greedy_margins, synthetic_trace, write_trace
from xbackend.store.trace import TruncatedTraceWarning, load_trace

from .helpers import have, needs_tiny

VOCAB = (64, 16, 16)


def pair(tmp_path, meta_b=None, steps=9, noise=0.0, vocab=VOCAB, **kw):
    a = synthetic_trace(tmp_path / "a", steps=steps, vocab=vocab, seed=1)
    b = synthetic_trace(tmp_path / "b", steps=steps, vocab=vocab, seed=1, noise=noise, noise_seed=2,
                        meta=meta_b, **kw)
    return a, b


def test_identical_traces(tmp_path):
    a, b = pair(tmp_path)
    r = diff(a, b)
    assert isinstance(r, DiffResult)
    assert r.logits_identical and r.tokens_identical
    assert r.first_divergence is None and r.first_bitwise_step is None and r.first_nonfinite is None
    assert r.steps_compared == 9 and r.reasons == () and not r.forced
    assert r.max_abs == 0.0 and r.within_tolerance and r.tolerance == TOLERANCES["fp32"]
    for stream in ("text", "audio0", "audio1"):
        s = r.summaries[stream]
        assert s["max_abs"].max == 0.0 and s["kl"].max == 0.0 and s["top1"].min == 1.0
    out = r.to_dict()
    assert out["schema"] == "xbackend.diff/1" and out["first_divergence"] is None
    json.dumps(out, allow_nan=False)


def test_drift_is_summarised_per_stream(tmp_path):
    a, b = pair(tmp_path, noise=1e-3)
    r = diff(a, b)
    assert not r.logits_identical and r.first_bitwise_step == 0
    # seeded numpy noise of scale 1e-3, the same on every CPU: measured max 3.2e-3; 0.01 only says it is that noise (3x)
    assert 0 < r.max_abs < 0.01 and r.within_tolerance is (r.max_abs <= TOLERANCES["fp32"])
    text = r.summaries["text"]["max_abs"]
    assert text.count == 9 and 0 < text.median <= text.p90 <= text.p99 <= text.p999 <= text.max
    json.dumps(r.to_dict(per_step=True), allow_nan=False)
    assert len(r.to_dict(per_step=True)["per_step"]["audio1"]["kl"]) == 9


def test_planted_token_divergence_with_drift_and_margins(tmp_path):
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((6, v)).astype(np.float32) * 3 for v in VOCAB]
    a = write_trace(tmp_path / "a", logits)
    other = [x.copy() for x in logits]
    row = other[2][4]  # audio1, step 4: the runner-up overtakes by 0.01
    order = np.argsort(-row)
    gap = float(row[order[0]] - row[order[1]])
    row[order[1]] = row[order[0]] + np.float32(0.01)
    b = write_trace(tmp_path / "b", other)
    r = diff(a, b)
    d = r.first_divergence
    assert (d.step, d.stream) == (4, "audio1")
    assert (d.token_a, d.token_b) == (int(order[0]), int(order[1]))
    assert d.max_abs == pytest.approx(gap + 0.01, rel=1e-6)
    assert d.margin_a == pytest.approx(gap, rel=1e-6) and d.margin_b == pytest.approx(0.01, abs=2e-6)
    assert d.explained is True  # 2 * (gap + 0.01) >= min(gap, 0.01)
    assert r.first_bitwise_step == 4 and not r.tokens_identical
    # only identical-input steps count: 4 steps, plus step 4 for the streams up to audio1
    assert r.steps_compared == 5 and r.summaries["audio1"]["max_abs"].count == 5
    assert r.summaries["audio0"]["max_abs"].count == 5 and r.summaries["text"]["max_abs"].count == 5
    assert r.max_abs == pytest.approx(gap + 0.01, rel=1e-6)
    assert any("diverge at step 4" in note for note in r.notes)
    assert r.to_dict()["first_divergence"]["stream"] == "audio1"


def test_unexplained_divergence(tmp_path):
    rng = np.random.default_rng(1)
    logits = [rng.standard_normal((3, v)).astype(np.float32) * 3 for v in VOCAB]
    tokens, margins = zip(*[greedy_margins(x) for x in logits])
    tokens, margins = np.stack(tokens, axis=1), np.stack(margins, axis=1)
    a = write_trace(tmp_path / "a", logits, tokens=tokens, margins=margins)
    other_tokens = tokens.copy()
    other_tokens[1, 0] = (tokens[1, 0] + 1) % VOCAB[0]  # same logits, different token: not drift
    b = write_trace(tmp_path / "b", logits, tokens=other_tokens, margins=margins)
    r = diff(a, b)
    assert r.logits_identical and not r.tokens_identical
    assert (r.first_divergence.step, r.first_divergence.stream) == (1, "text")
    assert r.first_divergence.max_abs == 0.0 and r.first_divergence.explained is False


def test_native_divergence_has_no_answer(tmp_path):
    rng = np.random.default_rng(2)
    logits = [rng.standard_normal((3, v)).astype(np.float32) for v in VOCAB]
    tokens = np.stack([greedy_margins(x)[0] for x in logits], axis=1)
    nan = np.full(tokens.shape, np.nan)
    meta = default_meta(mode="native")
    a = write_trace(tmp_path / "a", logits, tokens=tokens, margins=nan, meta=meta)
    changed = tokens.copy()
    changed[0, 1] = (changed[0, 1] + 1) % 16
    b = write_trace(tmp_path / "b", logits, tokens=changed, margins=nan, meta=meta)
    d = diff(a, b).first_divergence
    assert (d.step, d.stream, d.explained) == (0, "audio0", None)
    assert diff(a, b).to_dict()["first_divergence"]["margin_a"] is None


@pytest.mark.parametrize("key, value_a, value_b, needle", [
    ("seed", 1, 2, "seed differs: 1 in"),
    ("model", {"digest": "aaa"}, {"digest": "bbb"}, "model digest differs: 'aaa' in"),
    ("prompt", {"digest": "p1"}, {"digest": "p2"}, "prompt digest differs: 'p1' in"),
    ("alignment", {"mode": "aligned"}, {"mode": "upstream"}, "alignment differs: 'aligned' in"),
])
def test_comparability_names_both_values(tmp_path, key, value_a, value_b, needle):
    a = synthetic_trace(tmp_path / "a", steps=2, vocab=VOCAB, seed=1, meta=default_meta(**{key: value_a}))
    b = synthetic_trace(tmp_path / "b", steps=2, vocab=VOCAB, seed=1, meta=default_meta(**{key: value_b}))
    reasons = comparability(a, b)
    assert len(reasons) == 1 and needle in reasons[0], reasons
    assert repr(value_b.get("digest", value_b.get("mode")) if isinstance(value_b, dict) else value_b) in reasons[0]
    assert str(a.path) in reasons[0] and str(b.path) in reasons[0]
    with pytest.raises(XBackendError, match="not comparable") as err:
        diff(a, b)
    assert needle in str(err.value) and "--force" in str(err.value)
    forced = diff(a, b, force=True)
    assert forced.forced and forced.reasons == tuple(reasons) and forced.logits_identical


def test_sampling_settings_must_match(tmp_path):
    from xbackend.samplers import SamplingSettings

    a = synthetic_trace(tmp_path / "a", steps=2, vocab=VOCAB, seed=1)
    b = synthetic_trace(tmp_path / "b", steps=2, vocab=VOCAB, seed=1,
                        meta=default_meta(settings=SamplingSettings(temp_text=0.8, top_k_audio=100)))
    reasons = comparability(a, b)
    assert any("sampling settings of text differ: temperature 0.7, top-k keeps 25 in" in r
               and "temperature 0.8, top-k keeps 25 in" in r for r in reasons)
    # top-k 250 and 100 both keep all 16 audio tokens: not a real mismatch, not a reason
    assert not any("audio" in r for r in reasons) and len(reasons) == 1
    c = synthetic_trace(tmp_path / "c", steps=2, vocab=VOCAB, seed=1,
                        meta=default_meta(settings=SamplingSettings(top_k_audio=8)))
    assert [r for r in comparability(a, c) if "top-k keeps 16 in" in r and "top-k keeps 8 in" in r]


def test_streams_and_vocab_must_match(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=2, vocab=VOCAB, seed=1)
    b = synthetic_trace(tmp_path / "b", steps=2, vocab=(64, 16, 8), seed=1)
    assert any("vocabulary sizes differ: [64, 16, 16] in" in r for r in comparability(a, b))
    with pytest.raises(XBackendError, match="even by force"):
        diff(a, b, force=True)


def test_dtype_and_backend_may_differ(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=3, vocab=VOCAB, seed=1)
    b = synthetic_trace(tmp_path / "b", steps=3, vocab=VOCAB, seed=1, noise=0.01,
                        meta=default_meta(dtype="bf16", backend="mlx:gpu:bf16"))
    assert comparability(a, b) == []
    r = diff(a, b)
    assert r.tier_b == "bf16" and r.tolerance == TOLERANCES["bf16"] and r.within_tolerance
    assert r.backend_b == "mlx:gpu:bf16"


def test_forced_onto_the_reference_is_comparable(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=4, vocab=VOCAB, seed=1, sampler="portable",
                        meta=default_meta(mode="portable"))
    logits = [np.array(a.logits(s)) + np.float32(1e-3) for s in a.streams]
    forced_meta = default_meta(seed=7, sampler={"mode": "forced", "seed": 7, "forced_from": "elsewhere/a"})
    b = write_trace(tmp_path / "b", logits, tokens=a.tokens, margins=a.margins, meta=forced_meta)
    assert comparability(a, b) == []  # its tokens are A's; the seed of a forced run does not matter
    r = diff(a, b)
    assert r.tokens_identical and r.mode_b == "forced"
    changed = a.tokens.copy()
    changed[2, 0] = (changed[2, 0] + 1) % 64
    c = write_trace(tmp_path / "c", logits, tokens=changed, margins=a.margins, meta=forced_meta)
    reasons = comparability(a, c)
    assert len(reasons) == 2 and "is forced from 'elsewhere/a', not from" in reasons[0]
    assert "seed differs" in reasons[1]


def test_sampler_modes_must_match(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=2, vocab=VOCAB, seed=1, meta=default_meta(mode="native"))
    b = synthetic_trace(tmp_path / "b", steps=2, vocab=VOCAB, seed=1, meta=default_meta(mode="portable"))
    assert comparability(a, b) == ["sampler mode differs: 'native' in " + f"synthetic:fp32 at {a.path} vs "
                                   f"'portable' in synthetic:fp32 at {b.path}"]


def test_different_lengths_and_truncated(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=10, vocab=VOCAB, seed=1)
    synthetic_trace(tmp_path / "b", steps=6, vocab=VOCAB, seed=1, close=False)
    with pytest.warns(TruncatedTraceWarning):
        b = load_trace(tmp_path / "b")
    r = diff(a, b)
    assert (r.steps_a, r.steps_b, r.steps_compared) == (10, 6, 6)
    assert r.logits_identical and r.tokens_identical
    assert any("compared their common first 6" in note for note in r.notes)
    assert any("incomplete" in note and "'running'" in note for note in r.notes)


def test_diff_accepts_paths_and_reports_nonfinite(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=5, vocab=VOCAB, seed=1)

    def poison(step, stream, z):
        if (step, stream) == (3, 2):
            z[5] = np.inf
        return z

    synthetic_trace(tmp_path / "b", steps=5, vocab=VOCAB, seed=1, edit=poison)
    r = diff(tmp_path / "a", tmp_path / "b")
    assert r.first_nonfinite == (3, "audio1") and math.isnan(r.max_abs) and not r.within_tolerance
    assert r.summaries["audio1"]["max_abs"].nonfinite == 1
    out = r.to_dict()
    assert out["max_abs"] is None and out["first_nonfinite"] == {"step": 3, "stream": "audio1"}
    json.dumps(out, allow_nan=False)


def test_empty_traces(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=0, vocab=VOCAB, seed=1)
    b = synthetic_trace(tmp_path / "b", steps=0, vocab=VOCAB, seed=1)
    r = diff(a, b)
    assert r.steps_compared == 0 and r.first_divergence is None and r.summaries["text"]["kl"].count == 0
    assert any("no step to compare" in note for note in r.notes)
    json.dumps(r.to_dict(per_step=True), allow_nan=False)


def test_native_traces_compare_logits_only_through_their_first_token_divergence(tmp_path):
    """After the first token divergence the runs are fed different tokens: that cascade is not drift."""
    rng = np.random.default_rng(3)
    logits = [rng.standard_normal((6, v)).astype(np.float32) * 3 for v in VOCAB]
    other = [x.copy() for x in logits]
    for x in other:
        x[3:] += rng.standard_normal(x[3:].shape).astype(np.float32) * 30  # a cascade after step 2
    other[0][2] += np.float32(1e-4)
    tokens = np.stack([greedy_margins(x)[0] for x in logits], axis=1)
    tokens_b = tokens.copy()
    tokens_b[2, 1] = (tokens_b[2, 1] + 1) % VOCAB[1]  # native tokens differ at step 2, audio0
    ident = {"algorithm": "a", "rng": "r"}

    def meta(identity):
        return default_meta(mode="native", sampler={"mode": "native", "seed": 1, "identity": identity})

    a = write_trace(tmp_path / "a", logits, tokens=tokens, margins=np.ones((6, 3)), meta=meta(ident))
    b = write_trace(tmp_path / "b", other, tokens=tokens_b, margins=np.ones((6, 3)), meta=meta({**ident, "rng": "s"}))
    r = diff(a, b)
    assert r.steps_compared == 3 and r.max_abs == pytest.approx(1e-4, rel=1e-2) and r.within_tolerance
    assert r.shared_sampler is False and r.sampler_divergence and r.expected and r.exit_code == 0
    assert "the two native samplers differ" in r.explanation
    back = DiffResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.to_dict() == r.to_dict() and back.exit_code == 0
    same = write_trace(tmp_path / "c", other, tokens=tokens_b, margins=np.ones((6, 3)), meta=meta(ident))
    r = diff(a, same)  # one sampler, drift within tolerance flipped it: expected, as compare says
    assert r.shared_sampler is True and r.expected and r.exit_code == 0
    assert "share one sampler" in r.explanation
    equal = write_trace(tmp_path / "d", logits, tokens=tokens_b, margins=np.ones((6, 3)), meta=meta(ident))
    r = diff(a, equal)  # one sampler declared, bitwise-equal logits, other tokens: the declaration did not hold
    assert r.max_abs == 0.0 and r.declared_identity_broken and not r.expected and r.exit_code == 1


def test_recorded_inputs_replace_the_prompt_digest(tmp_path):
    """Traces that record their inputs are compared on them, so a codes file and its audio still compare."""
    def trace(path, digest, inputs):
        meta = default_meta(prompt={"source": "x", "kind": "codes", "digest": digest})
        from xbackend.store.trace import TraceWriter

        w = TraceWriter(path, meta, ["text", "audio0", "audio1"], list(VOCAB), n_inputs=2)
        rng = np.random.default_rng(1)
        for s, row in enumerate(inputs):
            w.write_step([rng.standard_normal(v).astype(np.float32) for v in VOCAB], [0, 0, 0], [1.0] * 3, row)
        w.close()
        return load_trace(path)

    a = trace(tmp_path / "a", "p1", np.array([[1, 2], [3, 4], [5, 6]]))
    b = trace(tmp_path / "b", "p2", np.array([[1, 2], [3, 4]]))
    assert comparability(a, b) == []
    c = trace(tmp_path / "c", "p1", np.array([[1, 2], [3, 9], [5, 6]]))
    assert comparability(a, c) == ["user inputs differ from prompt frame 1: the runs were not fed the same prompt"]


@needs_tiny
def test_diff_of_real_captures_of_different_length_and_different_samplers(tmp_path):
    from xbackend.capture.run import CaptureRequest, capture

    # the 24-frame prompt is continued with silence to 26 and 28 frames: one prompt digest (of its own
    # 24 frames) and the same user inputs on the common 26 steps, which is what diff compares
    short = capture(CaptureRequest(backend="cpu", steps=26), tmp_path / "short")
    long = capture(CaptureRequest(backend="cpu", steps=28), tmp_path / "long")
    assert short.meta["prompt"]["digest"] == long.meta["prompt"]["digest"]
    assert short.meta["prompt"]["fed_frames"] == 26 and long.meta["prompt"]["frames"] == 24
    r = diff(long, short)
    assert r.reasons == () and r.steps_common == 26 and r.logits_identical and r.tokens_identical
    assert r.exit_code == 0 and any("common first 26" in n for n in r.notes)
    if have("mlx"):
        other = capture(CaptureRequest(backend="mlx:cpu", steps=8), tmp_path / "mlx")
        r = diff(long, other)  # native tokens differ from step 0: only that step's first streams are comparable
        d = r.first_divergence
        assert d is not None and r.steps_compared == d.step + 1 and r.shared_sampler is False
        assert r.max_abs <= tolerance("fp32") and r.expected and r.exit_code == 0
