"""Hardening round 3 (issue #24): every reader and writer, through the real CLI.

Each case plants hostile files in a tmp directory, most of them pointing (by a symbolic link, a hard
link or a path in a JSON field) at files OUTSIDE the directory the command is given. The command
must answer with one `error:` line and exit 2, and every file outside, and every file that was there
before, must keep its content and mtime (nothing read into a bundle, written, or deleted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xbackend.testing.traces import default_meta, synthetic_trace

from .helpers import assert_clean_error, needs_tiny, run_cli

pytestmark = needs_tiny
ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "reference" / "baselines" / "tiny-cpu-mlx"
SECRET = b"outside: must be neither read into a bundle nor written\n"


# --------------------------------------------------------------------------- building blocks


def _outside(tmp: Path) -> Path:
    out = tmp / "outside"
    (out / "dir").mkdir(parents=True, exist_ok=True)
    (out / "secret.txt").write_bytes(SECRET)
    (out / "dir" / "keep.npy").write_bytes(SECRET)
    return out


def _trace(path: Path, **meta) -> Path:
    t = synthetic_trace(path, steps=4, vocab=(7, 5), seed=1, meta=default_meta(**meta) if meta else None).path
    return t


def _edit(file: Path, fn) -> None:
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data))


def _run_dir(tmp: Path, name: str = "run") -> Path:
    run = tmp / name
    for label in ("cpu", "other"):
        for r in ("native-0", "portable", "forced"):
            _trace(run / "traces" / label / r)
    report = {"schema": "xbackend.report/1", "reference": "cpu",
              "request": {"backends": ["cpu", "other"], "model": "tiny", "seed": 1, "steps": 4, "repeats": 1,
                          "alignment": "aligned", "settings": {}, "plugins": []},
              "backends": [{"name": "cpu", "status": "ok", "error": None, "env": None},
                           {"name": "other", "status": "ok", "error": None, "env": None}],
              "verdicts": [{"backend": "other", "vs": "cpu", "verdict": "NUMERIC_DIVERGENCE", "explanation": "x",
                            "first_divergence": {"step": 1, "stream": "text"},
                            "figures": {"tolerance": 1e-3, "forced_max_abs": 0.5}}],
              "drift": [], "failures": [], "traces": {"cpu": "traces/cpu", "other": "traces/other"}}
    (run / "report.json").write_text(json.dumps(report))
    return run


def _codec_run(tmp: Path) -> Path:
    run = tmp / "codecrun"
    (run / "codecs" / "torch").mkdir(parents=True)
    (run / "codecs" / "mlx").mkdir(parents=True)
    report = {"schema": "xbackend.codec/1", "reference": "torch",
              "codecs": [{"name": "torch", "status": "ok"}, {"name": "mlx", "status": "ok"}],
              "verdicts": [{"codec": "mlx", "verdict": "IDENTICAL", "figures": {}}]}
    (run / "report.json").write_text(json.dumps(report))
    return run


def _baseline(tmp: Path) -> Path:
    return Path(shutil.copytree(BASELINE, tmp / "baseline"))


def _link(at: Path, to: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    if at.is_dir() and not at.is_symlink():
        shutil.rmtree(at)
    elif at.exists() or at.is_symlink():
        at.unlink()
    at.symlink_to(to)


def _hardlink(at: Path, to: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    if at.exists():
        at.unlink()
    os.link(to, at)


def _plugin(tmp: Path, body: str) -> str:
    path = tmp / "plugin_x.py"
    path.write_text("import os, sys, time\nimport xbackend\n" + textwrap.dedent(body))
    return str(path)


DEEP = "[" * 200_000 + "]" * 200_000


# --------------------------------------------------------------------------- security: writes through links


def _codec_run_linking(tmp: Path, outside: Path, rel: str):
    run = _codec_run(tmp)
    _link(run / rel, outside / "secret.txt")
    return ["report", str(run)], "symbolic link"


def case_report_codec_md_link(tmp, outside):
    return _codec_run_linking(tmp, outside, "report.md")


def case_report_codec_bundle_link(tmp, outside):
    return _codec_run_linking(tmp, outside, "bundle.tar.gz")


def case_report_codec_plot_link(tmp, outside):
    return _codec_run_linking(tmp, outside, "plots/codec-mlx.png")


def case_report_plots_dir_link(tmp, outside):
    run = _run_dir(tmp)
    _link(run / "plots", outside / "dir")
    return ["report", str(run)], "symbolic link"


def case_replay_out_report_link(tmp, outside):
    out = tmp / "replayed"
    out.mkdir()
    (out / "replay.json").write_text(json.dumps({"schema": "xbackend.replay/1"}))
    _link(out / "report.md", outside / "secret.txt")
    return ["replay", str(_candle_trace(tmp)), "--out", str(out)], "symbolic link"


def case_codec_out_codecs_dir_link(tmp, outside):
    out = tmp / "codec"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"schema": "xbackend.codec/1"}))
    _link(out / "codecs" / "torch", outside / "dir")
    return ["codec", "--codecs", "torch", "--out", str(out)], "symbolic link"


def _bundle_as_out(tmp: Path, linked: str, outside: Path) -> list[str]:
    out = _run_dir(tmp, "extracted")
    _link(out / linked, outside / "dir")
    return ["compare", "--backends", "cpu,cpu", "--steps", "2", "--repeats", "1", "--out", str(out)]


def case_compare_out_plots_link(tmp, outside):
    return _bundle_as_out(tmp, "plots", outside), "symbolic link"


def case_compare_out_audio_link(tmp, outside):
    return _bundle_as_out(tmp, "audio", outside), "symbolic link"


def case_compare_out_jobs_link(tmp, outside):
    return _bundle_as_out(tmp, "jobs", outside), "symbolic link"


def case_compare_out_traces_cpu_link(tmp, outside):
    return _bundle_as_out(tmp, "traces/cpu", outside), "symbolic link"


def case_baseline_create_traces_link(tmp, outside):
    base = _baseline(tmp)
    _link(base / "traces" / "cpu", outside / "dir")
    return ["baseline", "create", "--backends", "cpu,cpu", "--steps", "2", "--repeats", "1", "--out", str(base)], \
        "symbolic link"


def case_capture_into_hardlinked_tokens(tmp, outside):
    t = _trace(tmp / "t")
    _hardlink(t / "tokens.bin", outside / "secret.txt")
    return ["capture", "--steps", "2", "--out", str(t)], "hard links"


def case_report_bundles_no_hardlinked_prompt_codes(tmp, outside):
    run = _run_dir(tmp)
    _hardlink(run / "prompt_codes.npy", outside / "secret.txt")
    return ["report", str(run)], "hard links"


# --------------------------------------------------------------------------- security: paths inside files


def _candle_trace(tmp: Path, prompt: dict | None = None, **sampler) -> Path:
    """A candle capture's trace, then its meta.json edited as a hostile sender would."""
    t = _trace(tmp / "candle", mode="candle")

    def edit(d):
        d["sampler"].update(text_seed=1, audio_seed=1)
        d["sampler"].update(sampler)
        if prompt is not None:
            d["prompt"] = prompt

    _edit(t / "meta.json", edit)
    return t


