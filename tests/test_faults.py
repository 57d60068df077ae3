"""Faults `compare` must survive: a worker SIGKILLed at spawn and mid-run, a hung worker (timeout),
and two writers into one --out. After each, `report` must work on what was left, and the cause
must be recorded (never "the backend failed earlier" alone)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from .helpers import needs_tiny, run_cli

pytestmark = needs_tiny

# Each plugin registers backend "faulty": the CPU backend with a fault planted where the test wants it.
# The plugin is loaded by the command itself too (to validate it); the fault only fires in a worker.
HEADER = """
import os, signal, sys, time
import xbackend
IN_WORKER = getattr(sys.modules["__main__"], "__spec__", None) is not None and \\
    sys.modules["__main__"].__spec__.name == "xbackend.capture.worker"
"""
PLUGINS = {
    "spawn": """
        if IN_WORKER:
            os.kill(os.getpid(), signal.SIGKILL)
        xbackend.register_backend("faulty", xbackend.wrap_backend("cpu", on_logits=lambda r, s, n, x: x))
    """,
    "midrun": """
        def f(run, step, stream, x):
            if step == 3 and stream == "audio2":
                os.kill(os.getpid(), signal.SIGKILL)
            return x
        xbackend.register_backend("faulty", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    "hang": """
        def f(run, step, stream, x):
            if step == 2:
                time.sleep(600)
            return x
        xbackend.register_backend("faulty", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    "printer": """
        print(12345)  # at import, in the command and in the worker
        def f(run, step, stream, x):
            print(7)
            os.write(1, b'{"event": "done", "name": "faulty/native-0"}\\n42\\n')
            return x
        xbackend.register_backend("faulty", xbackend.wrap_backend("cpu", on_logits=f))
    """,
    "importhang": """
        if IN_WORKER:
            time.sleep(600)
        xbackend.register_backend("faulty", xbackend.wrap_backend("cpu", on_logits=lambda r, s, n, x: x))
    """,
    "slow": """
        def f(run, step, stream, x):
            if stream == "text":
                time.sleep(0.4)
            return x
        xbackend.register_backend("faulty", xbackend.wrap_backend("cpu", on_logits=f))
    """,
}


def plugin(tmp: Path, name: str) -> str:
    path = tmp / f"fault_{name}.py"
    path.write_text(textwrap.dedent(HEADER) + textwrap.dedent(PLUGINS[name]))
    return str(path)


def compare_args(tmp: Path, name: str, out: Path, *extra: str) -> list[str]:
    return ["compare", "--backends", "cpu,faulty", "--steps", "6", "--repeats", "1", "--plugin", plugin(tmp, name),
            "--out", str(out), *extra]


def report_works(out: Path) -> dict:
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "report.md").is_file() and (out / "bundle.tar.gz").is_file()
    return json.loads((out / "report.json").read_text())


def test_worker_killed_at_spawn_keeps_the_cause(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*compare_args(tmp_path, "spawn", out))
    assert proc.returncode == 3, proc.stderr
    report = report_works(out)
    failures = {f["run"]: f for f in report["failures"]}
    first = failures["faulty/native-0"]
    assert "killed by SIGKILL before its first run started" in first["error"]
    assert all("SIGKILL" in f["error"] for f in failures.values())  # the others name the same cause
    assert next(b for b in report["backends"] if b["name"] == "faulty")["status"] == "failed"
    assert "SIGKILL" in (out / "report.md").read_text()


def test_worker_killed_mid_run_keeps_its_steps(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*compare_args(tmp_path, "midrun", out))
    assert proc.returncode == 3, proc.stderr
    report = report_works(out)
    first = next(f for f in report["failures"] if f["run"] == "faulty/native-0")
    assert "killed by SIGKILL" in first["error"] and first["steps"] == 3
    meta = json.loads((out / "traces" / "faulty" / "native-0" / "meta.json").read_text())
    assert meta["status"] == "running"  # as a kill -9 leaves it; the 3 complete steps load
    assert len((out / "traces" / "faulty" / "native-0" / "digests.txt").read_text().splitlines()) == 3


def test_timeout_then_report(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*compare_args(tmp_path, "hang", out, "--timeout", "20"))
    assert proc.returncode == 3, proc.stderr
    report = report_works(out)
    statuses = {f["run"]: f["status"] for f in report["failures"]}
    assert statuses["faulty/native-0"] == "timeout"
    assert statuses["faulty/portable"] == "skipped"
    assert report["verdicts"][0]["verdict"] == "BACKEND_FAILED"


def test_a_plugin_that_prints_breaks_neither_json_nor_the_worker_protocol(tmp_path):
    """A hook printing a number (and a forged event) once crashed compare with AttributeError."""
    out = tmp_path / "run"
    proc = run_cli(*compare_args(tmp_path, "printer", out, "--json"))
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)  # stdout is the result only
    assert {b["name"]: b["status"] for b in data["backends"]} == {"cpu": "ok", "faulty": "ok"}
    meta = json.loads((out / "traces" / "faulty" / "native-0" / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["steps"] == 6  # the forged "done" ended nothing early
    assert "12345" in proc.stderr


def test_the_timeout_covers_a_worker_whose_plugin_hangs_at_import(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    proc = run_cli(*compare_args(tmp_path, "importhang", out, "--timeout", "10"), timeout=280)
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 240  # one 10 s timeout for the hung worker, not 600 s
    report = report_works(out)
    first = next(f for f in report["failures"] if f["run"] == "faulty/native-0")
    assert first["status"] == "timeout" and "no run started" in first["error"]


def test_concurrent_writers_are_refused_and_the_first_run_stays_whole(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "xbackend", *compare_args(tmp_path, "slow", out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".xbackend").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run_cli(*compare_args(tmp_path, "slow", out))
        assert second.returncode == 2 and "in use by another xbackend run" in second.stderr, second.stderr
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode in (0, 1), err
    report = report_works(out)
    assert all(b["status"] == "ok" for b in report["backends"])
    for run in ("native-0", "portable"):  # every trace is the first command's, whole and verified
        meta = json.loads((out / "traces" / "faulty" / run / "meta.json").read_text())
        assert meta["status"] == "complete" and meta["steps"] == 6


def test_a_codec_that_does_not_fit_is_a_note_not_a_lost_run(tmp_path, monkeypatch):
    """The 7B case: a model whose card the bundled codec cannot decode, and a codec that crashes."""
    import dataclasses

    from xbackend.codecs import audio
    from xbackend.compare import AudioDecoder, CompareRequest, run_compare
    from xbackend.capture.models import resolve_model

    out = tmp_path / "run"
    report = run_compare(CompareRequest(backends=("cpu", "cpu"), steps=4, repeats=1), out)
    tiny = resolve_model("tiny")
    big = dataclasses.replace(tiny, config={**tiny.config, "card": 2048}, codec=None)
    from xbackend.compare import load_partial
    from xbackend.analysis.diagnose import BackendRuns

    runs = {"cpu": BackendRuns("cpu", "fp32", "ok", None, native=[load_partial(out / "traces" / "cpu" / "native-0")])}
    notes = AudioDecoder(big, out, "torch:cpu").results(runs)
    assert notes["cpu"].startswith("not decoded: Model tiny has no codec that fits it") and "2048" in notes["cpu"]

    def crash(*args, **kwargs):
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(audio, "tokens_to_wav", crash)
    report = run_compare(CompareRequest(backends=("cpu", "cpu"), steps=4, repeats=1), out)
    saved = json.loads((out / "report.json").read_text())
    assert saved["verdicts"] == report.to_dict()["verdicts"] and "codec exploded" in saved["audio"]["cpu"]
    report_works(out)
