"""Property-based fuzzing of the readers round 3 hardened (issue #24): the codec report, import
(sessions and token-line logs), replay's reading of a candle trace, `sessions`, baselines and
extracted bundles. As in test_fuzz: the only allowed outcomes are a clean result or xbackend's own
error type, and nothing outside the fuzzed directory is written (a file there keeps its content)."""

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

from xbackend.errors import XBackendError  # noqa: E402
from xbackend.testing.traces import default_meta, synthetic_trace  # noqa: E402

from .helpers import needs_tiny  # noqa: E402

pytestmark = needs_tiny
ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("XBACKEND_FUZZ_SCALE", "1"))
COUNTS: dict[str, dict[str, int]] = {}


def fuzz(n: int):
    return settings(max_examples=int(n * SCALE), deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=list(HealthCheck))


hostile = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["/etc/passwd", "../x", "hf://a/b", "\x1b[2J", "[/]", "\udcff", "1e999"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _attempt(target: str, fn) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
            outcome = "ok"
        except XBackendError:
            outcome = "XBackendError"
    COUNTS.setdefault(target, {}).setdefault(outcome, 0)
    COUNTS[target][outcome] += 1


def _mutate_json(value, data: st.DataObject):
    """One to three edits anywhere in a JSON value: a node replaced, a key dropped, or raw bytes instead."""
    if data.draw(st.integers(0, 9), label="raw?") == 0:
        return data.draw(st.sampled_from([b"", b"[" * 5000, b"\xff\xfe", b"{\"a\": 1e999}", b"9" * 500]), label="raw")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        node, parent, key = value, None, None
        for _ in range(data.draw(st.integers(0, 4), label="depth")):
            if isinstance(node, dict) and node:
                k = data.draw(st.sampled_from(sorted(node, key=str)), label="key")
            elif isinstance(node, list) and node:
                k = data.draw(st.integers(0, len(node) - 1), label="index")
            else:
                break
            parent, key, node = node, k, node[k]
        if parent is None:
            continue
        if isinstance(parent, dict) and data.draw(st.booleans(), label="drop"):
            parent.pop(key)
        else:
            parent[key] = data.draw(hostile, label="value")
    return value


def _write(path: Path, value) -> None:
    path.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode("utf-8", "surrogatepass"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Seeds every fuzzer copies: a codec run, a moshi-backend session, a candle trace, a baseline, a bundle."""
    from xbackend.capture.models import resolve_model
    from xbackend.samplers import RUST_CLI_SETTINGS

    from .rust_layout import rust_config, write_session

    root = tmp_path_factory.mktemp("readers")
    secret = root / "outside.txt"
    secret.write_bytes(b"outside")
    codec = root / "codec"  # the report.json of a real `xbackend codec --codecs torch,torch --codec tiny` run
    (codec / "codecs" / "torch").mkdir(parents=True)
    np.save(codec / "codecs" / "torch" / "codes.npy", np.zeros((8, 3), dtype=np.int64))
    shutil.copy(Path(__file__).with_name("codec_report_seed.json"), codec / "report.json")
    model = resolve_model("tiny")
    cfg = rust_config(model, acoustic_delay=int(model.delays[2]))
    steps = 4
    tokens = np.zeros((steps, 1 + model.dep_q), dtype=np.int64)
    user = np.zeros((steps, model.n_user), dtype=np.int64)
    sessions = root / "sessions"
    sessions.mkdir()
    for i in range(2):
        write_session(sessions / f"moshi-1-{i}.json", tokens, user, cfg, 7 + i, RUST_CLI_SETTINGS, transcript="hi")
    meta = default_meta(mode="candle")
    candle = synthetic_trace(root / "candle", steps=4, vocab=(7, 5), seed=1, meta=meta).path
    m = json.loads((candle / "meta.json").read_text())
    m["sampler"].update(text_seed=1, audio_seed=2, pad_mult=1.5, pad_token=3, repetition_penalty=[4, 1.1])
    (candle / "meta.json").write_text(json.dumps(m))
    baseline = Path(shutil.copytree(ROOT / "reference" / "baselines" / "tiny-cpu-mlx", root / "baseline"))
    bundle = root / "bundle"
    for label in ("cpu", "other"):
        synthetic_trace(bundle / "traces" / label / "native-0.steps0-4", steps=4, vocab=(7, 5), seed=1)
    (bundle / "report.json").write_text(json.dumps({
        "schema": "xbackend.report/1", "reference": "cpu",
        "request": {"backends": ["cpu", "other"], "model": "tiny", "seed": 1, "steps": 4, "repeats": 1,
                    "alignment": "aligned", "settings": {}, "plugins": []},
        "backends": [{"name": "cpu", "status": "ok", "error": None, "env": None},
                     {"name": "other", "status": "ok", "error": None, "env": None}],
        "verdicts": [{"backend": "other", "vs": "cpu", "verdict": "NUMERIC_DIVERGENCE", "explanation": "x",
                      "first_divergence": {"step": 1, "stream": "text"}, "figures": {"tolerance": 1e-3}}],
        "drift": [], "failures": [], "traces": {"cpu": "traces/cpu", "other": "traces/other"}}))
    (bundle / "report.md").write_text("# page\n")
    return {"root": root, "secret": secret, "codec": codec, "sessions": sessions, "candle": candle,
            "baseline": baseline, "bundle": bundle}


def _copy(src: Path, root: Path, name: str) -> Path:
    dst = root / "work" / name
    if dst.exists():
        shutil.rmtree(dst)
    return Path(shutil.copytree(src, dst, symlinks=True))


def _outside_kept(world) -> None:
    assert world["secret"].read_bytes() == b"outside"


def _link_something(work: Path, world, data: st.DataObject) -> None:
    """Sometimes plant a link to the outside file, or a hard link to it, somewhere in the copy."""
    choice = data.draw(st.sampled_from(["none", "none", "symlink", "hardlink"]), label="plant")
    if choice == "none":
        return
    files = sorted(p for p in work.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        return
    f = data.draw(st.sampled_from(files), label="planted at")
    f.unlink()
    if choice == "symlink":
        f.symlink_to(world["secret"])
    else:
        os.link(world["secret"], f)


@fuzz(80)
@given(data=st.data())
def test_fuzz_codec_report(world, data):
    from xbackend.codecs.report import write_codec_report

    run = _copy(world["codec"], world["root"], "codec")
    _write(run / "report.json", _mutate_json(json.loads((run / "report.json").read_text()), data))
    _link_something(run, world, data)
    _attempt("codec report", lambda: write_codec_report(run))
    _outside_kept(world)


@fuzz(120)
@given(data=st.data())
def test_fuzz_import_session(world, data):
    from xbackend.rust.logs import read_run, write_token_trace

    logs = _copy(world["sessions"], world["root"], "sessions")
    src = logs / "moshi-1-0.json"
    _write(src, _mutate_json(json.loads(src.read_text()), data))
    out = world["root"] / "work" / "imported"
    shutil.rmtree(out, ignore_errors=True)
    _attempt("import session", lambda: write_token_trace(read_run(src), out))
    _outside_kept(world)


@fuzz(120)
@given(lines=st.lists(st.sampled_from(["Step {s} text token: {t}", "Step {s} audio tokens: [{t}, {t}]",
                                      "noise {t}", "Step {s} text token: {t}{t}"]), min_size=1, max_size=8),
       numbers=st.lists(st.sampled_from(["0", "1", "-1", "7", "99999", "1000000000000", "9" * 40, "x", "1e3", ""]),
                        min_size=16, max_size=16))
def test_fuzz_import_lines(world, lines, numbers):
    from xbackend.rust.logs import read_run, write_token_trace

    log = world["root"] / "work" / "app.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("\n".join(line.format(s=numbers[i % 16], t=numbers[(i + 5) % 16]) for i, line in enumerate(lines)))
    out = world["root"] / "work" / "lines"
    shutil.rmtree(out, ignore_errors=True)
    _attempt("import lines", lambda: write_token_trace(read_run(log, "lines"), out))


@fuzz(80)
@given(data=st.data())
def test_fuzz_replay_reads_a_candle_trace(world, data):
    from xbackend.rust.replay import ReplayRequest, replay

    t = _copy(world["candle"], world["root"], "candle")
    _write(t / "meta.json", _mutate_json(json.loads((t / "meta.json").read_text()), data))
    out = world["root"] / "work" / "replayed"
    shutil.rmtree(out, ignore_errors=True)
    _attempt("replay", lambda: replay(ReplayRequest(trace=str(t), backend="cpu"), out))
    _outside_kept(world)


@fuzz(80)
@given(data=st.data())
def test_fuzz_sessions(world, data):
    from xbackend.rust.sessions import survey

    logs = _copy(world["sessions"], world["root"], "sessions")
    f = logs / data.draw(st.sampled_from(["moshi-1-0.json", "moshi-1-1.json"]), label="file")
    _write(f, _mutate_json(json.loads(f.read_text()), data))
    _link_something(logs, world, data)
    _attempt("sessions", lambda: json.dumps(survey(logs)))
    _outside_kept(world)


@fuzz(100)
@given(data=st.data())
def test_fuzz_baseline(world, data):
    from xbackend.check import load_baseline, request_from_baseline

    base = _copy(world["baseline"], world["root"], "baseline")
    _write(base / "baseline.json", _mutate_json(json.loads((base / "baseline.json").read_text()), data))
    _link_something(base, world, data)

    def read():
        b = load_baseline(base)
        request_from_baseline(b, base, model=None, seed=None, steps=None, plugins=(), timeout=60.0)

    _attempt("baseline", read)
    _outside_kept(world)


@fuzz(60)
@given(data=st.data())
def test_fuzz_extracted_bundle(world, data):
    from xbackend.report import write_report

    run = _copy(world["bundle"], world["root"], "bundle")
    _write(run / "report.json", _mutate_json(json.loads((run / "report.json").read_text()), data))
    _link_something(run, world, data)
    page = (run / "report.md").read_bytes() if (run / "report.md").is_file() else None
    _attempt("bundle report", lambda: write_report(run))
    if (run / "report.md").is_file() and not (run / "report.md").is_symlink():
        assert (run / "report.md").read_bytes() == page  # never degraded: refused, page kept
    _outside_kept(world)


def test_fuzz_readers_counts_reported():
    print("\nfuzz outcomes:", json.dumps(COUNTS, sort_keys=True))
    assert all(sum(c.values()) for c in COUNTS.values())
