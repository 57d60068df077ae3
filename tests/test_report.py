"""`report`: report.md for an upstream issue, drift plots, and a bundle that fits an attachment."""

import json
import tarfile
import textwrap

import numpy as np
import pytest

from xbackend.compare import CompareRequest, run_compare
from xbackend.report import BUNDLE_LIMIT, TOP, WINDOW, load_run, softmax, write_report
from xbackend.synthetic import MOSHI_7B_VOCAB, default_meta, synthetic_trace
from xbackend.trace import load_trace

from .conftest import assert_clean_error, needs_tiny, run_cli

FLIP = """
import numpy as np
import xbackend

def f(run, step, stream, x):
    if step == 6 and stream == "audio3":
        x[np.argmin(x)] = x.max() + 1000.0
    return x

xbackend.register_backend("flip", xbackend.wrap_backend("cpu", on_logits=f))
"""


def table_rows(md: str, prefix: str) -> list[list[str]]:
    """Rows of the top-5 tables (backend, took, rank, p, margin, #1..#5) that start with `prefix`."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith(prefix)]
    return [r for r in rows if len(r) == 5 + TOP]


def extract(bundle, dest):
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")
    return dest / "xbackend-bundle"


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory):
    """A real `compare` of cpu against a backend whose audio3 logits are flipped at step 6."""
    tmp = tmp_path_factory.mktemp("flip")
    plugin = tmp / "plugin_flip.py"
    plugin.write_text(textwrap.dedent(FLIP))
    req = CompareRequest(backends=("cpu", "flip"), steps=10, plugins=(str(plugin),), decode_audio=False)
    run_compare(req, tmp / "run")
    return tmp / "run"


@needs_tiny
def test_report_cli_writes_the_page_the_plot_and_the_bundle(flip_run, tmp_path):
    proc = run_cli("report", str(flip_run))
    assert proc.returncode == 0, proc.stderr
    md = (flip_run / "report.md").read_text()
    for section in ("## Verdicts", "## Divergences", "## Teacher-forced drift", "## Reproduce", "## Environment",
                    "## Bundle", "<details>"):
        assert section in md
    assert "NUMERIC_DIVERGENCE" in md and "### flip: NUMERIC_DIVERGENCE at step 6, stream audio3" in md
    assert "xbackend compare --backends cpu,flip --model tiny" in md and "--plugin" in md
    assert "versions.torch" in md and "threads" in md  # the env fingerprint
    png = flip_run / "plots" / "drift-flip.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plots/drift-flip.png" in md

    # the top-5 table at the divergence, from the portable traces, probabilities at T = 0.8
    assert "Traces: `portable`" in md and "T = 0.8" in md
    ref, flip = (load_trace(flip_run / "traces" / n / "portable") for n in ("cpu", "flip"))
    col = ref.streams.index("audio3")
    (cpu_row,) = table_rows(md, "| cpu (portable)")
    (flip_row,) = table_rows(md, "| flip (portable)")
    z = np.asarray(ref.logits("audio3")[6], dtype=np.float64)
    p = softmax(z, 0.8)
    want = [f"{t} ({p[t]:.4f})" for t in np.argsort(-z, kind="stable")[:TOP]]  # audio: no p below 5e-5 in the top 5
    assert cpu_row[5:5 + TOP] == want
    ref_token = int(ref.tokens[6, col])
    assert cpu_row[1] == str(ref_token) and cpu_row[2] == str(int(np.count_nonzero(z > z[ref_token])) + 1)
    planted = int(np.argmin(z))
    assert flip_row[1] == str(planted) and flip_row[5] == f"{planted} (1.0000)"
    assert float(flip_row[3]) < 1e-100  # the reference's token has no chance left on the flipped backend

    root = extract(flip_run / "bundle.tar.gz", tmp_path)
    assert {"report.json", "report.md", "prompt_codes.npy"} <= {f.name for f in root.iterdir()}
    assert (root / "plots" / "drift-flip.png").is_file()
    for name in ("cpu", "flip"):
        (kept,) = (root / "traces" / name).iterdir()
        trimmed = load_trace(kept)
        assert (trimmed.meta["trimmed_from"]["start"], trimmed.meta["trimmed_from"]["steps"]) == (0, 10)
        original = load_trace(flip_run / "traces" / name / "portable")
        assert trimmed.digests == original.digests[:10]


def fake_env(name: str) -> dict:
    return {"os": "macOS 15.1", "chip": "Apple M3 Max", "machine": "arm64", "python": "3.12.4", "device": name,
            "dtype": "fp32", "threads": 8, "versions": {"torch": "2.5.1", "mlx": "0.21.0", "numpy": "2.1.0"},
            "env": {"NO_TORCH_COMPILE": "1"}}


def seven_b_run(root, steps: int = 100):
    """A 7B-vocabulary run directory: three backends, two divergences, a hand-built report.json."""
    def spike(at_step, at_stream, token):
        def edit(step, stream, z):
            if step == at_step and stream == at_stream:
                z[token] = z.max() + 50.0
            return z
        return edit

    traces = {
        ("cpu", "native-0"): {}, ("cpu", "portable"): {},
        ("mps", "native-0"): {"noise": 1e-3}, ("mps", "forced"): {"noise": 1e-3},
        ("mps", "portable"): {"noise": 1e-3, "edit": spike(30, 1, 7)},
        ("mlx", "native-0"): {"noise": 2e-3, "edit": spike(80, 0, 11)}, ("mlx", "forced"): {"noise": 2e-3},
        ("mlx", "portable"): {"noise": 2e-3},
    }
    for i, ((label, run), kw) in enumerate(traces.items()):
        synthetic_trace(root / "traces" / label / run, steps=steps, seed=1, noise_seed=10 + i,
                        meta=default_meta(backend=label), **kw)
    verdict = {"vs": "cpu", "secondary": [], "note": "", "explanation": "planted"}
    figures = {"tolerance": 1e-3, "forced_max_abs": 0.004, "run_to_run_drift": 0.0, "steps": steps}
    report = {
        "schema": "xbackend.report/1", "created": "2025-01-01T00:00:00+00:00",
        "command": "xbackend compare --backends cpu,mps,mlx --steps 100",
        "request": {"backends": ["cpu", "mps", "mlx"], "model": "moshiko-7b", "model_digest": "0123456789abcdef",
                    "prompt": {"source": "hello.wav", "digest": "feedface", "frames": steps, "kind": "audio"},
                    "seed": 299792458, "steps": steps, "repeats": 2, "timeout": 600.0, "alignment": "aligned",
                    "settings": {"temp_text": 0.7, "top_k_text": 25, "temp_audio": 0.8, "top_k_audio": 250},
                    "plugins": []},
        "reference": "cpu",
        "reference_repeatability": {"backend": "cpu", "runs": 2, "logits_identical": True, "tokens_identical": True},
        "backends": [{"name": n, "spec": n, "status": "ok", "error": None, "env": fake_env(n)} for n in ("cpu", "mps", "mlx")],
        "verdicts": [
            {**verdict, "backend": "mps", "verdict": "NUMERIC_DIVERGENCE", "first_divergence": {"step": 30, "stream": "audio0"},
             "figures": {**figures, "portable_divergence": {"step": 30, "stream": "audio0"}}},
            {**verdict, "backend": "mlx", "verdict": "SAMPLER_DIVERGENCE", "first_divergence": {"step": 80, "stream": "text"},
             "figures": {**figures, "native_divergence": {"step": 80, "stream": "text"}}},
        ],
        "repeatability": [], "drift": [], "failures": [],
        "traces": {n: f"traces/{n}" for n in ("cpu", "mps", "mlx")},
    }
    (root / "report.json").write_text(json.dumps(report))
    return root


def test_bundle_of_a_7b_vocabulary_run_fits_and_its_traces_load(tmp_path):
    run = seven_b_run(tmp_path / "run")
    files = write_report(run)
    assert files.bundle_bytes <= BUNDLE_LIMIT
    print(f"7B bundle: {files.bundle_bytes} bytes, window +-{files.plan.half_width} steps")
    assert 0 < files.plan.half_width < WINDOW and not files.plan.omitted  # trimmed to fit, nothing dropped
    md = files.markdown.read_text()
    assert "### mps: NUMERIC_DIVERGENCE at step 30, stream audio0" in md
    assert "### mlx: SAMPLER_DIVERGENCE at step 80, stream text" in md
    (mps_row,) = table_rows(md, "| mps (portable)")
    assert mps_row[1] == "7" and mps_row[5] == "7 (1.0000)"
    assert len(files.plots) == 2 and "Apple M3 Max" in md and "NO_TORCH_COMPILE" in md

    root = extract(files.bundle, tmp_path / "x")
    loaded = {}
    for d in sorted((root / "traces").glob("*/*")):
        t = load_trace(d)
        start, n = t.meta["trimmed_from"]["start"], t.meta["trimmed_from"]["steps"]
        assert t.steps == n and t.vocab == dict(zip(t.streams, MOSHI_7B_VOCAB))
        original = load_trace(run / "traces" / d.parent.name / d.name.split(".")[0])
        assert np.array_equal(t.logits("text"), original.logits("text")[start:start + n])
        assert np.array_equal(t.tokens, original.tokens[start:start + n]) and t.digests == original.digests[start:start + n]
        loaded[(d.parent.name, d.name.split(".")[0])] = (start, n)
    half = files.plan.half_width
    for label in ("cpu", "mps", "mlx"):
        assert loaded[(label, "portable")] == (30 - half, 2 * half + 1)
        assert loaded[(label, "native-0")] == (80 - half, 2 * half + 1)


def test_no_divergence_keeps_the_first_steps(tmp_path):
    run = seven_b_run(tmp_path / "run", steps=20)
    report = json.loads((run / "report.json").read_text())
    for v in report["verdicts"]:
        v.update(verdict="NUMERIC_DRIFT", first_divergence=None)
    (run / "report.json").write_text(json.dumps(report))
    files = write_report(run)
    assert "No backend diverged" in files.markdown.read_text()
    n = files.plan.windows[0].stop  # 16 steps (HEAD_STEPS) unless that is over the limit: 3 x 16 x 194 kB is
    assert 0 < n < 16
    assert {(w.backend, w.run, w.start, w.stop) for w in files.plan.windows} == {
        ("cpu", "native-0", 0, n), ("mps", "forced", 0, n), ("mlx", "forced", 0, n)}
    assert files.bundle_bytes <= BUNDLE_LIMIT


def test_run_directory_without_a_report_is_bad_input(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert_clean_error(proc, 2, "report.json", "run xbackend compare first")
    with pytest.raises(Exception, match="report.json"):
        load_run(tmp_path)
