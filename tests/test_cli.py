"""The CLI as a user meets it: real subprocesses, the exit codes of docs/design.md, one-line errors
(traces that a test only reads are made in this process: a fresh one would prove nothing more)."""

import json

import numpy as np
import pytest

from xbackend.tolerances import tolerance

from .helpers import assert_clean_error, needs_tiny, run, run_cli, unavailable, without

pytestmark = needs_tiny


def test_capture_writes_a_trace(tmp_path):
    proc = run_cli("capture", "--backend", "cpu", "--steps", "4", "--sampler", "greedy", "--out", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    assert "4 steps of cpu (greedy)" in proc.stdout
    assert json.loads((tmp_path / "t" / "meta.json").read_text())["status"] == "complete"


def test_backends_table_lists_every_builtin():
    proc = run_cli("backends", env={"COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    for spec in ("cpu:fp64", "cuda", "mps", "mlx:cpu", "mlx:q4", "mlx:gpu:bf16:q8"):
        assert spec in proc.stdout
    import sys

    if sys.platform != "darwin":  # which condition failed, in torch's own terms
        assert "MPS needs macOS 14 or newer on Apple silicon" in proc.stdout and "is_built() False" in proc.stdout
    for spec in ("cuda", "mps", "mlx:gpu"):
        reason = unavailable(spec)
        assert (f"no: {reason}" if reason else spec) in proc.stdout


@pytest.mark.parametrize("args,code,needles", [
    (["--backend", "tpu"], 2, ["Unknown backend 'tpu'", "registered backends are"]),
    (["--backend", "cpu:fp8"], 2, ["cpu:fp8"]),
    pytest.param(["--backend", "mps"], 3, ["unavailable", "MPS"], marks=[pytest.mark.mps, without("mps")]),
    (["--backend", "cuda:fp64"], 2, ["fp64"]),
    (["--prompt", "/nonexistent/x.wav"], 2, ["does not exist"]),
    (["--sampler", "random"], 2, ["Unknown sampler"]),
    (["--sampler", "forced:/nonexistent"], 2, ["neither a trace directory nor a codes file"]),
    (["--steps", "0"], 2, ["--steps"]),
    (["--alignment", "sideways"], 2, ["alignment"]),
    (["--model", "/nonexistent/model"], 2, ["not found"]),
])
def test_bad_input_is_one_clear_line(tmp_path, args, code, needles):
    proc = run_cli("capture", "--steps", "2", "--out", str(tmp_path / "t"), *args)
    assert_clean_error(proc, code, *needles)


def test_corrupt_audio(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    assert_clean_error(run_cli("capture", "--prompt", str(bad), "--out", str(tmp_path / "t")), 2, "Cannot read audio")


def test_codes_file_of_the_wrong_shape(tmp_path):
    np.save(tmp_path / "codes.npy", np.zeros((5, 40), dtype=np.int64))
    assert_clean_error(run_cli("capture", "--prompt", str(tmp_path / "codes.npy"), "--out", str(tmp_path / "t")),
                       2, "5 rows")
    assert_clean_error(run_cli("capture", "--sampler", f"forced:{tmp_path / 'codes.npy'}", "--out", str(tmp_path / "t")),
                       2, "shape [5, 40]")
    np.save(tmp_path / "flat.npy", np.zeros(40, dtype=np.int64))
    assert_clean_error(run_cli("capture", "--prompt", str(tmp_path / "flat.npy"), "--out", str(tmp_path / "t")),
                       2, "shape (40,)")


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    from xbackend.capture.models import TINY

    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "model.safetensors").write_bytes((TINY / "model.safetensors").read_bytes())
    config = json.loads((TINY / "config.json").read_text())
    config["dim"] = 48
    (local / "config.json").write_text(json.dumps(config))
    proc = run_cli("capture", "--model", str(local), "--steps", "2", "--out", str(tmp_path / "t"))
    assert_clean_error(proc, 2, "does not fit its config", "text_emb.weight")
    assert not (tmp_path / "t").exists()  # refused from the safetensors header, before any worker or trace


def test_truncated_forced_trace_is_used_up_to_its_last_step(tmp_path):
    ref = run(tmp_path, "ref", steps=6).path  # the trace to force from, made in this process
    digests = (ref / "digests.txt").read_text().splitlines()
    (ref / "digests.txt").write_text("\n".join(digests[:4]) + "\n")  # as if killed after step 3
    ok = run_cli("capture", "--steps", "4", "--sampler", f"forced:{ref}", "--out", str(tmp_path / "f"))
    assert ok.returncode == 0, ok.stderr
    too_long = run_cli("capture", "--steps", "6", "--sampler", f"forced:{ref}", "--out", str(tmp_path / "g"))
    assert_clean_error(too_long, 2, "has 4 steps")


def test_diff_and_repeat_on_traces_from_capture(tmp_path):
    # the traces are made in this process (test_capture_writes_a_trace runs capture's CLI); diff and repeat's are tested
    a = run(tmp_path, "a", steps=8).path
    b = run(tmp_path, "b", backend="cpu:fp64", steps=8, sampler=f"forced:{a}").path
    proc = run_cli("diff", str(a), str(b), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["steps_compared"] == 8 and data["tokens_identical"] and not data["logits_identical"]
    assert 0 < data["max_abs"] <= tolerance("fp64", "fp32")  # 1e-3; measured 2.0e-5 over 8 steps: 50x margin
    c = run(tmp_path, "c", steps=8, seed=1).path
    assert_clean_error(run_cli("diff", str(a), str(c)), 2, "not comparable", "seed")
    rep = run_cli("repeat", "--backend", "cpu", "--runs", "3", "--steps", "6", "--out", str(tmp_path / "r"), "--json")
    assert rep.returncode == 0, rep.stderr
    result = json.loads(rep.stdout)
    assert result["identical_logits_runs"] == 3 and result["identical_token_runs"] == 3
    assert len(set(result["run_digests"])) == 1 and result["first_nondeterministic_step"] is None


def test_diff_of_a_missing_trace(tmp_path):
    assert_clean_error(run_cli("diff", str(tmp_path / "nope"), str(tmp_path / "nope2")), 2, "Cannot load trace")


def test_hub_model_offline_is_a_clear_error(tmp_path):
    """hf:// models are fetched only when asked for; offline, the user is told what to do."""
    proc = run_cli("capture", "--model", "hf://kyutai/moshiko-pytorch-bf16", "--steps", "2", "--out", str(tmp_path / "t"),
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_clean_error(proc, 2, "Cannot fetch hf://kyutai/moshiko-pytorch-bf16", "network")


def test_capture_into_a_directory_keeps_files_that_are_not_the_traces(tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "firmware.bin").write_bytes(b"keep me")
    assert_clean_error(run_cli("capture", "--steps", "2", "--out", str(out)), 2, "not written by xbackend", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["firmware.bin"]
    assert run_cli("capture", "--steps", "2", "--out", str(out), "--force").returncode == 0
    assert (out / "firmware.bin").read_bytes() == b"keep me"


@pytest.mark.parametrize("args,needle", [
    (["compare", "--backends", "cpu"], "at least 2 backends"),
    (["compare", "--backends", "cpu,,mlx:cpu"], "Empty backend"),
    (["repeat", "--backend", "cpu,mlx:cpu"], "repeat runs one backend"),
    (["capture", "--steps", "2", "--out", "/proc/xbackend-no"], "writable"),
])
def test_more_bad_input(tmp_path, args, needle):
    assert_clean_error(run_cli(*args), 2, needle)


def test_diff_of_a_trace_with_no_complete_step(tmp_path):
    a = run(tmp_path, "a", steps=3).path
    b = tmp_path / "b"
    import shutil

    shutil.copytree(a, b)
    (b / "digests.txt").write_text("")
    assert_clean_error(run_cli("diff", str(a), str(b)), 2, "no complete step")


# --- one surface for every command ---------------------------------------------------------------

COMMANDS = (["backends"], ["capture"], ["compare"], ["diff"], ["repeat"], ["report"], ["check"], ["inspect"], ["matrix"],
            ["baseline", "create"], ["locate"])


def test_version():
    from xbackend import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"xbackend {__version__}"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_no_python_types(command):
    proc = run_cli(*command, "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for hint in ("<bool>", "<path>", "<str>", "<int>", "<float>", "list[", "{"):
        assert hint not in proc.stdout, (hint, proc.stdout)
    assert f"Usage: python -m xbackend {' '.join(command)} [OPTIONS]" in proc.stdout


def test_usage_names_the_arguments():
    def usage(*command):
        lines = run_cli(*command, "--help", env={"COLUMNS": "200"}).stdout.splitlines()
        return next(line.strip() for line in lines if "Usage:" in line)

    assert usage("diff") == "Usage: python -m xbackend diff [OPTIONS] TRACE_A TRACE_B"
    assert usage("inspect") == "Usage: python -m xbackend inspect [OPTIONS] TRACE"
    assert usage("report") == "Usage: python -m xbackend report [OPTIONS] RUN_DIR"
    assert usage("locate") == "Usage: python -m xbackend locate [OPTIONS] RUN_DIR"


SETTINGS = ["--temp-text", "0.5", "--top-k-text", "7", "--temp-audio", "1.1", "--top-k-audio", "9"]
ASKED = {"temp_text": 0.5, "top_k_text": 7, "temp_audio": 1.1, "top_k_audio": 9}


def json_both(tmp_path, *args) -> dict:
    """Run a command with --json and --json-out: stdout and the file must hold the same JSON."""
    file = tmp_path / f"{args[0]}.json"
    proc = run_cli(*args, "--json", "--json-out", str(file))
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    assert json.loads(file.read_text()) == data
    return data


def test_json_on_stdout_and_in_a_file_and_sampling_options_everywhere(tmp_path):
    t = tmp_path / "t"
    got = json_both(tmp_path, "capture", "--steps", "3", "--sampler", "portable", *SETTINGS, "--out", str(t))
    assert got["steps"] == 3 and got["trace"] == str(t) and got["settings"] == ASKED
    assert json.loads((t / "meta.json").read_text())["settings"] == ASKED
    assert json_both(tmp_path, "diff", str(t), str(t))["tokens_identical"] is True
    assert json_both(tmp_path, "inspect", str(t))["steps"] == 3
    rows = json_both(tmp_path, "backends")["backends"]
    assert {r["spec"]: r["extra"] for r in rows}["mlx:q4"] == "mlx" and rows[0]["extra"] == "torch"
    rep = json_both(tmp_path, "repeat", "--runs", "2", "--steps", "3", *SETTINGS, "--out", str(tmp_path / "r"))
    assert rep["runs"] == 2 and rep["tokens_identical"]
    for i in range(2):
        assert json.loads((tmp_path / "r" / "traces" / f"run-{i}" / "meta.json").read_text())["settings"] == ASKED


def test_json_out_keeps_the_text_output(tmp_path):
    t = tmp_path / "t"
    proc = run_cli("capture", "--steps", "2", "--out", str(t), "--json-out", str(tmp_path / "c.json"))
    assert proc.returncode == 0 and "2 steps of cpu (native)" in proc.stdout
    assert json.loads((tmp_path / "c.json").read_text())["steps"] == 2


def test_reusing_an_out_directory_leaves_no_stale_runs(tmp_path):
    out = tmp_path / "r"
    assert run_cli("repeat", "--runs", "3", "--steps", "2", "--out", str(out)).returncode == 0
    (out / "traces" / "notes.txt").write_text("mine")
    assert run_cli("repeat", "--runs", "2", "--steps", "2", "--out", str(out)).returncode == 0
    assert sorted(p.name for p in (out / "traces").iterdir()) == ["notes.txt", "run-0", "run-1"]


def test_json_is_strict():
    import numpy as np

    from xbackend.cli import json_safe

    got = json_safe({"nan": float("nan"), "inf": [np.float32("inf"), np.float64(0.5)], "n": np.int64(3), "ok": True})
    assert json.dumps(got, allow_nan=False) == '{"nan": null, "inf": [null, 0.5], "n": 3, "ok": true}'
