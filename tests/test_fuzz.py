"""Property-based fuzzing of everything that reads untrusted files: the trace loader, `diff`, `inspect`
and `report`. The only allowed outcomes are a clean result or xbackend's own error type; any other
exception (or a crash of the interpreter) fails the test. Bounded to well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from xbackend.analysis.diff import diff  # noqa: E402
from xbackend.errors import XBackendError  # noqa: E402
from xbackend.analysis.inspection import divergence, inspect_trace  # noqa: E402
from xbackend.report import write_report  # noqa: E402
from xbackend.testing.traces import synthetic_trace  # noqa: E402
from xbackend.store.trace import TraceWriter, load_trace  # noqa: E402

VOCAB = (7, 5, 5)
STEPS = 6
STREAMS = ["text", "audio0", "audio1"]
FILES = ("meta.json", "digests.txt", "tokens.bin", "margins.bin", "inputs.bin", "logits-text.bin", "logits-audio0.bin",
         "logits-audio1.bin")
COUNTS: dict[str, dict[str, int]] = {}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["object", "float32", "bfloat16", "../x", "/etc/passwd", "text", "audio0"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


def _count(target: str, outcome: str) -> None:
    COUNTS.setdefault(target, {}).setdefault(outcome, 0)
    COUNTS[target][outcome] += 1


def _attempt(target: str, fn) -> None:
    """Run `fn`; a clean result or an XBackendError pass, anything else propagates (fails the test)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except XBackendError:
            _count(target, "XBackendError")
            return
    _count(target, "ok")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeds")
    out = {"f32": root / "f32", "bf16": root / "bf16", "tok": root / "tok"}
    synthetic_trace(out["f32"], steps=STEPS, vocab=VOCAB, seed=1)
    synthetic_trace(out["bf16"], steps=STEPS, vocab=VOCAB, seed=1, logits_dtype="bfloat16")
    w = TraceWriter(out["tok"], {"source": "fuzz"}, STREAMS, list(VOCAB), 0, has_logits=False)
    for s in range(STEPS):
        w.write_step(None, [s % v for v in VOCAB], [float("nan")] * 3, np.zeros(0))
    w.close()
    for p in out.values():
        load_trace(p)  # the seeds themselves are valid
    return out


