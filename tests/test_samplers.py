import math

import numpy as np
import pytest

from xbackend.errors import XBackendError
from xbackend.samplers import Sampler, SamplingSettings, greedy, parse_mode, portable, portable_uniforms
from xbackend.testing.samplers import tempered_probs


def test_portable_noise_is_a_pure_function_of_its_key():
    a = portable_uniforms(7, 3, 2, 1000)
    assert np.array_equal(a, portable_uniforms(7, 3, 2, 1000))
    assert not np.array_equal(a, portable_uniforms(7, 3, 1, 1000))
    assert not np.array_equal(a, portable_uniforms(8, 3, 2, 1000))
    assert a.min() > 0 and a.max() < 1
    # Philox4x64-10 is fixed by its spec: these values must never change across machines or releases,
    # or portable runs recorded elsewhere stop being comparable.
    assert portable_uniforms(0, 0, 0, 2).tolist() == [0.011546754286331617, 0.24154919656271817]
    assert portable_uniforms(299792458, 5, 3, 2).tolist() == [0.4089124481099468, 0.12913401631302107]


def test_portable_follows_the_tempered_top_k_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=40).astype(np.float32) * 2
    expected = tempered_probs(logits, 0.8, 10)
    counts = np.zeros(40)
    n = 6000
    for step in range(n):
        counts[portable(logits, 0.8, 10, seed=1, step=step, stream=0).token] += 1
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))
    # measured 0.0080 (at p = 0.20, whose binomial sd over 6000 draws is 0.0052): 2.5x margin. The
    # portable sampler's Philox draws are integer arithmetic, so these 6000 draws are the same on every CPU.
    assert np.abs(counts / n - expected).max() < 0.02


def test_portable_margin_is_in_logit_units():
    logits = np.array([5.0, 1.0, 0.0], dtype=np.float32)
    d = portable(logits, 0.5, 0, seed=3, step=0, stream=1)
    score = logits / 0.5 - np.log(-np.log(portable_uniforms(3, 0, 1, 3)))
    ranked = np.sort(score)
    assert d.token == int(np.argmax(score))
    assert d.margin == pytest.approx((ranked[-1] - ranked[-2]) * 0.5)


def test_greedy_margin_and_ties():
    d = greedy(np.array([1.0, 3.0, 2.5], dtype=np.float32))
    assert d.token == 1 and d.margin == pytest.approx(0.5)
    assert greedy(np.array([2.0, 2.0], dtype=np.float32)).margin == 0.0


def test_forced_uses_plan_then_greedy():
    plan = np.array([[2, -1]])
    s = Sampler("forced", 0, SamplingSettings(), forced_tokens=plan)
    logits = np.array([0.0, 4.0, 1.0], dtype=np.float32)
    first = s.decide(0, 0, logits)
    assert first.token == 2 and first.margin == pytest.approx(-3.0)
    assert s.decide(0, 1, logits).token == 1
    assert s.decide(5, 0, logits).token == 1  # beyond the plan: greedy


def test_tempered_probs_top_k():
    p = tempered_probs(np.array([3.0, 2.0, 1.0, 0.0]), 1.0, 2)
    assert p[2] == 0 and p[3] == 0
    assert p[0] == pytest.approx(math.e / (math.e + 1))


def test_parse_mode():
    assert parse_mode("portable") == ("portable", None)
    assert parse_mode("forced:/x/y") == ("forced", "/x/y")
    for bad in ("random", "forced", "greedy:3"):
        with pytest.raises(XBackendError):
            parse_mode(bad)


# --- the zero-probability check uses what upstream sampled from -----------------------------------

def _underflowing(vocab: int = 64, gap: float = 80.0) -> np.ndarray:
    """Text logits whose top-k (k=25) holds tokens ~114 tempered logits (temp 0.7) below the best."""
    logits = np.full(vocab, -1000.0, dtype=np.float32)
    logits[0] = 0.0
    logits[1:25] = -gap
    return logits


def test_sampled_probs_is_float32_like_upstream():
    """float64 keeps exp(-114) > 0; the float32 softmax moshi's sample_token draws from gives 0."""
    from xbackend.samplers import sampled_probs

    logits = _underflowing()
    assert tempered_probs(logits, 0.7, 25)[1] > 0  # what the old float64 check saw
    p = sampled_probs(logits, 0.7, 25)
    assert p.dtype == np.float32 and p[1] == 0.0 and p[0] == 1.0
    assert (p[25:] == 0).all()  # outside the top-k
    torch = pytest.importorskip("torch")
    upstream = torch.softmax(torch.from_numpy(logits) / 0.7, dim=-1).numpy()
    np.testing.assert_array_equal(p[:25], upstream[:25])


def test_native_pick_of_an_underflowed_top_k_token_fails():
    from xbackend.backends.base import Job, StepRecorder
    from xbackend.errors import BackendFailed

    job = Job(model=None, user_codes=np.zeros((1, 1), np.int64), steps=1, seed=0, sampler=Sampler("native", 0))
    rec = StepRecorder(job, ["text"])
    rec.begin(0)
    rec.take(_underflowing())
    with pytest.raises(BackendFailed, match="zero probability"):
        rec.native_token(1)  # inside the top 25, float32 probability exactly 0
    rec.native_token(0)
    rec.begin(1)
    rec.take(np.linspace(-1, 1, 64, dtype=np.float32))
    with pytest.raises(BackendFailed, match="zero probability"):
        rec.native_token(63, prob=0.0)  # the device says it drew it with probability 0 (flush to zero)
    rec.native_token(62, prob=0.02)
