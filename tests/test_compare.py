"""Ground truth for the diagnosis: one scenario per verdict, built with the plugin API (docs/design.md, Verdict rules).

Every scenario runs the real `compare` protocol with worker subprocesses and asserts the exact
verdict and the exact first-divergence step and stream.
"""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xbackend.compare import CompareRequest, exit_code, run_compare
from xbackend.trace import load_trace

from .helpers import needs_mlx, needs_tiny, run_cli

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
    (verdict,) = report["verdicts"]
    return report, verdict


def test_numeric_divergence_at_the_planted_step(tmp_path):
    report, v = compare(tmp_path, ["cpu", "flip"], ["flip"])
    assert v["verdict"] == "NUMERIC_DIVERGENCE"
    assert v["first_divergence"] == {"step": 6, "stream": "audio3"}
    assert v["figures"]["explained_by_drift"] is True and v["figures"]["delta_at_divergence"] > 1000
    assert exit_code(report) == 1


def test_drift_below_tolerance_is_numeric_drift(tmp_path):
    report, v = compare(tmp_path, ["cpu", "tiny"], ["tiny"])
    assert v["verdict"] == "NUMERIC_DRIFT" and v["first_divergence"] is None
    assert v["figures"]["forced_max_abs"] == pytest.approx(2.0 ** -18, rel=0.5)
    assert v["figures"]["within_tolerance"] and exit_code(report) == 0


def test_fresh_noise_each_run_is_nondeterministic_kernels(tmp_path):
    report, v = compare(tmp_path, ["cpu", "noisy"], ["noisy"])
    assert v["verdict"] == "NONDETERMINISTIC_KERNELS"
    assert v["first_divergence"] == {"step": 0, "stream": "text"}
    rep = next(r for r in report["repeatability"] if r["backend"] == "noisy")
    assert rep["logits_identical"] is False


def test_unseeded_native_sampler(tmp_path):
    report, v = compare(tmp_path, ["cpu", "unseeded"], ["unseeded"])
    assert v["verdict"] == "NONDETERMINISTIC_SAMPLER"
    runs = [load_trace(tmp_path / "run" / "traces" / "unseeded" / f"native-{i}") for i in range(2)]
    step, stream = np.argwhere(runs[0].tokens != runs[1].tokens)[0]
    assert v["first_divergence"] == {"step": int(step), "stream": runs[0].streams[stream]}


@needs_mlx
def test_cpu_against_mlx_is_sampler_divergence(tmp_path):
    report, v = compare(tmp_path, ["cpu", "mlx:cpu"], steps=20)
    assert v["verdict"] == "SAMPLER_DIVERGENCE"
    a, b = (load_trace(tmp_path / "run" / "traces" / n / "native-0") for n in ("cpu", "mlx_cpu"))
    step, stream = np.argwhere(a.tokens != b.tokens)[0]
    assert v["first_divergence"] == {"step": int(step), "stream": a.streams[stream]}
    assert v["figures"]["portable_divergence"] is None and v["figures"]["forced_max_abs"] < 1e-4


def test_different_weights_are_a_semantic_mismatch(tmp_path):
    report, v = compare(tmp_path, ["cpu", "reweighted"], ["reweighted"])
    assert v["verdict"] == "SEMANTIC_MISMATCH"
    assert v["first_divergence"] == {"step": 0, "stream": "text"}


@needs_mlx
def test_upstream_alignment_is_a_semantic_mismatch(tmp_path):
    report, v = compare(tmp_path, ["cpu", "mlx:cpu"], alignment="upstream")
    assert v["verdict"] == "SEMANTIC_MISMATCH"
    assert v["first_divergence"]["step"] == 1  # step 0 sees no user frame on either library


def test_crash_keeps_the_steps_done(tmp_path):
    report, v = compare(tmp_path, ["cpu", "crash"], ["crash"])
    # The process died inside step 5: the step is known from the trace, the stream is not.
    assert v["verdict"] == "BACKEND_FAILED" and v["first_divergence"] == {"step": 5, "stream": None}
    kept = load_trace_quiet(tmp_path / "run" / "traces" / "crash" / "native-0")
    assert kept.steps == 5
    assert next(b for b in report["backends"] if b["name"] == "crash")["status"] == "failed"
    assert exit_code(report) == 3


