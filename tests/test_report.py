"""`report`: report.md for an upstream issue, drift plots, and a bundle that fits an attachment."""

import json
import tarfile
import textwrap

import numpy as np
import pytest

from xbackend.compare import CompareRequest, run_compare
from xbackend.report import BUNDLE_LIMIT, TOP, WINDOW, load_run, softmax, write_report
from xbackend.testing.traces import MOSHI_7B_VOCAB
from xbackend.store.trace import load_trace

from .helpers import assert_clean_error, needs_tiny, registry_scope, run_cli, synthetic_run

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
    with registry_scope():  # the plugin registers "flip" in this process too
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
    assert "NUMERIC_DIVERGENCE" in md and "### flip: NUMERIC_DIVERGENCE at step 6, audio3" in md
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
    report = json.loads((flip_run / "report.json").read_text())
    (v,) = report["verdicts"]
    native = v["figures"]["native_divergence"]
    for name in ("cpu", "flip"):
        kept = {d.name.split(".")[0]: d for d in (root / "traces" / name).iterdir()}
        # the bundle holds every step the page quotes: the portable divergence and the native one
        # (native runs diverge too: one sampler; and the teacher-forced drift spikes at step 6)
        assert native and set(kept) == ({"portable", "native-0"} if name == "cpu" else {"portable", "native-0", "forced"})
        for run, d in kept.items():
            trimmed = load_trace(d)
            start, n = trimmed.meta["trimmed_from"]["start"], trimmed.meta["trimmed_from"]["steps"]
            assert start <= (native["step"] if run == "native-0" and name == "flip" else 6) < start + n
            original = load_trace(flip_run / "traces" / name / run)
            assert trimmed.digests == original.digests[start:start + n]
    assert "--out" not in md.split("## Reproduce")[1].split("```")[1]  # no forced run directory
    assert "## Numeric arbiter" in md and "cpu:fp64" in md


def test_bundle_of_a_7b_vocabulary_run_fits_and_its_traces_load(tmp_path):
    run = synthetic_run(tmp_path / "run")
    files = write_report(run)
    assert files.bundle_bytes <= BUNDLE_LIMIT
    print(f"7B bundle: {files.bundle_bytes} bytes, window +-{files.plan.half_width} steps")
    assert 0 < files.plan.half_width < WINDOW and not files.plan.omitted  # trimmed to fit, nothing dropped
    md = files.markdown.read_text()
    assert "### mps: NUMERIC_DIVERGENCE at step 30, audio0" in md
    assert "### mlx: SAMPLER_DIVERGENCE at step 80, text" in md
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
    run = synthetic_run(tmp_path / "run", steps=20)
    report = json.loads((run / "report.json").read_text())
    for v in report["verdicts"]:
        v.update(verdict="NUMERIC_DRIFT", first_divergence=None)
    (run / "report.json").write_text(json.dumps(report))
    files = write_report(run)
    assert "No backend diverged" in files.markdown.read_text()
    n = files.plan.windows[0].stop  # 16 steps (2 x WINDOW) unless that is over the limit: 3 x 16 x 194 kB is
    assert 0 < n <= 16
    assert {(w.backend, w.run, w.start, w.stop) for w in files.plan.windows} == {
        ("cpu", "native-0", 0, n), ("mps", "forced", 0, n), ("mlx", "forced", 0, n)}
    assert files.bundle_bytes <= BUNDLE_LIMIT


def test_run_directory_without_a_report_is_bad_input(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert_clean_error(proc, 2, "report.json", "run xbackend compare first")
    with pytest.raises(Exception, match="report.json"):
        load_run(tmp_path)


def test_verdicts_quoting_one_divergence_share_one_table(tmp_path):
    run = synthetic_run(tmp_path / "run", steps=40)
    report = json.loads((run / "report.json").read_text())
    for v in report["verdicts"]:
        v.update(verdict="NUMERIC_DIVERGENCE", first_divergence={"step": 30, "stream": "audio0"},
                 figures={**v["figures"], "portable_divergence": {"step": 30, "stream": "audio0"},
                          "native_divergence": None})
    (run / "report.json").write_text(json.dumps(report))
    md = write_report(run).markdown.read_text()
    assert md.count("### ") == 1
    assert "### mps: NUMERIC_DIVERGENCE, mlx: NUMERIC_DIVERGENCE at step 30, audio0" in md
    assert len(table_rows(md, "| mps (portable)")) == 1


def test_reproduce_command_keeps_the_request_and_no_local_paths():
    from xbackend.report import reproduce_command
    from xbackend.results import CompareReport

    req = {"backends": ["cpu", "flip:bf16"], "model": "/data/ckpt.safetensors", "model_config": "/data/config.json",
           "prompt": {"source": "/home/me/secret/take3.wav", "digest": "d"}, "seed": 1, "steps": 50, "repeats": 2,
           "alignment": "aligned", "settings": {"temp_text": 0.6, "top_k_text": 25, "temp_audio": 0.8,
                                                "top_k_audio": 250, "future_key": 1},
           "plugins": ["flip.py"], "arbiter": "none"}
    cmd = reproduce_command(CompareReport(request=req, reference="cpu", backends=()))
    assert cmd == ("xbackend compare --backends cpu,flip:bf16 --model /data/ckpt.safetensors --model-config "
                   "/data/config.json --prompt prompt_codes.npy --seed 1 --steps 50 --compile off --temp-text 0.6 --top-k-text 25 "
                   "--temp-audio 0.8 --top-k-audio 250 --repeats 2 --timeout 600.0 --alignment aligned "
                   "--sampler portable --arbiter none --codec torch:cpu --plugin flip.py")
