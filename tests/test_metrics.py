import math

import numpy as np
import pytest

from xbackend.analysis import metrics as M
from xbackend import tolerances as T
from xbackend.errors import XBackendError
from xbackend.samplers import SamplingSettings
from xbackend.testing.traces import default_meta, greedy_margins, synthetic_trace, write_trace
from xbackend.store.trace import TruncatedTraceWarning, load_trace


def grid_logits(rng, steps, vocab):
    """Distinct logits (no ties) on a 1/64 grid in [-8, 8): their sums and differences are exact."""
    return np.stack([rng.permutation(1024)[:vocab] - 512 for _ in range(steps)]).astype(np.float32) / 64


def settings_meta(**settings):
    return default_meta(settings=SamplingSettings(**settings))


def make_pair(tmp_path, vocab=(40, 12, 12), steps=10, seed=0, settings=None, edit_b=None):
    """Two traces with the same grid logits; `edit_b(list_of_arrays)` changes B's copy in place."""
    rng = np.random.default_rng(seed)
    logits = [grid_logits(rng, steps, v) for v in vocab]
    meta = settings_meta(**(settings or {}))
    a = write_trace(tmp_path / "a", logits, meta=meta)
    other = [x.copy() for x in logits]
    if edit_b:
        edit_b(other)
    b = write_trace(tmp_path / "b", other, meta=meta)
    return a, b, logits, other


def naive_metrics(a_rows, b_rows, tok, temp, top_k):
    """Per-row reference: the textbook formulas, one step at a time, in float64."""
    out = {k: [] for k in ("max_abs", "rms", "kl", "dp_ref", "top1", "topk_overlap")}
    for x, y, t in zip(a_rows.astype(np.float64), b_rows.astype(np.float64), tok):
        temp_ = temp if temp > 0 else 1.0
        p = np.exp(x / temp_ - (x / temp_).max())
        p /= p.sum()
        q = np.exp(y / temp_ - (y / temp_).max())
        q /= q.sum()
        k = min(top_k, x.size) if top_k > 0 else x.size
        out["max_abs"].append(np.abs(x - y).max())
        out["rms"].append(np.sqrt(np.mean((x - y) ** 2)))
        out["kl"].append(float(np.sum(p * (np.log(p) - np.log(q)))))
        out["dp_ref"].append(q[t] - p[t])
        out["top1"].append(np.argmax(x) == np.argmax(y))
        top_a, top_b = set(np.argsort(-x, kind="stable")[:k]), set(np.argsort(-y, kind="stable")[:k])
        out["topk_overlap"].append(len(top_a & top_b) / k)
    return {k: np.array(v) for k, v in out.items()}


# --------------------------------------------------------------------------- exact cases


def test_identical_traces_are_all_zero(tmp_path):
    a, b, _, _ = make_pair(tmp_path)
    m = M.step_metrics(a, b)
    assert m.steps == 10 and m.streams == ("text", "audio0", "audio1")
    for name in ("max_abs", "rms", "kl", "dp_ref"):
        values = getattr(m, name)
        assert np.all(values == 0.0) and not np.signbit(values).any(), name
    assert m.top1.all() and np.all(m.topk_overlap == 1.0)
    assert M.bitwise_equal_steps(a, b) is None
    assert M.first_token_divergence(a, b) is None
    assert np.array_equal(m.margin_a, m.margin_b)


def test_planted_perturbation_shows_exactly_where_it_is(tmp_path):
    d, step, stream, col = 0.25, 6, 1, 7

    def plant(rows):
        rows[stream][step, col] += d

    a, b, logits, _ = make_pair(tmp_path, edit_b=plant)
    m = M.step_metrics(a, b)
    assert m.max_abs[step, stream] == d
    assert m.rms[step, stream] == pytest.approx(d / math.sqrt(12), rel=1e-12)
    mask = np.ones_like(m.max_abs, dtype=bool)
    mask[step, stream] = False
    assert np.all(m.max_abs[mask] == 0) and np.all(m.kl[mask] == 0)
    assert m.kl[step, stream] > 0
    assert M.bitwise_equal_steps(a, b) == step
    s = M.summarize(m.column("max_abs", "audio0"))
    assert s.max == d and s.max_step == step and s.mean == pytest.approx(d / 10)


