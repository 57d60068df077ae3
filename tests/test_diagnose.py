"""The diagnosis rules on synthetic runs: one case per rule and per edge, no model, no subprocess.

Each case writes real trace files (3 streams, vocabulary 16, 20 steps) whose logits and tokens are
planted exactly, then calls `diagnose` as `compare` does.
"""

from __future__ import annotations

import numpy as np
import pytest

from xbackend.analysis.diagnose import BackendRuns, arbiter_comparison, diagnose, persistent_onset
from xbackend.results import CompareReport, Point, Repeatability, Verdict, reference_warning
from xbackend.samplers import SAMPLER_IDENTITIES, shares_sampler
from xbackend.testing.traces import default_meta, write_trace

STEPS, VOCAB, STREAMS = 20, 16, ["text", "audio0", "audio1"]
TOL, WINDOW = 1e-3, 3
TORCH_CPU = {"algorithm": "moshi sample_token", "rng": "torch CPU generator (mt19937)"}
MLX_CPU = {"algorithm": "moshi_mlx Sampler", "rng": "MLX Threefry key on cpu"}
BASE = np.random.default_rng(0).standard_normal((STEPS, len(STREAMS), VOCAB)).astype(np.float32) * 3


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=2)


def write(path, logits, tokens, mode, identity, tier="fp32"):
    sampler = {"mode": mode, "seed": 1, "identity": identity if mode == "native" else SAMPLER_IDENTITIES.get(mode)}
    meta = default_meta(mode=mode, sampler=sampler, dtype=tier, spec={"name": "x", "dtype": tier, "quant": None})
    margins = np.ones((logits.shape[0], len(STREAMS)), dtype=np.float32)
    return write_trace(path, [logits[:, k] for k in range(len(STREAMS))], tokens=tokens, margins=margins, meta=meta,
                       streams=STREAMS)


def backend(tmp_path, label, *, delta=None, native_tokens=None, portable_tokens=None, repeat_delta=None,
            repeat_tokens=None, identity=TORCH_CPU, repeats=2, forced=True) -> BackendRuns:
    """One backend's runs: logits BASE + delta(step) (all modes), tokens greedy unless planted."""
    d = tmp_path / label
    logits = BASE.copy() if delta is None else BASE + delta.astype(np.float32)
    tokens = greedy(BASE)
    native = []
    for i in range(repeats):
        lg = logits + (repeat_delta if (i == 1 and repeat_delta is not None) else 0)
        tk = native_tokens if native_tokens is not None else tokens
        tk = repeat_tokens if (i == 1 and repeat_tokens is not None) else tk
        native.append(write(d / f"native-{i}", lg.astype(np.float32), tk, "native", identity))
    portable = write(d / "portable", logits, portable_tokens if portable_tokens is not None else tokens, "portable",
                     None)
    forced_run = write(d / "forced", logits, tokens, "forced", None) if forced else None
    return BackendRuns(label, "fp32", "ok", native=native, portable=portable, forced=forced_run)


def planted(step, stream, tokens=None):
    """Greedy tokens with one token changed at (step, stream), as a divergence leaves them."""
    t = greedy(BASE).copy() if tokens is None else tokens.copy()
    k = STREAMS.index(stream)
    t[step, k] = (t[step, k] + 1) % VOCAB
    return t


def drift_on(steps, size) -> np.ndarray:
    """Move token 0's logit by `size` at `steps` on every stream (other logits untouched)."""
    d = np.zeros_like(BASE)
    d[steps, :, 0] = size
    return d


@pytest.fixture
def ref(tmp_path):
    return backend(tmp_path, "ref", forced=False)


def run(ref, other, tol=TOL, arbiter=None) -> Verdict:
    v, _ = diagnose(ref, other, tol, WINDOW, arbiter)
    return v


# --------------------------------------------------------------------------- rules 7, 8


def test_identical(tmp_path, ref):
    v = run(ref, backend(tmp_path, "same"))
    assert v.verdict == "IDENTICAL" and v.first_divergence is None and v.expected and v.exit_code == 0


def test_drift_within_tolerance_is_expected_numeric_drift(tmp_path, ref):
    v = run(ref, backend(tmp_path, "small", delta=drift_on(slice(None), 1e-4)))
    assert v.verdict == "NUMERIC_DRIFT" and v.within_tolerance and v.expected and v.exit_code == 0
    assert "within the tolerance of 0.001" in v.explanation