def case_replay_prompt_source_outside(tmp, outside):
    np.save(outside / "codes.npy", np.zeros((8, 4), dtype=np.int64))
    t = _candle_trace(tmp, prompt={"source": str(outside / "codes.npy"), "kind": "codes", "digest": "x"})
    return ["replay", str(t), "--out", str(tmp / "r")], "--prompt"


def case_check_baseline_model_absolute_path(tmp, outside):
    base = _baseline(tmp)
    _edit(base / "baseline.json", lambda d: d["model"].update(name=str(outside / "model.safetensors")))
    return ["check", "--baseline", str(base)], "pass --model"


def case_check_baseline_model_hf(tmp, outside):
    base = _baseline(tmp)
    _edit(base / "baseline.json", lambda d: d["model"].update(name="hf://attacker/weights"))
    return ["check", "--baseline", str(base)], "pass --model"


def case_check_run_report_link(tmp, outside):
    base = _baseline(tmp)
    run = tmp / "recorded"
    run.mkdir()
    (outside / "report.json").write_text(json.dumps({"schema": "xbackend.report/1"}))
    _link(run / "report.json", outside / "report.json")
    return ["check", "--baseline", str(base), "--run", str(run)], "symbolic link"


def case_codec_report_json_link(tmp, outside):
    run = _codec_run(tmp)
    (outside / "report.json").write_text((run / "report.json").read_text())
    _link(run / "report.json", outside / "report.json")
    return ["report", str(run)], "symbolic link"