def test_kl_and_dp_against_hand_computed_values(tmp_path):
    # softmax at T = 0.5 of [0, 1, 2] vs [0, 1, 2.5]; A's token is 2 (greedy)
    la = np.array([[0.0, 1.0, 2.0]], np.float32)
    lb = np.array([[0.0, 1.0, 2.5]], np.float32)
    meta = settings_meta(temp_text=0.5, top_k_text=2)
    a = write_trace(tmp_path / "a", [la], meta=meta, streams=["text"])
    b = write_trace(tmp_path / "b", [lb], meta=meta, streams=["text"])
    ea = [math.exp(0.0), math.exp(2.0), math.exp(4.0)]
    eb = [math.exp(0.0), math.exp(2.0), math.exp(5.0)]
    p = [x / sum(ea) for x in ea]
    q = [x / sum(eb) for x in eb]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    m = M.step_metrics(a, b)
    assert m.kl[0, 0] == pytest.approx(kl, rel=1e-6)
    assert m.dp_ref[0, 0] == pytest.approx(q[2] - p[2], rel=1e-6)
    assert m.top1[0, 0] and m.topk_overlap[0, 0] == 1.0
    assert m.max_abs[0, 0] == 0.5 and m.rms[0, 0] == pytest.approx(0.5 / math.sqrt(3))


def test_tiny_drift_kl_keeps_its_relative_precision(tmp_path):
    # KL ~ 1e-13: a float64 log-sum-exp difference would be mostly rounding noise here
    rng = np.random.default_rng(1)
    la = (rng.standard_normal((3, 2048)) * 2).astype(np.float32)
    lb = la + (rng.standard_normal((3, 2048)) * 1e-6).astype(np.float32)
    meta = settings_meta(temp_text=0.8)
    a = write_trace(tmp_path / "a", [la], meta=meta, streams=["text"])
    b = write_trace(tmp_path / "b", [lb], meta=meta, streams=["text"])
    m = M.step_metrics(a, b)
    x, y = la.astype(np.float64) / 0.8, lb.astype(np.float64) / 0.8
    for s in range(3):
        p = np.exp(x[s] - x[s].max())
        p /= p.sum()
        delta = x[s] - y[s]
        # second-order expansion, exact to ~1e-6 relative at this size: KL = Var_p(Δ)/2 - E_p[(Δ-μ)^3]/6
        mu = p @ delta
        expected = p @ (delta - mu) ** 2 / 2 - p @ (delta - mu) ** 3 / 6
        assert m.kl[s, 0] == pytest.approx(expected, rel=1e-4)


def test_top1_disagreement_and_topk_overlap_where_planted(tmp_path):
    def plant(rows):
        text = rows[0]
        top3, top5 = np.argsort(-text[3]), np.argsort(-text[5])
        text[3, top3[1]] = text[3, top3[0]] + 1  # runner-up overtakes: top-1 differs at step 3
        text[5, top5[0]] = -9.0  # winner falls out of the top-k at step 5

    a, b, logits, _ = make_pair(tmp_path, settings={"top_k_text": 4}, edit_b=plant)
    m = M.step_metrics(a, b)
    assert list(np.flatnonzero(~m.top1[:, 0])) == [3, 5]
    assert m.top1[:, 1:].all()
    assert m.topk_overlap[3, 0] == 1.0  # same four tokens, new order
    assert m.topk_overlap[5, 0] == 0.75  # one of four replaced
    assert np.all(np.delete(m.topk_overlap[:, 0], 5) == 1.0)


def test_first_token_divergence_in_step_then_stream_order(tmp_path):
    rng = np.random.default_rng(2)
    logits = [grid_logits(rng, 8, v) for v in (30, 10, 10)]
    tokens, margins = zip(*[greedy_margins(x) for x in logits])
    tokens = np.stack(tokens, axis=1)
    margins = np.stack(margins, axis=1)
    a = write_trace(tmp_path / "a", logits, tokens=tokens, margins=margins)
    changed = tokens.copy()
    changed[4, 2] = (changed[4, 2] + 1) % 10  # audio1 at step 4
    changed[4, 1] = (changed[4, 1] + 1) % 10  # audio0 at step 4: first in stream order
    changed[6, 0] = (changed[6, 0] + 1) % 30
    b = write_trace(tmp_path / "b", logits, tokens=changed, margins=margins)
    assert M.first_token_divergence(a, b) == (4, "audio0")
    assert M.first_token_divergence(a, a) is None