def test_drift_beyond_tolerance_is_stated_in_tolerance_units(tmp_path, ref):
    v = run(ref, backend(tmp_path, "big", delta=drift_on(slice(None), 0.05)))
    assert v.verdict == "NUMERIC_DRIFT" and not v.expected and v.exit_code == 1
    assert "50x the tolerance of 0.001: BEYOND tolerance" in v.explanation


# --------------------------------------------------------------------------- sampler identity (rules 5, 6)


def test_different_samplers_with_agreeing_logits_are_an_expected_sampler_divergence(tmp_path, ref):
    v = run(ref, backend(tmp_path, "mlx", native_tokens=planted(0, "audio0"), identity=MLX_CPU))
    assert v.verdict == "SAMPLER_DIVERGENCE" and v.first_divergence == Point(0, "audio0")
    assert v.figures["shared_sampler"] is False and v.expected and v.exit_code == 0
    assert "moshi_mlx Sampler on MLX Threefry key on cpu" in v.explanation
    assert "The logits agree within tolerance" in v.explanation


def test_a_shared_sampler_makes_a_native_divergence_numeric(tmp_path, ref):
    v = run(ref, backend(tmp_path, "bf16", native_tokens=planted(4, "audio1"), delta=drift_on(slice(None), 1e-4)))
    assert v.verdict == "NUMERIC_DIVERGENCE" and v.first_divergence == Point(4, "audio1")
    assert v.figures["numeric_cause"] == "native" and v.figures["shared_sampler"] is True
    assert "SAMPLER_DIVERGENCE" not in {s.verdict for s in v.secondary} and not v.expected
    assert "same sampler" in v.explanation and "only the logits can make their tokens differ" in v.explanation


def test_an_unrecorded_sampler_is_never_called_shared(tmp_path, ref):
    v = run(ref, backend(tmp_path, "plugin", native_tokens=planted(2, "text"), identity=None))
    assert v.verdict == "SAMPLER_DIVERGENCE" and v.figures["shared_sampler"] is None
    assert "an unrecorded sampler" in v.explanation
    assert shares_sampler(TORCH_CPU, None) is None and shares_sampler(TORCH_CPU, dict(TORCH_CPU)) is True
    assert shares_sampler(TORCH_CPU, {**TORCH_CPU, "rng": "torch CUDA generator"}) is False


def test_different_samplers_and_drift_beyond_tolerance_are_both_findings(tmp_path, ref):
    v = run(ref, backend(tmp_path, "q4", native_tokens=planted(0, "text"), identity=MLX_CPU,
                         delta=drift_on(slice(None), 0.02)))
    assert v.verdict == "SAMPLER_DIVERGENCE" and not v.expected and v.exit_code == 1
    (drift,) = [s for s in v.secondary if s.verdict == "NUMERIC_DRIFT"]
    assert "20x the tolerance" in drift.note and drift.at == Point(0, "text")
    assert "Same logits" not in v.explanation and "beyond tolerance" in v.explanation


@pytest.mark.parametrize("p, n, verdict, first", [
    (Point(3, "audio0"), Point(3, "audio0"), "NUMERIC_DIVERGENCE", Point(3, "audio0")),  # tie: p <= n
    (Point(3, "text"), Point(3, "audio0"), "NUMERIC_DIVERGENCE", Point(3, "text")),  # p first in stream order
    (Point(3, "audio1"), Point(3, "audio0"), "SAMPLER_DIVERGENCE", Point(3, "audio0")),  # n first in stream order
    (Point(2, "audio1"), Point(3, "text"), "NUMERIC_DIVERGENCE", Point(2, "audio1")),  # p at an earlier step
])
def test_ties_between_portable_and_native_divergences_follow_stream_order(tmp_path, ref, p, n, verdict, first):
    other = backend(tmp_path, "o", identity=MLX_CPU, native_tokens=planted(n.step, n.stream),
                    portable_tokens=planted(p.step, p.stream))
    v = run(ref, other)
    assert v.verdict == verdict and v.first_divergence == first
    if verdict == "SAMPLER_DIVERGENCE":
        assert any(s.verdict == "NUMERIC_DIVERGENCE" and s.at == p for s in v.secondary)
    else:  # the samplers differ too: a finding, not hidden
        assert any(s.verdict == "SAMPLER_DIVERGENCE" and s.at == n for s in v.secondary)