# --------------------------------------------------------------------------- crashes on untrusted files


def case_report_json_nested_200k(tmp, outside):
    run = _run_dir(tmp)
    (run / "report.json").write_text(DEEP)
    return ["report", str(run)], "levels deep"


def case_baseline_json_nested_200k(tmp, outside):
    base = _baseline(tmp)
    (base / "baseline.json").write_text(DEEP)
    return ["check", "--baseline", str(base)], "levels deep"


def case_session_json_nested_200k(tmp, outside):
    (tmp / "s.json").write_text(DEEP)
    return ["import", str(tmp / "s.json"), "--out", str(tmp / "o")], "levels deep"


def case_sessions_dir_nested_200k(tmp, outside):
    (tmp / "logs").mkdir()
    (tmp / "logs" / "moshi-1-1.json").write_text(DEEP)
    return ["sessions", str(tmp / "logs")], "levels deep"


def case_tolerances_toml_nested_200k(tmp, outside):
    (tmp / "tol.toml").write_text("[tolerances]\nfp32 = " + "[" * 200_000 + "]" * 200_000 + "\n")
    return ["check", "--baseline", str(_baseline(tmp)), "--tolerances", str(tmp / "tol.toml")], "levels deep"


def case_meta_json_nested_200k(tmp, outside):
    t = _trace(tmp / "t")
    (t / "meta.json").write_text(DEEP)
    return ["inspect", str(t)], "levels deep"


def _report_case(tmp, fn, needle="report.json"):
    run = _run_dir(tmp)
    _edit(run / "report.json", fn)
    return ["report", str(run)], needle


def case_report_arbiter_a_list(tmp, outside):
    return _report_case(tmp, lambda d: d.update(arbiter=[1, 2]))


def case_report_arbiter_figures_missing_max_abs(tmp, outside):
    return _report_case(tmp, lambda d: d.update(arbiter={"status": "ok", "spec": "cpu:fp64",
                                                         "backends": [{"backend": "other", "steps": 3}]}))


def case_report_onset_an_int(tmp, outside):
    return _report_case(tmp, lambda d: d["verdicts"][0]["figures"].update(onset=3))


def case_report_spikes_of_ints(tmp, outside):
    return _report_case(tmp, lambda d: d["verdicts"][0]["figures"].update(spikes=[1]))


def case_report_runs_1e999(tmp, outside):
    run = _run_dir(tmp)
    text = (run / "report.json").read_text()
    (run / "report.json").write_text(text[:-1] + ', "reference_repeatability": {"backend": "cpu", "runs": 1e999}}')
    return ["report", str(run)], "does not fit"


def case_report_tolerance_400_digits(tmp, outside):
    run = _run_dir(tmp)
    text = (run / "report.json").read_text().replace('"tolerance": 0.001', '"tolerance": ' + "9" * 400)
    (run / "report.json").write_text(text)
    return ["report", str(run)], "digits"


def case_report_float_where_an_index_is(tmp, outside):
    return _report_case(tmp, lambda d: d["verdicts"][0].update(first_divergence={"step": 1.5, "stream": "text"}))


def case_report_request_arbiter_a_number(tmp, outside):
    return _report_case(tmp, lambda d: d["request"].update(arbiter=5))