def _mutate(path: Path, data: st.DataObject) -> None:
    """One or more hostile edits: a meta.json field replaced, bytes flipped, files cut, removed or linked."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        kind = data.draw(st.sampled_from(["meta_field", "meta_drop", "meta_raw", "flip", "truncate", "append",
                                          "remove", "symlink", "digest_line"]), label="kind")
        name = data.draw(st.sampled_from(FILES), label="file")
        f = path / name
        if kind.startswith("meta") and (path / "meta.json").is_file() and not (path / "meta.json").is_symlink():
            try:
                meta = json.loads((path / "meta.json").read_text())
            except (ValueError, RecursionError):
                meta = None
            if kind == "meta_raw" or not isinstance(meta, dict):
                raw = data.draw(st.binary(max_size=40) | st.just(b"[" * 5000), label="raw")
                (path / "meta.json").write_bytes(raw)
                continue
            key = data.draw(st.sampled_from(sorted(meta) + ["has_logits", "failed_at", "settings"]), label="key")
            if kind == "meta_drop":
                meta.pop(key, None)
            else:
                meta[key] = data.draw(json_values, label="value")
            (path / "meta.json").write_text(json.dumps(meta))
        elif not f.is_file() or f.is_symlink():
            continue
        elif kind == "flip":
            raw = bytearray(f.read_bytes())
            if raw:
                i = data.draw(st.integers(0, len(raw) - 1), label="at")
                raw[i] ^= data.draw(st.integers(1, 255), label="mask")
                f.write_bytes(bytes(raw))
        elif kind == "truncate":
            raw = f.read_bytes()
            f.write_bytes(raw[: data.draw(st.integers(0, len(raw)), label="keep")])
        elif kind == "append":
            with open(f, "ab") as fh:
                fh.write(data.draw(st.binary(max_size=64), label="tail"))
        elif kind == "remove":
            f.unlink()
        elif kind == "symlink":
            secret = path.parent / "secret.bin"
            secret.write_bytes(b"\x00" * 4096)
            f.unlink()
            f.symlink_to(secret)
        elif kind == "digest_line":
            lines = (path / "digests.txt").read_bytes().split(b"\n") if (path / "digests.txt").is_file() else [b""]
            i = data.draw(st.integers(0, len(lines) - 1), label="line")
            lines[i] = data.draw(st.binary(max_size=40) | st.just(b"\xff\xfe" * 16), label="digest")
            (path / "digests.txt").write_bytes(b"\n".join(lines))


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


SCALE = float(os.environ.get("XBACKEND_FUZZ_SCALE", "1"))  # e.g. 10 for a long hunt outside the suite
FUZZ = settings(max_examples=int(1200 * SCALE), deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.data())
def test_fuzz_trace_loader(seeds, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    work = _copy(seeds[kind], tmp_path_factory.getbasetemp() / "fuzz-load" / "t")
    _mutate(work, data)

    def load():
        tr = load_trace(work)
        for s in tr.streams:  # a clean load must give readable arrays of the promised shapes
            assert tr.tokens.shape == (tr.steps, len(tr.streams))
            if tr.has_logits:
                assert tr.logits(s).shape == (tr.steps, tr.vocab[s])
    _attempt("load_trace", load)


@settings(max_examples=int(300 * SCALE), deadline=None, derandomize=SCALE == 1, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_diff_and_inspect(seeds, tmp_path_factory, data):
    base = tmp_path_factory.getbasetemp() / "fuzz-diff"
    kind = data.draw(st.sampled_from(["f32", "bf16"]), label="seed")
    a = _copy(seeds[kind], base / "a")
    b = _copy(seeds[kind], base / "b")
    _mutate(b, data)
    force = data.draw(st.booleans(), label="force")
    _attempt("diff", lambda: diff(a, b, force=force).to_dict(per_step=True))
    _attempt("inspect", lambda: inspect_trace(load_trace(b)).to_dict())
    _attempt("inspect --against", lambda: divergence(load_trace(a), load_trace(b), force=force))


def _run_dir(root: Path, seeds: dict[str, Path]) -> Path:
    """A small run directory as `compare` leaves it: two backends, native and portable runs, report.json."""
    run = root / "run"
    for label in ("a", "b"):
        for name in ("native-0", "portable"):
            shutil.copytree(seeds["f32"], run / "traces" / label / name)
    report = {
        "schema": "xbackend.report/1", "created": "2026-01-01T00:00:00+00:00", "command": "xbackend compare",
        "request": {"backends": ["a", "b"], "model": "tiny", "model_config": None, "model_digest": "x",
                    "prompt": {"source": "p.wav", "digest": "d"}, "seed": 1, "steps": STEPS, "repeats": 1,
                    "timeout": 60.0, "alignment": "aligned", "settings": {"temp_text": 0.7}, "plugins": []},
        "reference": "a", "reference_repeatability": None,
        "backends": [{"name": "a", "spec": "a", "status": "ok", "error": None, "env": {"os": "x"}},
                     {"name": "b", "spec": "b", "status": "failed", "error": "killed", "env": None}],
        "verdicts": [{"backend": "b", "vs": "a", "verdict": "BACKEND_FAILED", "first_divergence": {"step": 2, "stream": None},
                      "figures": {}, "secondary": [], "explanation": "b failed"},
                     {"backend": "b", "vs": "a", "verdict": "NUMERIC_DIVERGENCE",
                      "first_divergence": {"step": 3, "stream": "audio0"}, "figures": {"tolerance": 1e-4},
                      "secondary": [], "explanation": "x"}],
        "not_diagnosed": [], "repeatability": [], "drift": [],
        "failures": [{"run": "b/native-0", "status": "failed", "error": "killed", "failed_at": {"step": 2, "stream": None},
                      "steps": 2}],
        "traces": {"a": "traces/a", "b": "traces/b"},
    }
    (run / "report.json").write_text(json.dumps(report))
    return run


def _mutate_report(run: Path, data: st.DataObject) -> None:
    report = json.loads((run / "report.json").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from([(), ("request",), ("traces",), ("verdicts", 1), ("verdicts", 1, "first_divergence"),
                                           ("backends", 0), ("failures", 0), ("request", "settings")]), label="where")
        node = report
        for key in path:
            node = node.get(key) if isinstance(node, dict) else node[key] if isinstance(node, list) and key < len(node) else None
            if node is None:
                break
        if not isinstance(node, dict):
            continue
        key = data.draw(st.sampled_from(sorted(node) or ["x"]), label="key")
        if data.draw(st.booleans(), label="drop"):
            node.pop(key, None)
        else:
            node[key] = data.draw(json_values, label="value")
    (run / "report.json").write_text(json.dumps(report))


@settings(max_examples=int(120 * SCALE), deadline=None, derandomize=SCALE == 1, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_report(seeds, tmp_path_factory, data):
    root = tmp_path_factory.getbasetemp() / "fuzz-report"
    if root.exists():
        shutil.rmtree(root)
    run = _run_dir(root, seeds)
    if data.draw(st.booleans(), label="report.json"):
        _mutate_report(run, data)
    else:
        _mutate(run / "traces" / data.draw(st.sampled_from(["a", "b"])) / data.draw(st.sampled_from(["native-0", "portable"])),
                data)
    _attempt("report", lambda: write_report(run))


def test_fuzz_counts_reported(request):
    """Prints what the fuzzers ran (for the closing note); runs last in this module."""
    print("\nfuzz outcomes:", json.dumps(COUNTS, sort_keys=True))
    assert all(sum(c.values()) for c in COUNTS.values())