# --------------------------------------------------------------------------- repeats (rules 3, 4)


def test_nondeterministic_kernels_at_the_first_differing_step(tmp_path, ref):
    noise = drift_on(slice(5, None), 1e-3)
    v = run(ref, backend(tmp_path, "metal", repeat_delta=noise))
    assert v.verdict == "NONDETERMINISTIC_KERNELS" and v.first_divergence == Point(5, "text")
    assert v.figures["run_to_run_drift"] == pytest.approx(1e-3, rel=1e-3) and v.exit_code == 1


def test_nondeterministic_sampler(tmp_path, ref):
    v = run(ref, backend(tmp_path, "unseeded", repeat_tokens=planted(7, "audio1")))
    assert v.verdict == "NONDETERMINISTIC_SAMPLER" and v.first_divergence == Point(7, "audio1")


def test_one_repeat_measures_nothing_and_says_so(tmp_path):
    ref1 = backend(tmp_path, "ref1", repeats=1, forced=False)
    v = run(ref1, backend(tmp_path, "one", repeats=1, delta=drift_on(slice(None), 1e-4)))
    assert v.verdict == "NUMERIC_DRIFT" and v.figures["run_to_run_drift"] is None
    assert "run-to-run drift not measured: one run" in v.explanation and "drift 0" not in v.explanation
    rep = Repeatability.from_dict(Repeatability("x", 1, None, None).to_dict())
    assert rep.measured is False and rep.repeatable is None and rep.drift_text() == "not measured: one run"


# --------------------------------------------------------------------------- onset (rules 2, 5)


def test_persistent_onset_mid_run_is_semantic_at_the_onset(tmp_path, ref):
    v = run(ref, backend(tmp_path, "cache", delta=drift_on(slice(12, None), 5.0)))
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(12, "text")
    assert "from step 12 on, after 12 steps of agreement" in v.explanation and v.exit_code == 1


def test_onset_in_the_first_steps_is_weights_or_alignment(tmp_path, ref):
    v = run(ref, backend(tmp_path, "weights", delta=drift_on(slice(None), 5.0)))
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(0, "text")
    assert "from the first steps" in v.explanation


def test_a_spike_that_returns_to_baseline_is_a_numeric_event_at_that_step(tmp_path, ref):
    v = run(ref, backend(tmp_path, "glitch", delta=drift_on(9, 5.0)))
    assert v.verdict == "NUMERIC_DIVERGENCE" and v.first_divergence == Point(9, "text")
    assert v.figures["numeric_cause"] == "spike" and "returns to baseline" in v.explanation


def test_a_spike_before_a_persistent_onset_is_a_secondary_finding(tmp_path, ref):
    d = drift_on(3, 5.0) + drift_on(slice(12, None), 5.0)
    v = run(ref, backend(tmp_path, "both", delta=d))
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(12, "text")
    assert any(s.verdict == "NUMERIC_DIVERGENCE" and s.at == Point(3, "text") for s in v.secondary)


def test_run_to_run_drift_raises_the_semantic_threshold(tmp_path, ref):
    # 5.0 from step 12 on, but the backend's own repeats differ by 0.1: 100x that is 10, so not semantic
    noise = drift_on(slice(None), 0.1)
    v = run(ref, backend(tmp_path, "noisy", delta=drift_on(slice(12, None), 5.0), repeat_delta=noise))
    assert v.verdict == "NONDETERMINISTIC_KERNELS" and v.figures["semantic_threshold"] == pytest.approx(10.0, rel=1e-3)


