"""Ground truth for the diagnosis: one scenario per verdict, built with the plugin API (docs/design.md, Verdict rules).

Every scenario runs the real `compare` protocol with worker subprocesses and asserts the exact
verdict and the exact first-divergence step and stream.
"""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xbackend.compare import CompareRequest, run_compare
from xbackend.results import CompareReport, Point
from xbackend.store.trace import load_trace
from xbackend.tolerances import CONCENTRATED, tolerance

from .helpers import needs_mlx, needs_tiny, run_cli

STREAMS = ["text"] + [f"audio{i}" for i in range(8)]

pytestmark = needs_tiny
STEPS = 12

PLUGINS = {
    # A large change at step 6 on audio3: the least likely token becomes the only choice.
    "flip": """
        def f(run, step, stream, x):
            if step == 6 and stream == "audio3":
                x[np.argmin(x)] = x.max() + 1000.0
            return x
        xbackend.register_backend("flip", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # A deterministic change far below the fp32 tolerance.
    "tiny": """
        def f(run, step, stream, x):
            return x + np.float32(2.0 ** -18)
        xbackend.register_backend("tiny", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # Fresh noise on each run, as non-deterministic GPU reductions give.
    "noisy": """
        def f(run, step, stream, x):
            rng = np.random.default_rng([run, step, len(stream)])
            return x + rng.normal(scale=1e-3, size=x.shape).astype(np.float32)
        xbackend.register_backend("noisy", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # A native sampler that ignores its seed.
    "unseeded": """
        import os
        from xbackend.backends.torch_backend import TorchBackend

        class Unseeded(TorchBackend):
            def seed_rng(self, seed):
                import torch
                torch.manual_seed(int.from_bytes(os.urandom(4), "little"))

        xbackend.register_backend("unseeded", lambda spec: Unseeded(xbackend.parse_spec("cpu")))
    """,
    # Different weights: the text head scaled by 1.5.
    "reweighted": """
        from xbackend.backends.torch_backend import TorchBackend

        class Reweighted(TorchBackend):
            def load(self, model):
                super().load(model)
                import torch
                with torch.no_grad():
                    self.lm.text_linear.weight.mul_(1.5)

        xbackend.register_backend("reweighted", lambda spec: Reweighted(xbackend.parse_spec("cpu")))
    """,
    # A hard crash (the process dies) at step 5.
    "crash": """
        import os
        def f(run, step, stream, x):
            if step == 5:
                os._exit(17)
            return x
        xbackend.register_backend("crash", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # NaN logits at step 4 on audio2.
    "nan": """
        def f(run, step, stream, x):
            if step == 4 and stream == "audio2":
                x[3] = np.nan
            return x
        xbackend.register_backend("nan", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # A hang at step 3.
    "hang": """
        import time
        def f(run, step, stream, x):
            if step == 3:
                time.sleep(120)
            return x
        xbackend.register_backend("hang", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    "copy": """
        xbackend.register_backend("copy", xbackend.wrap_backend("cpu", on_logits=lambda run, step, stream, x: x))
    """,
    # A cache/position bug: every stream's logits rolled by 7 from step 6 on (every run).
    "roll": """
        def f(run, step, stream, x):
            return np.roll(x, 7) if step >= 6 else x
        xbackend.register_backend("roll", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # A one-step kernel glitch: every logit of every stream at step 6 moved by seeded noise of scale 30.
    "spike": """
        def f(run, step, stream, x):
            if step == 6:
                return x + np.random.default_rng([step, len(stream)]).normal(scale=30.0, size=x.shape).astype(np.float32)
            return x
        xbackend.register_backend("spike", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    # Nondeterministic kernels from step 6 on: fresh noise in every run.
    "noise6": """
        def f(run, step, stream, x):
            if step < 6:
                return x
            rng = np.random.default_rng([run, step, len(stream)])
            return x + rng.normal(scale=1e-3, size=x.shape).astype(np.float32)
        xbackend.register_backend("noise6", xbackend.wrap_backend("cpu", on_logits=f))
    """,
}


def plugin(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"plugin_{name}.py"
    path.write_text("import numpy as np\nimport xbackend\n" + textwrap.dedent(PLUGINS[name]))
    return str(path)


def compare(tmp_path, backends, plugins=(), **kw):
    kw.setdefault("steps", STEPS)
    req = CompareRequest(backends=tuple(backends), plugins=tuple(plugin(tmp_path, p) for p in plugins),
                         decode_audio=False, **kw)
    report = run_compare(req, tmp_path / "run")
    (verdict,) = report.verdicts
    return report, verdict


def at(step, stream):
    return Point(step, stream)


def native_and_portable(run: Path, label: str):
    """First native and portable token divergences of `label` against the reference cpu, from the trace files."""
    out = []
    for kind in ("native-0", "portable"):
        a, b = (load_trace(run / "traces" / n / kind) for n in ("cpu", label))
        diff = np.argwhere(a.tokens != b.tokens)
        out.append(None if not diff.size else Point(int(diff[0][0]), a.streams[int(diff[0][1])]))
    return out


def test_numeric_divergence_at_the_planted_step(tmp_path):
    report, v = compare(tmp_path, ["cpu", "flip"], ["flip"], arbiter="none")
    assert v.verdict == "NUMERIC_DIVERGENCE" and v.first_divergence == at(6, "audio3")
    assert v.figures["explained_by_drift"] is True and v.figures["delta_at_divergence"] > 1000
    assert not v.expected and report.exit_code == 1 and report.arbiter["status"] == "off"


def test_drift_below_tolerance_is_numeric_drift(tmp_path):
    report, v = compare(tmp_path, ["cpu", "tiny"], ["tiny"], arbiter="none")
    assert v.verdict == "NUMERIC_DRIFT" and v.first_divergence is None
    # x + 2^-18 in float32 is off by at most half an ulp: at most 2^-19, 50% of the shift, for |logit| < 64
    # (the tiny model's are smaller); IEEE 754 rounding, the same on every CPU
    assert v.figures["forced_max_abs"] == pytest.approx(2.0 ** -18, rel=0.5)
    assert v.figures["within_tolerance"] and v.expected and report.exit_code == 0


def test_fresh_noise_from_step_6_is_nondeterministic_kernels_at_step_6(tmp_path):
    report, v = compare(tmp_path, ["cpu", "noise6"], ["noise6"], arbiter="none")
    assert v.verdict == "NONDETERMINISTIC_KERNELS" and v.first_divergence == at(6, "text")
    rep = report.repeatability_for("noise6")
    # planted noise of sd 1e-3 in each run: the max of the difference over every logit is several sd
    # (measured 3.4e-3 forced max, README's verdict table); seeded numpy, the same on every CPU
    assert rep.logits_identical is False and rep.run_to_run_drift > 1e-3
    assert report.exit_code == 1


def test_unseeded_native_sampler(tmp_path):
    report, v = compare(tmp_path, ["cpu", "unseeded"], ["unseeded"], arbiter="none")
    assert v.verdict == "NONDETERMINISTIC_SAMPLER"
    runs = [load_trace(tmp_path / "run" / "traces" / "unseeded" / f"native-{i}") for i in range(2)]
    step, stream = np.argwhere(runs[0].tokens != runs[1].tokens)[0]
    assert v.first_divergence == at(int(step), runs[0].streams[stream])


def test_logits_rolled_from_step_6_are_a_semantic_mismatch_at_step_6(tmp_path):
    report, v = compare(tmp_path, ["cpu", "roll"], ["roll"], arbiter="none")
    assert v.verdict == "SEMANTIC_MISMATCH" and v.first_divergence == at(6, "text")
    assert v.figures["onset_share_over"] == 1.0 and v.figures["onset_before"] == 0.0
    assert v.figures["evidence"]["cause"] == "a permutation" and "rolled by 7 tokens" in v.explanation
    assert report.exit_code == 1


def test_one_step_spike_is_a_numeric_divergence_at_that_step(tmp_path):
    report, v = compare(tmp_path, ["cpu", "spike"], ["spike"], arbiter="none")
    assert v.verdict == "NUMERIC_DIVERGENCE" and v.first_divergence == at(6, "text")
    assert "SEMANTIC_MISMATCH" not in {s.verdict for s in v.secondary}
    # planted noise of sd 30 (measured 99.6 max) against the semantic rule's 100 x tolerance (0.1)
    assert v.figures["spikes"][0]["step"] == 6 and v.figures["spikes"][0]["max_abs"] > 100 * v.figures["tolerance"]
    assert report.exit_code == 1


@needs_mlx
def test_cpu_against_mlx_is_an_expected_sampler_divergence(tmp_path):
    report, v = compare(tmp_path, ["cpu", "mlx:cpu"], steps=20)
    n, p = native_and_portable(tmp_path / "run", "mlx_cpu")
    assert v.verdict == "SAMPLER_DIVERGENCE" and v.first_divergence == n and p is None
    # the fp32 tolerance (1e-3); mlx:cpu forced on cpu measured <= 2.7e-5 over 200 steps (test_mlx_backend)
    assert v.figures["shared_sampler"] is False and v.figures["forced_max_abs"] <= tolerance("fp32")
    assert v.expected and report.exit_code == 0 and "Same logits" not in v.explanation
    assert report.arbiter["status"] == "ok" and report.arbiter["spec"] == "cpu:fp64"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cpu_against_its_own_low_precision_is_numeric_and_the_arbiter_favours_fp32(tmp_path, dtype):
    report, v = compare(tmp_path, ["cpu", f"cpu:{dtype}"], steps=12)
    n, p = native_and_portable(tmp_path / "run", f"cpu_{dtype}")
    first = min([x for x in (n, p) if x is not None], key=lambda x: (x.step, STREAMS.index(x.stream)))
    assert v.verdict == "NUMERIC_DIVERGENCE" and v.first_divergence == first
    assert v.figures["shared_sampler"] is True and "SAMPLER_DIVERGENCE" not in {s.verdict for s in v.secondary}
    # drift within the tier's tolerance flipped it: expected, exit 0 (docs/design.md, One fact, one exit code)
    assert v.within_tolerance and v.expected and report.exit_code == 0
    assert_no_semantic_alarm(v)
    a = v.figures["arbiter"]
    # measured 36,482x (bf16) and 5,309x (fp16) further from fp64 (README's verdict table): 53x margin at
    # least; half precision rounds 2^13 (fp16) to 2^16 (bf16) times coarser than fp32 on any CPU
    assert a["spec"] == "cpu:fp64" and a["closer"] == "cpu" and a["ratio"] > 100
    assert f"cpu:{dtype} is" in v.explanation and "further from fp64 than cpu" in v.explanation


@needs_mlx
@pytest.mark.parametrize("other", ["mlx:q8", "mlx:q4", "mlx:cpu:bf16"])
def test_mlx_against_its_own_quantized_or_bf16_is_numeric(tmp_path, other):
    req = CompareRequest(backends=("mlx:cpu", other), steps=12, decode_audio=False, arbiter="none")
    report = run_compare(req, tmp_path / "run")
    (v,) = report.verdicts
    assert v.figures["shared_sampler"] is True and "SAMPLER_DIVERGENCE" not in {s.verdict for s in v.secondary}
    first = []
    for kind in ("native-0", "portable"):
        a, b = (load_trace(tmp_path / "run" / "traces" / n / kind) for n in ("mlx_cpu", other.replace(":", "_")))
        diff = np.argwhere(a.tokens != b.tokens)
        first += [Point(int(diff[0][0]), a.streams[int(diff[0][1])])] if diff.size else []
    assert_no_semantic_alarm(v)
    if first:  # one sampler: whichever decision flips first is numeric, at that step and stream
        assert v.verdict == "NUMERIC_DIVERGENCE" and v.expected and report.exit_code == 0
        assert v.first_divergence == min(first, key=lambda x: (x.step, STREAMS.index(x.stream)))
    else:
        assert v.verdict == "NUMERIC_DRIFT" and v.within_tolerance and v.expected


def assert_no_semantic_alarm(v):
    """A healthy loose tier raises no semantic alarm: what its sampler sees stays within the tolerance
    (measured over 200 steps: at most 0.27 x for cpu:fp16, 0.49 x cpu:bf16, 0.59 x mlx:cpu:bf16, 0.09 x mlx:q8,
    0.46 x mlx:q4),
    and where it is over a quarter of the tolerance no token stands out of its step's noise by the
    concentrated factor (measured at most 4.1x, mlx:q4; docs/design.md, What the sampler sees)."""
    assert "SEMANTIC_MISMATCH" not in {v.verdict, *(s.verdict for s in v.secondary)}
    assert not v.figures.get("spikes"), v.figures.get("spikes")
    assert v.figures["visible_max"] <= v.figures["tolerance"]
    assert v.figures["concentration_max"] < CONCENTRATED


def test_different_weights_are_a_semantic_mismatch(tmp_path):
    report, v = compare(tmp_path, ["cpu", "reweighted"], ["reweighted"], arbiter="none")
    assert v.verdict == "SEMANTIC_MISMATCH"
    assert v.first_divergence == at(0, "text")
    assert v.figures["evidence"]["cause"] == "a scale" and v.figures["evidence"]["scale"] == pytest.approx(1.5, rel=1e-3)


@needs_mlx
def test_upstream_alignment_is_a_semantic_mismatch(tmp_path):
    report, v = compare(tmp_path, ["cpu", "mlx:cpu"], alignment="upstream", arbiter="none")
    assert v.verdict == "SEMANTIC_MISMATCH"
    assert v.first_divergence.step == 1  # step 0 sees no user frame on either library
    assert v.figures["evidence"]["cause"] == "recorded difference" and "--alignment aligned" in v.explanation


def test_crash_keeps_the_steps_done(tmp_path):
    report, v = compare(tmp_path, ["cpu", "crash"], ["crash"], arbiter="none")
    # The process died inside step 5: the step is known from the trace, the stream is not.
    assert v.verdict == "BACKEND_FAILED" and v.first_divergence == at(5, None)
    kept = load_trace_quiet(tmp_path / "run" / "traces" / "crash" / "native-0")
    assert kept.steps == 5
    assert next(b for b in report.backends if b["name"] == "crash")["status"] == "failed"
    assert report.exit_code == 3


def test_exception_names_the_step_and_stream(tmp_path):
    PLUGINS["raise"] = """
        def f(run, step, stream, x):
            if step == 3 and stream == "audio5":
                raise RuntimeError("kernel exploded")
            return x
        xbackend.register_backend("raise", xbackend.wrap_backend("cpu", on_logits=f))
    """
    report, v = compare(tmp_path, ["cpu", "raise"], ["raise"], arbiter="none")
    assert v.verdict == "BACKEND_FAILED" and v.first_divergence == at(3, "audio5")
    assert "kernel exploded" in v.explanation
    assert load_trace_quiet(tmp_path / "run" / "traces" / "raise" / "native-0").steps == 3


def test_nan_logits_fail_the_backend(tmp_path):
    report, v = compare(tmp_path, ["cpu", "nan"], ["nan"], arbiter="none")
    assert v.verdict == "BACKEND_FAILED" and v.first_divergence == at(4, "audio2")
    assert load_trace_quiet(tmp_path / "run" / "traces" / "nan" / "native-0").steps == 4
    assert "NaN" in v.explanation


def test_hang_is_killed_after_the_timeout(tmp_path):
    report, v = compare(tmp_path, ["cpu", "hang"], ["hang"], timeout=20, arbiter="none")
    assert v.verdict == "BACKEND_FAILED" and v.first_divergence.step == 3
    assert "timed out" in v.explanation


def test_unavailable_backend_is_reported_not_fatal(tmp_path):
    report, v = compare(tmp_path, ["cpu", "mps"], steps=4, arbiter="none")
    assert report.backends[1]["status"] == "unavailable" and "MPS" in report.backends[1]["error"]
    assert v.verdict == "BACKEND_FAILED" and report.exit_code == 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))  # one test per seed: progress shows, and xdist spreads them
def test_twin_never_raises_a_false_alarm(tmp_path, seed):
    report, v = compare(tmp_path, ["cpu", "cpu"], seed=seed, steps=8, arbiter="none")
    assert v.backend == "cpu#2" and v.verdict == "IDENTICAL", (seed, v)
    assert report.exit_code == 0


def test_one_repeat_measures_no_run_to_run_drift(tmp_path):
    report, v = compare(tmp_path, ["cpu", "tiny"], ["tiny"], repeats=1, steps=4, arbiter="none")
    rep = report.repeatability_for("tiny")
    assert rep.runs == 1 and rep.run_to_run_drift is None and rep.logits_identical is None
    assert v.figures["run_to_run_drift"] is None and "not measured: one run" in v.explanation
    assert "drift 0" not in v.explanation


def test_report_json_follows_the_contract(tmp_path):
    report, v = compare(tmp_path, ["cpu", "copy"], ["copy"], steps=6)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["schema"] == "xbackend.report/1" and on_disk["reference"] == "cpu"
    for b in on_disk["backends"]:
        assert {"name", "status", "error", "env"} <= set(b) and b["status"] == "ok"
        assert {"os", "chip", "python", "versions", "device", "dtype", "env"} <= set(b["env"])
    d = on_disk["verdicts"][0]
    assert {"backend", "vs", "verdict", "first_divergence", "explanation", "expected"} <= set(d)
    for r in on_disk["repeatability"]:
        assert {"backend", "runs", "logits_identical", "tokens_identical", "first_nondeterministic_step"} <= set(r)
    modes = {d["mode"] for d in on_disk["drift"]}
    assert modes == {"forced", "portable"}
    for d in on_disk["drift"]:
        assert {"backend", "vs", "mode", "streams"} <= set(d)
        assert set(d["streams"]) == set(STREAMS)
    arb = on_disk["arbiter"]
    assert arb["spec"] == "cpu:fp64" and arb["status"] == "ok" and {b["backend"] for b in arb["backends"]} == {"cpu", "copy"}
    assert load_trace(tmp_path / "run" / arb["trace"]).meta["sampler"]["mode"] == "forced"
    assert CompareReport.from_dict(on_disk).to_dict()["verdicts"] == on_disk["verdicts"]


def test_traces_record_their_sampler_identity(tmp_path):
    compare(tmp_path, ["cpu", "copy"], ["copy"], steps=2, arbiter="none")
    ident = {k: load_trace(tmp_path / "run" / "traces" / "copy" / k).meta["sampler"]["identity"]
             for k in ("native-0", "portable", "forced")}
    assert ident["native-0"]["rng"] == "torch CPU generator (mt19937)" and "sample_token" in ident["native-0"]["algorithm"]
    assert ident["portable"]["rng"].startswith("Philox4x64-10") and ident["forced"]["rng"] is None


def test_compare_cli_prints_the_table_and_writes_audio(tmp_path):
    proc = run_cli("compare", "--backends", "cpu,cpu", "--steps", "6", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "IDENTICAL" in proc.stdout and "cpu#2" in proc.stdout and "expected" in proc.stdout
    assert (tmp_path / "run" / "audio" / "cpu.wav").is_file()
    import soundfile as sf

    audio, rate = sf.read(str(tmp_path / "run" / "audio" / "cpu.wav"))
    assert rate == 24000 and len(audio) == (6 - 1) * 1920


def load_trace_quiet(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_trace(path)


def test_failed_reference_blames_no_one_else(tmp_path):
    report = run_compare(CompareRequest(backends=("nan", "cpu"), plugins=(plugin(tmp_path, "nan"),), steps=8,
                                        decode_audio=False), tmp_path / "run")
    (v,) = report.verdicts
    assert v.backend == "nan" and v.verdict == "BACKEND_FAILED"
    assert v.first_divergence == at(4, "audio2")
    assert report.not_diagnosed[0]["backend"] == "cpu" and "reference nan" in report.not_diagnosed[0]["reason"]
    assert next(b for b in report.backends if b["name"] == "cpu")["status"] == "ok"
    assert report.exit_code == 3 and report.arbiter["status"] != "ok"


def test_wrap_backend_honours_the_requested_spec(registry):
    from xbackend.backends import create_backend, register_backend, wrap_backend

    register_backend("wrapped-test", wrap_backend("cpu", on_logits=lambda run, step, stream, x: x))
    b = create_backend("wrapped-test:bf16")
    assert b.label == "wrapped-test:bf16" and b.spec.name == "cpu" and b.spec.dtype == "bf16"
    assert create_backend("wrapped-test").spec.dtype == "fp32"


def test_clearing_a_reused_run_directory_removes_only_what_xbackend_wrote(tmp_path):
    from xbackend.store.rundir import clear_previous_run
    from xbackend.testing.traces import synthetic_trace

    out = tmp_path / "run"
    for label, run in (("cpu", "native-0"), ("mlx_cpu", "native-0"), ("mlx_cpu", "portable")):
        synthetic_trace(out / "traces" / label / run, steps=2, vocab=(8, 8))
    (out / "report.json").write_text(json.dumps({"traces": {"cpu": "traces/cpu", "mlx:cpu": "traces/mlx_cpu"},
                                                 "audio": {"mlx:cpu": "audio/mlx_cpu.wav"}}))
    for rel in ("audio/mlx_cpu.wav", "plots/drift-mlx_cpu.png", "report.md", "bundle.tar.gz", "prompt_codes.npy"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    (out / "jobs").mkdir()
    (out / "jobs" / "mlx_cpu.json").write_text(json.dumps({"plugins": [], "runs": []}))
    mine = {"traces/mlx_cpu/portable/notes.txt": "mine", "audio/interview.wav": "mine", "plots/mine.png": "mine",
            "jobs/todo.json": "[1]", "traces/other/meta.json": '{"schema": "someone-else/1"}', "README": "mine"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)

    removed = clear_previous_run(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(mine)
    assert not (out / "traces" / "cpu").exists() and not (out / "traces" / "mlx_cpu" / "native-0").exists()
    assert len(removed) == 3 * 7 + 1 + 4 + 2  # 3 traces of 7 files (2 streams), the job, 4 run files, audio and plot


def test_a_reused_out_is_cleared_only_where_xbackend_made_it(tmp_path):
    """Issue #9 and #15 together: an --out xbackend made loses the earlier run's traces; one taken
    with --force keeps everything, on that run and every later one; one in use is refused."""
    from types import SimpleNamespace

    from xbackend.capture.run import CaptureRequest
    from xbackend.compare import start_run
    from xbackend.errors import XBackendError
    from xbackend.store.claim import claim
    from xbackend.testing.traces import synthetic_trace

    prompt = SimpleNamespace(codes=np.zeros((2, 3), dtype=np.int64), own_frames=3)
    base = CaptureRequest(backend="cpu")

    ours = tmp_path / "ours"
    with claim(ours, "run") as c:
        assert c.owned
        synthetic_trace(ours / "traces" / "cpu" / "native-0", steps=2, vocab=(8, 8))
        start_run(c, prompt, base)
    with claim(ours, "run") as c:
        assert c.owned
        start_run(c, prompt, base)
        with pytest.raises(XBackendError, match="in use by another xbackend run"):
            claim(ours, "run")
    assert not (ours / "traces").exists() and (ours / "prompt_codes.npy").is_file()

    theirs = tmp_path / "theirs"
    synthetic_trace(theirs / "traces" / "cpu" / "native-0", steps=2, vocab=(8, 8))  # e.g. unpacked from a bundle
    (theirs / "report.md").write_text("my notes")
    kept = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    with pytest.raises(XBackendError, match="not written by xbackend"):
        claim(theirs, "run")
    for force in (True, False):  # forced once, the directory stays someone else's
        with claim(theirs, "run", force=force) as c:
            assert not c.owned
            start_run(c, prompt, base)
    left = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    assert set(kept) <= set(left) and (theirs / "report.md").read_text() == "my notes"