def case_codec_report_missing_figures(tmp, outside):
    run = _codec_run(tmp)
    _edit(run / "report.json", lambda d: d["verdicts"][0].pop("figures"))
    return ["report", str(run)], "report.json"


def case_codec_report_list_where_a_name_is(tmp, outside):
    run = _codec_run(tmp)
    _edit(run / "report.json", lambda d: d["verdicts"][0].update(codec=["mlx"]))
    return ["report", str(run)], "report.json"


def case_baseline_names_a_backend_it_does_not_list(tmp, outside):
    base = _baseline(tmp)

    def ghost(d):
        d["traces"]["ghost"] = d["traces"].pop(next(iter(d["traces"])))

    _edit(base / "baseline.json", ghost)
    return ["check", "--baseline", str(base)], "ghost"


def _lines_log(tmp: Path, step: str, token: str = "5") -> Path:
    log = tmp / "app.log"
    log.write_text(f"Step {step} text token: {token}\nStep {step} audio tokens: [1, 2]\n")
    return log


def case_import_step_1e12(tmp, outside):
    return ["import", str(_lines_log(tmp, "1000000000000")), "--out", str(tmp / "o")], "step"


def case_import_30_digit_token(tmp, outside):
    return ["import", str(_lines_log(tmp, "0", "9" * 30)), "--out", str(tmp / "o")], "token"


def case_import_5000_digit_token(tmp, outside):
    return ["import", str(_lines_log(tmp, "0", "9" * 5000)), "--out", str(tmp / "o")], "token"


def case_import_text_pattern_capturing_words(tmp, outside):
    log = tmp / "app.log"
    log.write_text("Step zero text token: five\nStep 0 audio tokens: [1, 2]\n")
    return ["import", str(log), "--text-pattern", r"Step (?P<step>\w+) text token: (?P<token>\w+)",
            "--out", str(tmp / "o")], "import"


def case_replay_pad_mult_1e308(tmp, outside):
    t = _candle_trace(tmp, pad_mult=1e308)
    return ["replay", str(t), "--out", str(tmp / "r")], "pad_mult"


def case_replay_string_where_a_number_is(tmp, outside):
    t = _candle_trace(tmp, text_seed="one")
    return ["replay", str(t), "--out", str(tmp / "r")], "text_seed"


def case_forced_from_symlink_loop(tmp, outside):
    (tmp / "loop").symlink_to(tmp / "loop")
    return ["capture", "--steps", "2", "--sampler", f"forced:{tmp / 'loop'}", "--out", str(tmp / "o")], "forced"


def case_model_config_dev_zero(tmp, outside):
    ckpt = tmp / "ckpt.safetensors"
    shutil.copy(ROOT / "reference" / "models" / "tiny" / "model.safetensors", ckpt)
    return ["capture", "--steps", "2", "--model", str(ckpt), "--model-config", "/dev/zero", "--out", str(tmp / "o")], \
        "not a regular file"


def case_token_equal_to_vocabulary(tmp, outside):
    t = _trace(tmp / "t")
    tokens = np.fromfile(t / "tokens.bin", dtype="<i4").reshape(-1, 2)
    tokens[1, 0] = 7  # the text vocabulary is 7: ids 0..6
    meta = json.loads((t / "meta.json").read_text())
    meta["has_logits"], meta["logits_dtype"] = False, None
    for s in meta["streams"]:
        (t / f"logits-{s}.bin").unlink()
    (t / "meta.json").write_text(json.dumps(meta))
    tokens.astype("<i4").tofile(t / "tokens.bin")
    from xbackend.store.trace import token_digest

    (t / "digests.txt").write_text("".join(token_digest(row) + "\n" for row in tokens))
    return ["inspect", str(t)], "outside its vocabulary"


# --------------------------------------------------------------------------- overwrites and losses


def _users_dir(tmp: Path) -> Path:
    out = tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


def case_import_into_a_users_directory(tmp, outside):
    return ["import", str(_lines_log(tmp, "0")), "--out", str(_users_dir(tmp))], "not written by xbackend"


