"""What a Rust Moshi app logged: import (three formats), replay, sessions, and token traces in
diff, inspect and forced:. The logs are written from a real xbackend candle run in exactly the
layout moshi-core / moshi-backend write (tests/rust_layout.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import xbackend
from xbackend.errors import XBackendError
from xbackend.capture.models import resolve_model
from xbackend.capture.prompt import DEFAULT_PROMPT, load_prompt
from xbackend.rust.replay import ReplayRequest, replay
from xbackend.rust.logs import read_run, read_session, write_token_trace
from xbackend.samplers import RUST_CLI_SETTINGS

from .helpers import assert_clean_error, needs_tiny, run_cli
from .rust_layout import rust_config, write_session, write_token_lines, write_verbose_log

pytestmark = needs_tiny
STEPS = 16
SEED = 299792458


@pytest.fixture(scope="module")
def app_run(tmp_path_factory):
    """A cpu run with candle's sampler (the Rust CLI's settings): what the 'Rust app' produced."""
    root = tmp_path_factory.mktemp("app")
    req = xbackend.CaptureRequest(backend="cpu", sampler="candle", steps=STEPS, settings=RUST_CLI_SETTINGS, seed=SEED)
    trace = xbackend.capture(req, root / "capture")
    model = resolve_model("tiny")
    user = load_prompt(None, model, STEPS).codes[:, :STEPS].T.astype(np.int64)
    cfg = rust_config(model, acoustic_delay=int(model.delays[2]))
    return {"root": root, "tokens": np.asarray(trace.tokens, dtype=np.int64), "user": user, "cfg": cfg, "model": model}


def _write(fmt: str, run: dict, path, tokens=None):
    tokens = run["tokens"] if tokens is None else tokens
    if fmt == "session":
        return write_session(path / "moshi-1764144000-123456.json", tokens, run["user"], run["cfg"], SEED,
                             RUST_CLI_SETTINGS, transcript="hello")
    if fmt == "verbose":
        return write_verbose_log(path / "verbose.log", tokens, run["user"], run["cfg"], 320, 256)
    return write_token_lines(path / "lines.log", tokens, run["cfg"])


def _import(fmt: str, src, out):
    options = {"acoustic_delay": 1, "text_vocab": 320, "audio_vocab": 256} if fmt == "lines" else {}
    return write_token_trace(read_run(src, **options), out)


@pytest.mark.parametrize("fmt", ["session", "verbose", "lines"])
def test_import_gives_the_apps_tokens_per_sampling_step(app_run, tmp_path, fmt):
    trace = _import(fmt, _write(fmt, app_run, tmp_path), tmp_path / "imported")
    assert not trace.has_logits and not list(tmp_path.joinpath("imported").glob("logits-*"))
    known = trace.tokens >= 0
    assert np.array_equal(trace.tokens[known], app_run["tokens"][known])
    # unknown: session rows hold codebooks >= 1 sampled before the delay only as overwritten; MIMI_VERBOSE prints
    # the last text token nowhere; a frame log holds audio0 of the last `delay` steps in frames it never wrote
    expected_unknown = {"session": 7, "verbose": 1, "lines": 8}[fmt]
    assert int((~known).sum()) == expected_unknown
    assert trace.meta["sampler"]["mode"] == "candle" and trace.meta["seed"] == SEED
    assert trace.meta["settings"] == RUST_CLI_SETTINGS.__dict__
    if fmt != "lines":
        assert np.array_equal(np.asarray(trace.inputs)[:STEPS - 2], app_run["user"][:STEPS - 2])


def _plant(fmt: str, run: dict, step: int, col: int) -> np.ndarray:
    tokens = run["tokens"].copy()
    vocab = 320 if col == 0 else 256
    tokens[step, col] = (tokens[step, col] + 1) % vocab
    return tokens


@pytest.mark.parametrize("fmt,step,stream", [
    ("session", 9, "audio3"), ("session", 6, "text"), ("verbose", 7, "audio0"), ("lines", 10, "audio5"),
])
def test_replay_is_consistent_and_finds_a_planted_token(app_run, tmp_path, fmt, step, stream):
    model = app_run["model"]
    prompt = None if fmt != "lines" else str(DEFAULT_PROMPT)  # a token-line log has no user codes
    (tmp_path / "clean").mkdir()
    clean = _import(fmt, _write(fmt, app_run, tmp_path / "clean"), tmp_path / "clean-trace")
    result = replay(ReplayRequest(trace=str(clean.path), backend="cpu", prompt=prompt), tmp_path / "replay-clean")
    assert result["verdict"] == "CONSISTENT" and result["first_inconsistency"] is None
    assert result["consistent_through"] == STEPS - 1 and result["decisions_checked"] > 8 * STEPS
    col = model.streams.index(stream)
    (tmp_path / "planted").mkdir()
    src = _write(fmt, app_run, tmp_path / "planted", tokens=_plant(fmt, app_run, step, col))
    planted = _import(fmt, src, tmp_path / "planted-trace")
    result = replay(ReplayRequest(trace=str(planted.path), backend="cpu", prompt=prompt), tmp_path / "replay-planted")
    first = result["first_inconsistency"]
    assert (first["step"], first["stream"]) == (step, stream)
    assert result["consistent_through"] == step - 1
    assert first["app_token"] == _plant(fmt, app_run, step, col)[step, col]
    assert first["candle_token"] == app_run["tokens"][step, col]
    assert result["verdict"] in ("LOGITS_DIFFER", "WITHIN_ROUNDING")
    assert (tmp_path / "replay-planted" / "report.md").read_text().count(f"step {step}, {stream}") >= 1


def test_replay_cli_json_and_exit_codes(app_run, tmp_path):
    src = _write("session", app_run, tmp_path)
    proc = run_cli("import", str(src), "--out", str(tmp_path / "t"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == STEPS
    proc = run_cli("replay", str(tmp_path / "t"), "--backend", "mlx:cpu", "--out", str(tmp_path / "r"), "--json",
                   "--json-out", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["first_inconsistency"] is None and data["consistent_through"] == STEPS - 1
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "CONSISTENT"


def test_a_session_with_moshi_clis_delay_2_replays_on_a_delay_1_model(app_run, tmp_path):
    """The rows written as moshi-core does with acoustic_delay 2 (Config::v0_1): the model (delay 1) reads
    the audio1.. tokens of step 1, which such a session never holds; replay fills them with candle's pick."""
    cfg = dict(app_run["cfg"], acoustic_delay=2)
    src = write_session(tmp_path / "s.json", app_run["tokens"], app_run["user"], cfg, SEED, RUST_CLI_SETTINGS)
    trace = write_token_trace(read_session(src), tmp_path / "t")
    assert int((trace.tokens < 0).sum()) == 14  # audio1..7 of steps 0 and 1
    result = replay(ReplayRequest(trace=str(trace.path), backend="cpu"), tmp_path / "r")
    assert result["verdict"] == "CONSISTENT" and result["consistent_through"] == STEPS - 1
    assert any("acoustic delays differ" in n for n in result["notes"])
    planted = _plant("session", app_run, 8, 5)  # audio4 of step 8: session row 6
    src = write_session(tmp_path / "p.json", planted, app_run["user"], cfg, SEED, RUST_CLI_SETTINGS)
    trace = write_token_trace(read_session(src), tmp_path / "pt")
    result = replay(ReplayRequest(trace=str(trace.path), backend="cpu"), tmp_path / "pr")
    first = result["first_inconsistency"]
    assert (first["step"], first["stream"]) == (8, "audio4")
    assert first["context_filled"]["step"] == 1  # what it rests on: the filled tokens of step 1