def test_persistence_rule_edges():
    def onset(per_step, threshold=1.0):
        d = np.asarray(per_step, dtype=np.float64)[:, None]
        return persistent_onset(d, ["text"], threshold)

    assert onset([0, 0, 5, 5, 5]).onset == Point(2, "text")
    assert onset([0, 0, 5, 5, 0, 5]).onset == Point(2, "text")  # the next step and half of the rest stay over
    o = onset([0, 0, 5, 0, 5, 0])  # never two steps in a row: spikes
    assert o.onset is None and [p.step for p, _ in o.spikes] == [2, 4]
    assert onset([0, 5, 5, 0, 0, 0, 0, 0]).onset is None  # two steps, then back to baseline for good
    o = onset([0, 5, 0, 0, 0, 0])
    assert o.onset is None and [p.step for p, _ in o.spikes] == [1]
    o = onset([0, 0, 0, 0, 5])  # a crossing on the last step cannot be told from a spike: a spike
    assert o.onset is None and o.spikes[0][0].step == 4
    assert onset([0, np.nan, np.nan, 0]).onset == Point(1, "text")  # NaN counts as over


# --------------------------------------------------------------------------- failures and the report


def test_failed_backend(tmp_path, ref):
    other = BackendRuns("dead", "fp32", "failed", "crashed", failures=[
        {"run": "dead/native-0", "error": "crashed at step 4", "failed_at": {"step": 4, "stream": None}}])
    v = run(ref, other)
    assert v.verdict == "BACKEND_FAILED" and v.first_divergence == Point(4, None) and v.exit_code == 3
    assert "stream unknown" in str(v.first_divergence)


def test_failed_reference_is_the_verdict_of_the_reference(tmp_path):
    dead = BackendRuns("ref", "fp32", "unavailable", "no MPS here")
    v, _ = diagnose(dead, dead, TOL, WINDOW)
    assert v.backend == "ref" and v.verdict == "BACKEND_FAILED" and "no MPS here" in v.explanation


def test_arbiter_names_the_side_closer_to_exact_arithmetic(tmp_path, ref):
    a = arbiter_comparison("cpu:fp64", "cpu", {"max_abs": 2e-6, "median_abs": 1e-6},
                           "cpu:bf16", {"max_abs": 0.9, "median_abs": 4e-3})
    assert a["closer"] == "cpu" and a["ratio"] == pytest.approx(4000)
    v = run(ref, backend(tmp_path, "bf16", delta=drift_on(slice(None), 1e-4)), arbiter=a)
    assert "cpu:bf16 is 4,000x further from fp64 than cpu" in v.explanation
    b = arbiter_comparison("cpu:fp64", "mlx", {"max_abs": 1e-2, "median_abs": 1e-2},
                           "cpu", {"max_abs": 1e-6, "median_abs": 0.0})
    assert b["closer"] == "cpu" and b["ratio"] == 0.0
    assert arbiter_comparison("cpu:fp64", "r", {"max_abs": 0, "median_abs": 0.0}, "o",
                              {"max_abs": 1, "median_abs": 1.0})["ratio"] is None  # infinitely further


def test_report_exit_codes_and_the_reference_rule(tmp_path, ref):
    ok = run(ref, backend(tmp_path, "same"))
    noisy = Repeatability("ref", 2, False, True, Point(3, "text"), None, 0.01)
    backends = ({"name": "ref", "status": "ok"}, {"name": "same", "status": "ok"})
    report = CompareReport(request={}, reference="ref", backends=backends, verdicts=(ok,),
                           repeatability=(noisy,))
    assert report.exit_code == 1 and "not repeatable" in report.reference_warning
    assert CompareReport(request={}, reference="ref", backends=backends, verdicts=(ok,)).exit_code == 0
    failed = ({"name": "ref", "status": "ok"}, {"name": "same", "status": "unavailable"})
    assert CompareReport(request={}, reference="ref", backends=failed, verdicts=(ok,)).exit_code == 3
    assert reference_warning(Repeatability("ref", 1, None, None), "ref") is None  # unmeasured is not noisy
    back = CompareReport.from_dict(report.to_dict())
    assert back.verdicts[0].verdict == "IDENTICAL" and back.exit_code == 1


def test_verdict_round_trips_through_json(tmp_path, ref):
    v = run(ref, backend(tmp_path, "mlx", native_tokens=planted(1, "audio0"), identity=MLX_CPU))
    back = Verdict.from_dict(v.to_dict())
    assert back == v and back.explanation == v.explanation and back.expected == v.expected
    with pytest.raises(Exception, match="Unknown verdict"):
        Verdict.from_dict({**v.to_dict(), "verdict": "MAYBE"})