def test_drift_explains_rule():
    assert M.drift_explains(0.3, 0.5, 1.0) is True  # 0.6 >= 0.5
    assert M.drift_explains(0.25, 0.5, 0.7) is True  # equality counts
    assert M.drift_explains(0.2, 0.5, 0.9) is False
    assert M.drift_explains(0.2, math.nan, 0.3) is True  # the recorded margin decides
    assert M.drift_explains(0.2, math.nan, math.nan) is None  # native: no margins


def test_percentiles_on_a_known_distribution():
    s = M.summarize(np.arange(1001, dtype=np.float64))
    assert (s.median, s.p90, s.p99) == (500.0, 900.0, 990.0) and s.p999 == pytest.approx(999.0)
    assert s.mean == 500.0 and s.max == 1000.0 and s.max_step == 1000 and s.min_step == 0
    values = np.array([1.0, np.nan, 3.0, np.inf, 2.0])
    s = M.summarize(values)
    assert s.count == 5 and s.nonfinite == 2 and s.max == 3.0 and s.max_step == 2 and s.median == 2.0
    empty = M.summarize(np.array([np.nan]))
    assert empty.max_step is None and empty.to_dict()["mean"] is None


def test_tolerance_takes_the_looser_tier():
    assert T.tolerance("fp32", "fp32") == T.TOLERANCES["fp32"]
    assert T.tolerance("fp32", "bf16") == T.TOLERANCES["bf16"] == T.tolerance("bf16", "fp32")
    assert T.tolerance("q4", "fp16") == T.TOLERANCES["q4"]
    assert T.tolerance("fp32", "fp32", overrides={"fp32": 1e-5}) == 1e-5
    with pytest.raises(XBackendError, match="fp8"):
        T.tolerance("fp8", "fp32")
    assert list(T.TOLERANCES) == ["fp64", "fp32", "fp16", "bf16", "q8", "q4"]
    assert all(T.TOLERANCES[x] < T.TOLERANCES[y] for x, y in zip(T.TOLERANCES, list(T.TOLERANCES)[1:]))


def test_tier_of_reads_the_spec():
    assert T.tier_of({"spec": {"dtype": "bf16", "quant": None}}) == "bf16"
    assert T.tier_of({"spec": {"dtype": "fp32", "quant": "q4"}}) == "q4"
    assert T.tier_of({}) == "fp32"


# --------------------------------------------------------------------------- vectorised == naive


@pytest.mark.parametrize("noise", [1e-4, 3e-2, 1.0])
def test_vectorised_equals_naive_reference(tmp_path, noise):
    # text 4000 logits with top-k 25 takes the group-maxima search, audio 300 with 40 the partition
    vocab = (4000, 300, 300)
    settings = {"temp_text": 0.7, "top_k_text": 25, "temp_audio": 0.9, "top_k_audio": 40}
    meta = settings_meta(**settings)
    a = synthetic_trace(tmp_path / "a", steps=37, vocab=vocab, seed=3, meta=meta)
    b = synthetic_trace(tmp_path / "b", steps=37, vocab=vocab, seed=3, noise=noise, noise_seed=9, meta=meta)
    m = M.step_metrics(a, b, block=8, workers=2)
    for i, stream in enumerate(a.streams):
        temp, top_k = SamplingSettings(**settings).for_stream(i)
        ref = naive_metrics(a.logits(stream), b.logits(stream), a.tokens[:, i], temp, top_k)
        # Not tolerances of a backend: float32 arithmetic against the float64 formulas. max_abs is exact
        # while the two logits are within 2x of each other, else one float32 rounding of Δ: at most 2^-24
        # (6.0e-8) relative on any IEEE 754 CPU; measured 5.0e-8. The others sum in float32, in an order
        # that numpy's SIMD width may change: measured rms 3.3e-7 (30x margin), kl 2.0e-6 and dp_ref
        # 1.9e-6 (100x), over the three noise levels.
        np.testing.assert_allclose(m.max_abs[:, i], ref["max_abs"], rtol=6e-8)
        np.testing.assert_allclose(m.rms[:, i], ref["rms"], rtol=1e-5)
        np.testing.assert_allclose(m.kl[:, i], ref["kl"], rtol=2e-4, atol=1e-12)
        np.testing.assert_allclose(m.dp_ref[:, i], ref["dp_ref"], rtol=2e-4, atol=1e-9)
        np.testing.assert_array_equal(m.top1[:, i], ref["top1"])
        np.testing.assert_array_equal(m.topk_overlap[:, i], ref["topk_overlap"])
    assert np.array_equal(m.margin_a, a.margins) and np.array_equal(m.margin_b, b.margins)