def test_token_traces_in_diff_inspect_and_forced(app_run, tmp_path):
    a = _import("session", _write("session", app_run, tmp_path), tmp_path / "a")
    (tmp_path / "p").mkdir()
    b = _import("session", _write("session", app_run, tmp_path / "p", tokens=_plant("session", app_run, 5, 4)),
                tmp_path / "b")
    proc = run_cli("diff", str(a.path), str(b.path), "--json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["first_divergence"]["step"] == 5 and data["first_divergence"]["stream"] == "audio3"
    assert data["logits_compared"] is False and data["logits_identical"] is False
    assert run_cli("diff", str(a.path), str(a.path)).returncode == 0
    proc = run_cli("inspect", str(a.path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["streams"]["text"]["entropy_mean"] is None
    assert info["text_padding"]["ratio"] == pytest.approx(float(np.mean(app_run["tokens"][:, 0] == 3)))
    assert run_cli("inspect", str(a.path), "--against", str(b.path)).returncode == 0
    forced = xbackend.capture(xbackend.CaptureRequest(backend="cpu", sampler=f"forced:{a.path}", steps=STEPS,
                                                      settings=RUST_CLI_SETTINGS), tmp_path / "forced")
    known = a.tokens >= 0
    assert np.array_equal(forced.tokens[known], a.tokens[known])


def test_sessions_survey(app_run, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(3):
        write_session(logs / f"moshi-17641440{i}0-1.json", app_run["tokens"], app_run["user"], app_run["cfg"], SEED,
                      RUST_CLI_SETTINGS, transcript="hello")
    write_session(logs / "moshi-1764144090-1.json", _plant("session", app_run, 11, 0), app_run["user"], app_run["cfg"],
                  7, RUST_CLI_SETTINGS, transcript="garbage")
    proc = run_cli("sessions", str(logs), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["sessions"] == 4 and data["distinct_sequences"] == 2
    assert data["groups"][0]["count"] == 3
    assert data["groups"][1]["first_parting_from_group_0"] == {"step": 11, "stream": "text"}
    assert data["shared_seeds"][0]["sessions"] == [f"moshi-17641440{i}0-1.json" for i in range(3)]
    assert {r["transcript"] for r in data["runs"]} == {"hello", "garbage"}
    (logs / "moshi-9-9.json").write_text("{not json")
    proc = run_cli("sessions", str(logs))
    assert_clean_error(proc, 2, "1 of 5 files", "moshi-9-9.json")
    assert "4 sessions, 2 distinct token sequences" in proc.stdout


def test_bad_and_partial_logs_are_one_line_exit_2(app_run, tmp_path):
    src = _write("session", app_run, tmp_path)
    data = json.loads(src.read_text())
    cases = []
    for name, mutate in [("nojson", lambda d: "{"), ("noseed", lambda d: {k: v for k, v in d.items() if k != "text_seed"}),
                         ("badtemp", lambda d: dict(d, text_temperature=-1)),
                         ("longer", lambda d: dict(d, last_step_idx=STEPS + 5)),
                         ("partialcfg", lambda d: {k: v for k, v in d.items() if k != "acoustic_delay"})]:
        path = tmp_path / f"{name}.json"
        out = mutate(dict(data))
        path.write_text(out if isinstance(out, str) else json.dumps(out))
        os.link(src.with_suffix(".safetensors"), path.with_suffix(".safetensors"))
        cases.append((path, {"nojson": "not valid JSON", "noseed": "text_seed missing", "badtemp": "text_temperature",
                             "longer": "expected [21]", "partialcfg": "lm_config is partial"}[name]))
    (tmp_path / "alone.json").write_text(json.dumps(data))
    cases.append((tmp_path / "alone.json", ".safetensors"))
    os.symlink(src, tmp_path / "link.json")
    cases.append((tmp_path / "link.json", "symbolic link"))
    for path, needle in cases:
        assert_clean_error(run_cli("import", str(path), "--out", str(tmp_path / "x")), 2, needle)
    verbose = _write("verbose", app_run, tmp_path)
    lines = verbose.read_text().splitlines()
    cut = max(i for i, line in enumerate(lines) if line.startswith("sampled ") and " logits 3:" in line)
    verbose.write_text("\n".join(lines[:cut]) + "\n")  # the log stops inside the last step
    assert_clean_error(run_cli("import", str(verbose), "--out", str(tmp_path / "v")), 2, "incomplete", "--allow-partial")
    proc = run_cli("import", str(verbose), "--out", str(tmp_path / "v"), "--allow-partial", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["steps"] == STEPS - 1
    tl = _write("lines", app_run, tmp_path)
    text = tl.read_text().replace("Step 4 text token", "Step 4 txt token")
    tl.write_text(text)
    assert_clean_error(run_cli("import", str(tl), "--out", str(tmp_path / "l")), 2, "miss step 4")
    assert_clean_error(run_cli("import", str(tl), "--text-pattern", "Step (\\d+", "--out", str(tmp_path / "l")), 2,
                       "not a valid regular expression")
    assert_clean_error(run_cli("import", str(tl), "--text-pattern", "Step (\\d+)", "--out", str(tmp_path / "l")), 2,
                       "no named group")
    assert_clean_error(run_cli("import", str(src), "--seed", "3", "--out", str(tmp_path / "x")), 2, "its own settings")
    assert_clean_error(run_cli("replay", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")), 2, "no such directory")


def test_session_layout_round_trip_is_exact(app_run):
    from xbackend.rust.logs import session_to_steps
    from xbackend.testing.rust import steps_to_session

    text, audio = steps_to_session(app_run["tokens"], app_run["user"], app_run["cfg"])
    assert (audio[-1, 1:8] == -1).all() and (audio[:, 0] >= 0).all()  # the last row's delayed codebooks: UNGENERATED
    tokens, user = session_to_steps(text, audio, app_run["cfg"])
    known = tokens >= 0
    assert np.array_equal(tokens[known], app_run["tokens"][known]) and np.array_equal(user, app_run["user"])
    with pytest.raises(XBackendError):
        read_run(app_run["root"] / "nothing.json")


def test_replay_of_a_candle_capture_on_another_backend(app_run, tmp_path):
    """A capture made with --sampler candle replays on mlx:cpu from its own prompt, and is consistent."""
    pytest.importorskip("moshi_mlx")
    result = replay(ReplayRequest(trace=str(app_run["root"] / "capture"), backend="mlx:cpu", steps=8), tmp_path / "r")
    assert result["verdict"] == "CONSISTENT" and result["consistent_through"] == 7
    assert result["user_codes"].startswith("--prompt") and result["decisions_checked"] == 8 * 9


def test_token_lines_in_the_sampled_layout_are_detected(app_run, tmp_path):
    from .rust_layout import write_sampled_lines

    src = write_sampled_lines(tmp_path / "app.log", _plant("lines", app_run, 1, 4))
    run = read_run(src, text_vocab=320, audio_vocab=256)  # acoustic delay left at moshi-cli's 2
    assert any("sampled (detected" in n for n in run.notes)
    trace = write_token_trace(run, tmp_path / "t")
    assert int((trace.tokens < 0).sum()) == 0
    result = replay(ReplayRequest(trace=str(trace.path), backend="cpu", prompt=str(DEFAULT_PROMPT)), tmp_path / "r")
    assert (result["first_inconsistency"]["step"], result["first_inconsistency"]["stream"]) == (1, "audio3")
