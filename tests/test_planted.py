"""Ground truth for issue #23: every class of fault planted through the public plugin API, its truth
written down before the run, on the bundled tiny model (docs/design.md, Verdict rules).

One `compare` holds every planted backend of the CPU (the reference `cpu` runs once; a module fixture
shares it), so the whole class table costs one reference and one worker per planted backend. Each
test asserts the verdict, its step and stream, and the exit code the fact gives.
"""

from __future__ import annotations

import textwrap

import pytest

from xbackend.compare import CompareRequest, run_compare
from xbackend.results import Point

from .helpers import needs_mlx, needs_tiny
from .test_compare import PLUGINS

pytestmark = needs_tiny
STEPS = 24
PAD = 3  # the bundled model's text padding token (config existing_text_padding_id)

PLANTED = {
    # Every logit +5 from step 10: softmax is shift-invariant, no decision can change.
    "shift5": """
        def f(run, step, stream, x):
            return x + np.float32(5.0) if step >= 10 else x
        xbackend.register_backend("shift5", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # Log-probabilities instead of logits: a per-row shift.
    "logprobs": """
        def f(run, step, stream, x):
            m = x.max()
            return (x - (m + np.log(np.exp(x - m).sum()))).astype(np.float32)
        xbackend.register_backend("logprobs", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # The logits below the top-k boundary (text 25, audio 250) lowered by 50 from step 10: top-k never samples them.
    "tail50": """
        def f(run, step, stream, x):
            if step < 10:
                return x
            k = 25 if stream == "text" else 250
            kth = np.sort(x)[-k]
            return np.where(x < kth, x - np.float32(50.0), x).astype(np.float32)
        xbackend.register_backend("tail50", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # +8 on the text pad token from step 20: run as padfault:fp16 and padfault:bf16 (wrap honours the dtype).
    "padfault": f"""
        def f(run, step, stream, x):
            if step >= 20 and stream == "text":
                x[{PAD}] += np.float32(8.0)
            return x
        xbackend.register_backend("padfault", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # Text logits rolled by 7 on every even step from 10 (odd steps clean).
    "rolleven": """
        def f(run, step, stream, x):
            return np.roll(x, 7) if stream == "text" and step >= 10 and step % 2 == 0 else x
        xbackend.register_backend("rolleven", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # Text logits rolled by 7 from step 10, except at step 11.
    "hole11": """
        def f(run, step, stream, x):
            return np.roll(x, 7) if stream == "text" and step >= 10 and step != 11 else x
        xbackend.register_backend("hole11", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # A one-step text glitch at 19, then audio4 wrong (rolled by 5) from step 20 on.
    "glitch": """
        def f(run, step, stream, x):
            if stream == "text" and step == 19:
                return np.roll(x, 7)
            if stream == "audio4" and step >= 20:
                return np.roll(x, 5)
            return x
        xbackend.register_backend("glitch", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # A fault on the native path only: text logits scaled by 3 from step 10 in native runs; the
    # portable and forced runs of the same backend are clean. A TorchBackend subclass, through the registry.
    "nativeonly": """
        from xbackend.backends.torch_backend import TorchBackend

        def fault(run, step, stream, x):
            return x * np.float32(3.0) if stream == "text" and step >= 10 else x

        class NativeOnly(TorchBackend):
            def generate(self, job, recorder, on_step):
                recorder.on_logits = fault if job.sampler.native else None
                return super().generate(job, recorder, on_step)

        xbackend.register_backend("nativeonly", lambda spec: NativeOnly(xbackend.parse_spec("cpu")))
    """,
    # A native sampler that ignores --seed: always 12345 (declares torch's CPU generator all the same).
    "seed12345": """
        from xbackend.backends.torch_backend import TorchBackend

        class FixedSeed(TorchBackend):
            def seed_rng(self, seed):
                import torch
                torch.manual_seed(12345)

        xbackend.register_backend("seed12345", lambda spec: FixedSeed(xbackend.parse_spec("cpu")))
    """,
    "unseeded": PLUGINS["unseeded"],  # a native sampler seeded from the OS: its own repeats differ
    # +8 on one audio1 token from step 20 on MLX: run as mlxpad:q8, mlxpad:q4, mlxpad:cpu:bf16.
    "mlxpad": """
        def f(run, step, stream, x):
            if step >= 20 and stream == "audio1":
                x[17] += np.float32(8.0)
            return x
        xbackend.register_backend("mlxpad", xbackend.wrap_backend("mlx:cpu", on_logits=f))
    """,
}

CPU_ROWS = ("shift5", "logprobs", "tail50", "padfault:fp16", "padfault:bf16", "rolleven", "hole11", "glitch",
            "nativeonly", "seed12345")


def plugin_file(tmp_path, names) -> str:
    path = tmp_path / "planted.py"
    path.write_text("import numpy as np\nimport xbackend\n" + "".join(textwrap.dedent(PLANTED[n]) for n in names))
    return str(path)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    names = sorted({r.split(":")[0] for r in CPU_ROWS})
    req = CompareRequest(backends=("cpu", *CPU_ROWS), steps=STEPS, plugins=(plugin_file(tmp, names),),
                         decode_audio=False, arbiter="none")
    return run_compare(req, tmp / "run")


@pytest.mark.parametrize("backend", ["shift5", "logprobs", "tail50"])
def test_a_change_no_sampler_can_see_is_numeric_drift(cpu_report, backend):
    v = cpu_report.verdict_for(backend)
    assert v.verdict == "NUMERIC_DRIFT" and v.first_divergence is None and v.secondary == (), v.explanation
    assert v.figures["forced_max_abs"] >= 5.0 and v.figures["changes_no_decision"]
    assert v.figures["visible_max"] <= v.figures["tolerance"]  # float32 rounding of the shift only
    assert v.expected and v.exit_code == 0 and "changes no decision" in v.explanation


@pytest.mark.parametrize("backend", ["padfault:fp16", "padfault:bf16"])
def test_a_few_logits_on_one_token_are_found_on_a_loose_tier(cpu_report, backend):
    v = cpu_report.verdict_for(backend)
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(20, "text"), v.explanation
    assert v.exit_code == 1


@pytest.mark.parametrize("backend", ["rolleven", "hole11"])
def test_recurring_faults_and_holes_persist_from_their_onset(cpu_report, backend):
    v = cpu_report.verdict_for(backend)
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(10, "text"), v.explanation
    # the flips the fault causes are its consequence, not findings of their own
    assert "NUMERIC_DIVERGENCE" not in {s.verdict for s in v.secondary}


def test_a_transient_elsewhere_is_a_secondary_spike(cpu_report):
    v = cpu_report.verdict_for("glitch")
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(20, "audio4"), v.explanation
    assert any(s.verdict == "NUMERIC_DIVERGENCE" and s.at == Point(19, "text") for s in v.secondary)
    assert {"step": 19, "stream": "text"} in [{"step": s["step"], "stream": s["stream"]} for s in v.figures["spikes"]]


def test_a_fault_on_the_native_path_alone_is_found(cpu_report):
    v = cpu_report.verdict_for("nativeonly")
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(10, "text"), v.explanation
    assert v.figures["onset_source"] == "native" and v.figures["forced_max_abs"] == 0.0


def test_a_sampler_that_ignores_the_seed_is_a_sampler_divergence(cpu_report):
    v = cpu_report.verdict_for("seed12345")
    assert v.verdict == "SAMPLER_DIVERGENCE", v.explanation
    assert v.figures["native_logits_bitwise_equal"] is True and v.figures["declared_identity_held"] is False
    assert v.figures["forced_max_abs"] == 0.0 and v.figures["portable_divergence"] is None
    assert "declared identity did not hold" in v.explanation and v.exit_code == 1


def test_a_nondeterministic_reference_sampler_is_not_blamed_on_the_other_backend(tmp_path):
    req = CompareRequest(backends=("unseeded", "cpu"), steps=12, plugins=(plugin_file(tmp_path, ["unseeded"]),),
                         decode_audio=False, arbiter="none")
    report = run_compare(req, tmp_path / "run")
    (v,) = report.verdicts
    assert v.verdict == "SAMPLER_DIVERGENCE" and v.figures["native_logits_bitwise_equal"] is True
    assert v.figures["reference_sampler_repeatable"] is False and v.expected
    assert "the reference's sampler is not deterministic" in v.explanation
    assert "not repeatable" in report.reference_warning and report.exit_code == 1


@needs_mlx
def test_a_few_logits_on_one_token_are_found_on_mlx_loose_tiers(tmp_path):
    rows = ("mlxpad:cpu:bf16", "mlxpad:q8", "mlxpad:q4")
    req = CompareRequest(backends=("mlx:cpu", *rows), steps=STEPS, plugins=(plugin_file(tmp_path, ["mlxpad"]),),
                         decode_audio=False, arbiter="none")
    report = run_compare(req, tmp_path / "run")
    for row in rows:
        v = report.verdict_for(row)
        assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == Point(20, "audio1"), (row, v.explanation)