def test_blocks_and_threads_do_not_change_the_numbers(tmp_path):
    vocab = (500, 64)
    a = synthetic_trace(tmp_path / "a", steps=23, vocab=vocab, seed=4)
    b = synthetic_trace(tmp_path / "b", steps=23, vocab=vocab, seed=4, noise=0.05, noise_seed=1)
    one = M.step_metrics(a, b, block=256, workers=1)
    many = M.step_metrics(a, b, block=5, workers=3)
    for name in M.METRICS:
        np.testing.assert_array_equal(getattr(one, name), getattr(many, name), err_msg=name)


def test_float64_trace_against_float32(tmp_path):
    rng = np.random.default_rng(5)
    logits = [grid_logits(rng, 4, 50)]
    a = write_trace(tmp_path / "a", logits, streams=["text"])
    b = write_trace(tmp_path / "b", [logits[0].astype(np.float64) + 2.0**-30], streams=["text"],
                    logits_dtype="float64")
    m = M.step_metrics(a, b)
    assert np.all(m.max_abs == 2.0**-30)
    assert M.bitwise_equal_steps(a, b) == 0


def test_nonfinite_logits_show_up(tmp_path):
    def plant(rows):
        rows[0][2, 3] = np.nan

    a, b, _, _ = make_pair(tmp_path, edit_b=plant)
    m = M.step_metrics(a, b)
    assert np.isnan(m.max_abs[2, 0]) and np.isfinite(np.delete(m.max_abs[:, 0], 2)).all()
    assert M.summarize(m.max_abs[:, 0]).nonfinite == 1


def test_different_lengths_and_truncated_traces(tmp_path):
    vocab = (30, 8)
    a = synthetic_trace(tmp_path / "a", steps=12, vocab=vocab, seed=6)
    synthetic_trace(tmp_path / "b", steps=7, vocab=vocab, seed=6, close=False)
    with pytest.warns(TruncatedTraceWarning):
        b = load_trace(tmp_path / "b")
    m = M.step_metrics(a, b)
    assert m.steps == 7 and np.all(m.max_abs == 0)
    assert M.step_metrics(a, b, steps=3).steps == 3
    assert M.bitwise_equal_steps(a, b) is None and M.first_token_divergence(a, b) is None


def test_streams_must_match(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=2, vocab=(30, 8), seed=0)
    b = synthetic_trace(tmp_path / "b", steps=2, vocab=(30, 9), seed=0)
    with pytest.raises(XBackendError, match="different streams or vocabularies"):
        M.step_metrics(a, b)


def test_group_size_choice():
    assert M._group_size(32000, 25) > 0  # Moshi text: group-maxima search
    assert M._group_size(2048, 250) == 0  # Moshi audio: a plain partition is cheaper
    assert M._group_size(100, 100) == 0
    g = M._group_size(32000, 25)
    assert 32000 % g == 0 and 32000 // g > 25


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_phi_is_accurate_in_every_range(dtype):
    # φ(x) = x + exp(-x) - 1, against a float64 reference that avoids its cancellation
    mags = np.concatenate([[0.0], np.logspace(-7, np.log10(50), 400)])
    x = np.concatenate([-mags, mags]).astype(dtype).astype(np.float64)  # representable inputs
    ref = np.where(np.abs(x) < 1e-2, x**2 / 2 - x**3 / 6 + x**4 / 24 - x**5 / 120 + x**6 / 720,
                   np.expm1(-x) + x)
    # measured 2.6e-7 (float32: 3.8x margin, ~4 of the 16 ulps allowed) and 3.7e-14 (float64: 27x); elementwise,
    # so only the libm/SIMD exp and expm1 (a few ulps apart between CPUs) can move it
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for top in (1e-6, 5e-4, 5e-3, 0.05, 50.0):  # every series tier, then the expm1 blend
        keep = np.abs(x) <= top
        xs = x[keep].astype(dtype)[None, :]
        out = M._phi(xs / dtype(0.5), 0.5, float(np.abs(xs).max()), np.empty_like(xs))[0]
        assert np.all(out >= 0)
        np.testing.assert_allclose(out, ref[keep], rtol=tol, atol=0, err_msg=f"|x| <= {top}")