def case_import_into_a_committed_baseline_trace(tmp, outside):
    base = _baseline(tmp)
    return ["import", str(_lines_log(tmp, "0")), "--out", str(base / "traces" / "cpu" / "native-0")], "inside the xbackend baseline"


def case_replay_into_a_users_directory(tmp, outside):
    return ["replay", str(_candle_trace(tmp)), "--out", str(_users_dir(tmp))], "not written by xbackend"


def case_codec_into_a_users_directory(tmp, outside):
    return ["codec", "--codecs", "torch", "--out", str(_users_dir(tmp))], "not written by xbackend"


def case_capture_force_keeps_the_users_files(tmp, outside):
    out = tmp / "mine"
    out.mkdir()
    (out / "digests.txt").write_text("my digests")
    (out / "meta.json").write_text("my meta")
    return ["capture", "--steps", "2", "--force", "--out", str(out)], "overwrites nothing"


def case_report_json_out_replacing_its_input(tmp, outside):
    run = _run_dir(tmp)
    return ["report", str(run), "--json-out", str(run / "report.json")], "inside"


def case_inspect_plot_onto_a_fifo(tmp, outside):
    os.mkfifo(outside / "fifo")
    return ["inspect", str(_trace(tmp / "t")), "--plot", str(outside / "fifo")], "not a regular file"


def case_colliding_trace_directories(tmp, outside):
    plugin = _plugin(tmp, 'xbackend.register_backend("cpu_2", xbackend.wrap_backend("cpu", on_logits=lambda r, s, n, x: x))\n')
    return ["compare", "--backends", "cpu,cpu,cpu_2", "--steps", "2", "--plugin", plugin, "--out", str(tmp / "o")], \
        "would both be stored"


def case_refused_import_writes_nothing(tmp, outside):
    log = _lines_log(tmp, "0", "40000")  # beyond the default 32000 text vocabulary
    return ["import", str(log), "--out", str(tmp / "o")], "--text-vocab"


def case_report_on_an_extracted_bundle(tmp, outside):
    run = _run_dir(tmp, "bundle")
    shutil.rmtree(run / "traces")
    (run / "report.md").write_text("# the reporter's page\n")
    return ["report", str(run)], "extracted bundle"


# --------------------------------------------------------------------------- hangs and wrong exits


def case_fifo_as_model_safetensors(tmp, outside):
    ckpt = tmp / "ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "model.safetensors")
    shutil.copy(ROOT / "reference" / "models" / "tiny" / "config.json", ckpt / "config.json")
    return ["capture", "--steps", "2", "--model", str(ckpt), "--out", str(tmp / "o")], "not a regular file"


def case_codec_timeout_nan(tmp, outside):
    return ["codec", "--codecs", "torch", "--timeout", "nan", "--out", str(tmp / "o")], "--timeout"


def case_fifo_as_tolerances(tmp, outside):
    os.mkfifo(tmp / "tol.toml")
    return ["check", "--baseline", str(_baseline(tmp)), "--tolerances", str(tmp / "tol.toml")], "not a regular file"


def case_directory_as_plugin(tmp, outside):
    (tmp / "p.py").mkdir()
    return ["backends", "--plugin", str(tmp / "p.py")], "not a regular file"


def case_fifo_as_session(tmp, outside):
    os.mkfifo(tmp / "s.json")
    return ["import", str(tmp / "s.json"), "--format", "session", "--out", str(tmp / "o")], "not a regular file"


def case_report_json_of_1_gb(tmp, outside):
    run = _run_dir(tmp)
    with open(run / "report.json", "r+b") as f:
        f.truncate(1 << 30)  # sparse: refused from its size, never read
    return ["report", str(run)], "more than"


def case_baseline_json_of_1_gb(tmp, outside):
    base = _baseline(tmp)
    with open(base / "baseline.json", "r+b") as f:
        f.truncate(1 << 30)
    return ["check", "--baseline", str(base)], "more than"


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