def test_exception_names_the_step_and_stream(tmp_path):
    PLUGINS["raise"] = """
        def f(run, step, stream, x):
            if step == 3 and stream == "audio5":
                raise RuntimeError("kernel exploded")
            return x
        xbackend.register_backend("raise", xbackend.wrap_backend("cpu", on_logits=f))
    """
    report, v = compare(tmp_path, ["cpu", "raise"], ["raise"])
    assert v["verdict"] == "BACKEND_FAILED" and v["first_divergence"] == {"step": 3, "stream": "audio5"}
    assert "kernel exploded" in v["explanation"]
    assert load_trace_quiet(tmp_path / "run" / "traces" / "raise" / "native-0").steps == 3


def test_nan_logits_fail_the_backend(tmp_path):
    report, v = compare(tmp_path, ["cpu", "nan"], ["nan"])
    assert v["verdict"] == "BACKEND_FAILED" and v["first_divergence"] == {"step": 4, "stream": "audio2"}
    assert load_trace_quiet(tmp_path / "run" / "traces" / "nan" / "native-0").steps == 4
    assert "NaN" in v["explanation"]


def test_hang_is_killed_after_the_timeout(tmp_path):
    report, v = compare(tmp_path, ["cpu", "hang"], ["hang"], timeout=20)
    assert v["verdict"] == "BACKEND_FAILED" and v["first_divergence"]["step"] == 3
    assert "timed out" in v["explanation"]


def test_unavailable_backend_is_reported_not_fatal(tmp_path):
    report, v = compare(tmp_path, ["cpu", "mps"], steps=4)
    assert report["backends"][1]["status"] == "unavailable" and "MPS" in report["backends"][1]["error"]
    assert v["verdict"] == "BACKEND_FAILED" and exit_code(report) == 3


@pytest.mark.slow
def test_identical_copy_never_raises_a_false_alarm(tmp_path):
    for seed in range(20):
        (tmp_path / str(seed)).mkdir()
        report, v = compare(tmp_path / str(seed), ["cpu", "copy"], ["copy"], seed=seed, steps=8)
        assert v["verdict"] == "IDENTICAL", (seed, v)
        assert exit_code(report) == 0


def test_report_json_follows_the_contract(tmp_path):
    report, v = compare(tmp_path, ["cpu", "copy"], ["copy"], steps=6)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["schema"] == "xbackend.report/1" and on_disk["reference"] == "cpu"
    for b in on_disk["backends"]:
        assert {"name", "status", "error", "env"} <= set(b) and b["status"] == "ok"
        assert {"os", "chip", "python", "versions", "device", "dtype", "env"} <= set(b["env"])
    v = on_disk["verdicts"][0]
    assert {"backend", "vs", "verdict", "first_divergence", "explanation"} <= set(v)
    for r in on_disk["repeatability"]:
        assert {"backend", "runs", "logits_identical", "tokens_identical", "first_nondeterministic_step"} <= set(r)
    modes = {d["mode"] for d in on_disk["drift"]}
    assert modes == {"forced", "portable"}
    for d in on_disk["drift"]:
        assert {"backend", "vs", "mode", "streams"} <= set(d)
        assert set(d["streams"]) == {"text"} | {f"audio{i}" for i in range(8)}


def test_compare_cli_prints_the_table_and_writes_audio(tmp_path):
    proc = run_cli("compare", "--backends", "cpu,cpu", "--steps", "6", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "IDENTICAL" in proc.stdout and "cpu#2" in proc.stdout
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
    report, = [run_compare(CompareRequest(backends=("nan", "cpu"), plugins=(plugin(tmp_path, "nan"),), steps=8,
                                          decode_audio=False), tmp_path / "run")]
    (v,) = report["verdicts"]
    assert v["backend"] == "nan" and v["verdict"] == "BACKEND_FAILED"
    assert v["first_divergence"] == {"step": 4, "stream": "audio2"}
    assert report["not_diagnosed"][0]["backend"] == "cpu" and "reference nan" in report["not_diagnosed"][0]["reason"]
    assert next(b for b in report["backends"] if b["name"] == "cpu")["status"] == "ok"
    assert exit_code(report) == 3


def test_clearing_a_reused_run_directory_removes_only_what_xbackend_wrote(tmp_path):
    from xbackend.compare import clear_previous_run
    from xbackend.synthetic import synthetic_trace

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