def _state(root: Path) -> dict:
    """Every file and link under `root` (links not followed): content digest and mtime."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if name == ".xbackend":  # the lock a command takes on its output directory
                continue
            st = p.lstat()
            if p.is_symlink():
                out[p] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_file():
                out[p] = ("file", hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 24 else st.st_size,
                          st.st_mtime_ns)
            elif not p.is_dir():
                out[p] = ("special", st.st_mode, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(tmp_path, name):
    outside = _outside(tmp_path)
    args, needle = CASES[name](tmp_path, outside)
    before = _state(tmp_path)
    proc = run_cli(*args, cwd=tmp_path, timeout=240)
    assert_clean_error(proc, 2, needle)
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error: ")]) == 1
    after = _state(tmp_path)
    for path, what in before.items():  # nothing that was there is overwritten, read into a bundle or deleted
        assert after.get(path) == what, path
    made = [p for p in after if p not in before]
    assert not made, made  # a refused command writes nothing, inside or outside


# --------------------------------------------------------------------------- outcomes other than exit 2


def test_a_tokenizer_path_in_meta_json_is_never_opened(tmp_path):
    """`model.tokenizer.path` naming a FIFO outside: opening it would block forever."""
    outside = _outside(tmp_path)
    os.mkfifo(outside / "tokenizer.model")
    t = _trace(tmp_path / "t")
    _edit(t / "meta.json", lambda d: d["model"].update(tokenizer={"path": str(outside / "tokenizer.model"),
                                                                  "digest": "0" * 16, "name": "tokenizer.model"}))
    proc = run_cli("inspect", str(t), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == ""


def test_terminal_sequences_and_forged_lines_are_printed_escaped(tmp_path):
    t = _trace(tmp_path / "t", backend="\x1b]0;pwned\x07\x1b[2J[/]é\udcff")
    _edit(t / "meta.json", lambda d: d.update(status="failed", error="boom\nerror: forged line\r\x1b[1A"))
    for env in ({}, {"PYTHONIOENCODING": "ascii"}):
        proc = run_cli("inspect", str(t), env=env)
        assert proc.returncode == 0, proc.stderr
        for stream in (proc.stdout, proc.stderr):
            assert "\x1b" not in stream and "\x07" not in stream and "\r" not in stream
        assert not any(line.startswith("error: forged") for line in proc.stderr.splitlines()), proc.stderr
        assert "\\x1b" in proc.stdout and "Traceback" not in proc.stderr


def test_rich_markup_in_a_trace_path_is_literal(tmp_path):
    t = _trace(tmp_path / "[/]" / "[bold]t")
    proc = run_cli("inspect", str(t), env={"COLUMNS": "400"})  # one line: no fold inside the path
    assert proc.returncode == 0, proc.stderr
    assert "[bold]t" in proc.stdout


def test_json_stdout_survives_a_plugin_that_prints(tmp_path):
    plugin = _plugin(tmp_path, 'print("hello from the plugin")\nos.write(1, b"raw\\n")\n'
                               'xbackend.register_backend("loud", xbackend.wrap_backend("cpu", on_logits=lambda r, s, n, x: x))\n')
    proc = run_cli("backends", "--plugin", plugin, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "loud" in {b["spec"] for b in json.loads(proc.stdout)["backends"]}


def test_broken_pipe_exits_quietly(tmp_path):
    t = _trace(tmp_path / "t")
    proc = subprocess.Popen([sys.executable, "-m", "xbackend", "inspect", str(t), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader (`head`) is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141), err
    assert "writable path" not in err and "Traceback" not in err


def test_a_lock_holder_keeps_a_second_import_out(tmp_path):
    import fcntl

    log = _lines_log(tmp_path, "0")
    out = tmp_path / "o"
    assert run_cli("import", str(log), "--out", str(out)).returncode == 0
    before = _state(out)
    fd = os.open(out / ".xbackend", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_clean_error(run_cli("import", str(log), "--out", str(out)), 2, "in use")
    finally:
        os.close(fd)
    assert _state(out) == before


def test_an_interrupted_check_leaves_no_temporary_directory(tmp_path, monkeypatch):
    import tempfile

    from xbackend.check import kept_on_failure

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        with kept_on_failure("xbackend-check-") as tmp:
            (tmp / "half.json").write_text("{}")
            raise KeyboardInterrupt
    assert not list(tmp_path.glob("xbackend-check-*"))


def test_the_tokenizer_path_a_trace_records_is_never_opened(tmp_path):
    """A trace's `model.tokenizer.path` (any file: /proc/kmsg blocks forever) is not followed: only the
    bundled tokenizer, or the one of the model the user names, is read, by the digest the trace records."""
    from xbackend.capture.models import file_digest
    from xbackend.analysis.words import BUNDLED, tokenizer_for

    pytest.importorskip("sentencepiece")
    outside = _outside(tmp_path)
    shutil.copy(BUNDLED, outside / "tokenizer.model")
    meta = {"model": {"tokenizer": {"path": str(outside / "tokenizer.model"), "digest": file_digest(BUNDLED)}}}
    assert tokenizer_for(meta).path == BUNDLED
    assert tokenizer_for(meta, known=outside / "tokenizer.model").path == outside / "tokenizer.model"  # user-named
    meta["model"]["tokenizer"]["digest"] = "0" * 16
    assert tokenizer_for(meta) is None


def test_out_of_memory_and_a_full_disk_are_not_output_path_errors():
    import errno

    from xbackend.cli import os_error

    assert os_error(OSError(errno.ENOMEM, "Cannot allocate memory")).startswith("out of memory")
    assert os_error(OSError(errno.ENOSPC, "No space left on device", "/x/t")).startswith("no space left on the disk (/x/t)")
    assert os_error(OSError(errno.EACCES, "Permission denied", "/x")).endswith("Fix: choose a writable path.")


def test_a_nul_byte_in_a_forced_path_is_one_error():
    """argv cannot carry a NUL; the API can (a forced:PATH built from a file)."""
    from xbackend.errors import XBackendError
    from xbackend.samplers import parse_mode

    with pytest.raises(XBackendError, match="NUL byte"):
        parse_mode("forced:runs/a\x00b")


def test_a_token_line_import_says_what_it_assumed(tmp_path):
    proc = run_cli("import", str(_lines_log(tmp_path, "0")), "--out", str(tmp_path / "o"), "--json")
    assert proc.returncode == 0, proc.stderr
    notes = json.loads(proc.stdout)["notes"]
    assert any("--text-vocab 32000" in n and "--acoustic-delay 2" in n for n in notes), notes
    proc = run_cli("import", str(_lines_log(tmp_path, "0")), "--out", str(tmp_path / "p"), "--json",
                   "--text-vocab", "320", "--audio-vocab", "256", "--acoustic-delay", "1")
    assert not any("assumed" in n for n in json.loads(proc.stdout)["notes"])


def test_imported_sessions_with_separate_text_and_audio_seeds_are_surveyed(tmp_path):
    """moshi-backend draws the two seeds apart by default; such an imported trace was refused."""
    from xbackend.capture.models import resolve_model
    from xbackend.samplers import RUST_CLI_SETTINGS

    from .rust_layout import rust_config, write_session

    model = resolve_model("tiny")
    cfg = rust_config(model, acoustic_delay=int(model.delays[2]))
    (tmp_path / "logs").mkdir()
    src = write_session(tmp_path / "logs" / "moshi-1-1.json", np.zeros((4, 1 + model.dep_q), dtype=np.int64),
                        np.zeros((4, model.n_user), dtype=np.int64), cfg, 7, RUST_CLI_SETTINGS)
    _edit(src, lambda d: d.update(audio_seed=2**64 - 1))
    assert run_cli("import", str(src), "--out", str(tmp_path / "traces" / "a")).returncode == 0
    proc = run_cli("sessions", str(tmp_path / "traces"), "--json")
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)["runs"][0]
    assert (run["text_seed"], run["audio_seed"]) == (7, 2**64 - 1)
