"""Every hostile or mistaken input of the hardening issue, through the real CLI: one `error:` line,
exit 2 (never 3: no backend is to blame), no traceback, and nothing outside the command's own
output created, overwritten or deleted."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from xbackend.capture.models import TINY
from xbackend.testing.traces import synthetic_trace

from .helpers import assert_clean_error, needs_tiny, run_cli

pytestmark = needs_tiny


def _trace(tmp: Path, name: str = "t") -> Path:
    return synthetic_trace(tmp / name, steps=4, vocab=(7, 5), seed=1).path


def _edit_meta(path: Path, **fields) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(fields)
    (path / "meta.json").write_text(json.dumps(meta))


def _wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """A float32 WAV written by hand, so that any rate (1 Hz, 2**31-1 Hz) and NaN samples fit in it."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, (rate * 4) & 0xFFFFFFFF, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def _local_model(tmp: Path, **config_changes) -> Path:
    local = tmp / "ckpt"
    local.mkdir(exist_ok=True)
    shutil.copy(TINY / "model.safetensors", local / "model.safetensors")
    config = json.loads((TINY / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (local / "config.json").write_text(json.dumps(config))
    return local


def case_logits_dtype_object(tmp):
    t = _trace(tmp)
    _edit_meta(t, logits_dtype="object")
    return ["diff", str(t), str(t)], "logits_dtype"


def case_vocab_wrong_type(tmp):
    t = _trace(tmp)
    _edit_meta(t, vocab="seven")
    return ["inspect", str(t)], "vocab"


def case_steps_missing(tmp):
    t = _trace(tmp)
    meta = json.loads((t / "meta.json").read_text())
    del meta["steps"]
    (t / "meta.json").write_text(json.dumps(meta))
    return ["inspect", str(t)], "lacks the field 'steps'"


def case_streams_wrong(tmp):
    t = _trace(tmp)
    _edit_meta(t, streams=["../../etc/passwd", "audio0"])
    return ["inspect", str(t)], "streams"


def case_n_inputs_wrong(tmp):
    t = _trace(tmp)
    _edit_meta(t, n_inputs=-3)
    return ["inspect", str(t)], "n_inputs"


def case_settings_wrong(tmp):
    t = _trace(tmp)
    _edit_meta(t, settings={"temp_text": "hot"})
    return ["inspect", str(t)], "settings.temp_text"


def case_digest_not_utf8(tmp):
    t = _trace(tmp)
    (t / "digests.txt").write_bytes(b"\xff\xfe" * 16 + b"\n")
    return ["inspect", str(t)], "digests.txt line 1"


def case_empty_logits_file(tmp):
    t = _trace(tmp)
    (t / "logits-text.bin").write_bytes(b"")
    a = _trace(tmp, "a")
    return ["diff", str(a), str(t)], "no complete step"


def case_flipped_logits_byte(tmp):
    a, b = _trace(tmp, "a"), _trace(tmp, "b")
    raw = bytearray((b / "logits-audio0.bin").read_bytes())
    raw[4 * 5 * 2 + 3] ^= 0x40  # step 2, first logit: a large change
    (b / "logits-audio0.bin").write_bytes(bytes(raw))
    return ["diff", str(a), str(b)], "step 2's logits do not match its digest"


def case_symlinked_trace_file(tmp):
    t = _trace(tmp)
    secret = tmp / "secret.bin"
    secret.write_bytes(os.urandom(256))
    (t / "logits-text.bin").unlink()
    (t / "logits-text.bin").symlink_to(secret)
    return ["inspect", str(t)], "symbolic link"


def _run_dir(tmp: Path) -> Path:
    run = tmp / "run"
    for label in ("cpu", "other"):
        for name in ("native-0", "portable"):
            synthetic_trace(run / "traces" / label / name, steps=4, vocab=(7, 5), seed=1)
    report = {"schema": "xbackend.report/1", "reference": "cpu",
              "request": {"backends": ["cpu", "other"], "model": "tiny", "seed": 1, "steps": 4, "repeats": 1,
                          "alignment": "aligned", "settings": {}, "plugins": []},
              "backends": [{"name": "cpu", "status": "ok", "error": None, "env": None},
                           {"name": "other", "status": "ok", "error": None, "env": None}],
              "verdicts": [], "drift": [], "failures": [], "traces": {"cpu": "traces/cpu", "other": "traces/other"}}
    (run / "report.json").write_text(json.dumps(report))
    return run


def case_report_absolute_trace_path(tmp):
    run = _run_dir(tmp)
    elsewhere = tmp / "elsewhere"
    shutil.copytree(run / "traces" / "other", elsewhere)
    report = json.loads((run / "report.json").read_text())
    report["traces"]["other"] = str(elsewhere)
    (run / "report.json").write_text(json.dumps(report))
    return ["report", str(run)], "must stay inside"


def case_report_dotdot_trace_path(tmp):
    run = _run_dir(tmp)
    report = json.loads((run / "report.json").read_text())
    report["traces"]["other"] = "../../"
    (run / "report.json").write_text(json.dumps(report))
    return ["report", str(run)], "must stay inside"


def case_report_symlinked_file(tmp):
    run = _run_dir(tmp)
    secret = tmp / "secret.txt"
    secret.write_text("password")
    (run / "prompt_codes.npy").symlink_to(secret)  # left out of the bundle; the report.json link is refused
    (run / "report.json").rename(tmp / "report.json")
    (run / "report.json").symlink_to(tmp / "report.json")
    return ["report", str(run)], "symbolic link"


def _baseline(tmp: Path) -> Path:
    src = Path(__file__).resolve().parent.parent / "reference" / "baselines" / "tiny-cpu-mlx"
    return Path(shutil.copytree(src, tmp / "baseline"))


def case_baseline_dir_outside(tmp):
    base = _baseline(tmp)
    data = json.loads((base / "baseline.json").read_text())
    first = next(iter(data["traces"]))
    data["traces"][first]["dir"] = "/etc"
    (base / "baseline.json").write_text(json.dumps(data))
    return ["check", "--baseline", str(base)], "must stay inside"


def case_baseline_prompt_outside(tmp):
    base = _baseline(tmp)
    data = json.loads((base / "baseline.json").read_text())
    data["prompt"]["file"] = "../prompt_codes.npy"
    (base / "baseline.json").write_text(json.dumps(data))
    return ["check", "--baseline", str(base)], "must stay inside"


def case_check_out_is_the_baseline(tmp):
    base = _baseline(tmp)
    return ["check", "--baseline", str(base), "--out", str(base)], "overlaps the baseline"


def case_pickle_weights(tmp):
    local = _local_model(tmp)
    (local / "model.safetensors").rename(local / "model.bin")
    return ["capture", "--model", str(local / "model.bin"), "--model-config", str(local / "config.json"),
            "--out", str(tmp / "o")], "only .safetensors"


def case_pickle_codec_name(tmp):
    local = _local_model(tmp, mimi_name="tokenizer.bin")
    return ["capture", "--model", str(local), "--out", str(tmp / "o")], "only .safetensors"


def case_truncated_safetensors(tmp):
    local = _local_model(tmp)
    raw = (local / "model.safetensors").read_bytes()
    (local / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    return ["capture", "--model", str(local), "--out", str(tmp / "o")], "truncated"


def case_config_without_card(tmp):
    local = _local_model(tmp, card=None)
    return ["capture", "--model", str(local), "--out", str(tmp / "o")], "lacks 'card'"


def case_prompt_codes_out_of_vocabulary(tmp):
    codes = np.full((8, 20), 300, dtype=np.int64)  # tiny's card is 256
    np.save(tmp / "codes.npy", codes)
    return ["compare", "--backends", "cpu,mlx:cpu", "--prompt", str(tmp / "codes.npy"), "--steps", "4",
            "--out", str(tmp / "o")], "outside the vocabulary"


def case_negative_temperature(tmp):
    return ["compare", "--backends", "cpu,mlx:cpu", "--temp-text", "-1", "--out", str(tmp / "o")], "--temp-text"


def case_nan_temperature(tmp):
    return ["compare", "--backends", "cpu,mlx:cpu", "--temp-audio", "nan", "--out", str(tmp / "o")], "--temp-audio"


def case_nan_timeout(tmp):
    return ["compare", "--backends", "cpu,mlx:cpu", "--timeout", "nan", "--out", str(tmp / "o")], "--timeout"


def case_negative_top_k(tmp):
    return ["compare", "--backends", "cpu,mlx:cpu", "--top-k-audio", "-5", "--out", str(tmp / "o")], "--top-k-audio"


def case_huge_steps(tmp):
    return ["capture", "--steps", str(10**12), "--out", str(tmp / "o")], "--steps"


def case_nan_audio(tmp):
    samples = np.sin(np.arange(24000) / 10.0)
    samples[100] = np.nan
    return ["capture", "--prompt", str(_wav(tmp / "nan.wav", samples, 24000)), "--out", str(tmp / "o")], "NaN"


def case_one_hertz_audio(tmp):
    return ["capture", "--prompt", str(_wav(tmp / "slow.wav", np.zeros(10), 1)), "--out", str(tmp / "o")], "sample rate"


def case_huge_rate_audio(tmp):
    wav = _wav(tmp / "fast.wav", np.zeros(1000), 2**31 - 1)
    return ["capture", "--prompt", str(wav), "--out", str(tmp / "o")], "sample rate"


def case_npz_named_npy(tmp):
    with open(tmp / "codes.npy", "wb") as f:
        np.savez(f, codes=np.zeros((8, 20), dtype=np.int64))
    return ["capture", "--prompt", str(tmp / "codes.npy"), "--out", str(tmp / "o")], ".npz archive"


def case_plugin_exits(tmp):
    (tmp / "quit.py").write_text("import sys\nsys.exit(0)\n")
    return ["capture", "--plugin", str(tmp / "quit.py"), "--out", str(tmp / "o")], "sys.exit"


def case_plot_into_missing_folder(tmp):
    t = _trace(tmp)
    return ["inspect", str(t), "--plot", str(tmp / "nonexistent" / "dir" / "p.png")], "does not exist"


def case_inspect_against_incomparable(tmp):
    a = _trace(tmp, "a")
    b = synthetic_trace(tmp / "b", steps=4, vocab=(7, 5), seed=1, meta=None).path
    _edit_meta(b, seed=12345, prompt={"digest": "other", "source": "x"})
    return ["inspect", str(a), "--against", str(b)], "not comparable"


def case_out_not_ours(tmp):
    out = tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return ["compare", "--backends", "cpu,mlx:cpu", "--steps", "2", "--out", str(out)], "not written by xbackend"


def case_out_is_a_baseline(tmp):
    base = _baseline(tmp)
    return ["compare", "--backends", "cpu,mlx:cpu", "--steps", "2", "--out", str(base)], "holds an xbackend baseline"


def case_baseline_create_over_user_traces(tmp):
    out = tmp / "bl"
    (out / "traces" / "cpu" / "native-0").mkdir(parents=True)
    (out / "traces" / "cpu" / "native-0" / "mine.txt").write_text("mine")
    (out / ".xbackend").write_text(json.dumps({"kind": "baseline"}))
    return ["baseline", "create", "--backends", "cpu,cpu", "--steps", "2", "--repeats", "1", "--out", str(out)], \
        "was not written by an earlier baseline"


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_2(tmp_path, name):
    args, needle = CASES[name](tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")
              if p.is_file() and not p.is_symlink() and p.name != ".xbackend"}
    proc = run_cli(*args, cwd=tmp_path)
    assert_clean_error(proc, 2, needle)
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error: ")]) == 1
    for path, mtime in before.items():  # nothing that was there is overwritten or deleted
        assert path.is_file() and path.stat().st_mtime_ns == mtime, path
    assert not Path("/nonexistent").exists()


def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_it_starts(tmp_path):
    from xbackend.store import validate
    from xbackend.capture.run import trace_bytes
    from xbackend.errors import XBackendError
    from xbackend.capture.models import MOSHI_7B_CONFIG, resolve_model

    tiny = resolve_model("tiny")
    seven_b = type(tiny)(**{**tiny.__dict__, "config": MOSHI_7B_CONFIG})
    per_step = (trace_bytes(seven_b, 1000, "fp32") - 65536) / 1000
    assert per_step == 48384 * 4 + 9 * 8 + 8 * 4 + 33  # the 193.6 kB per step of a 7B float32 trace
    assert (trace_bytes(seven_b, 1000, "bf16") - 65536) / 1000 == 48384 * 2 + 9 * 8 + 8 * 4 + 33
    with pytest.raises(XBackendError, match="GB free"):
        validate.disk_space(tmp_path / "new" / "dir", 10**18, "a huge run")
    validate.disk_space(tmp_path / "new" / "dir", 10**6, "a small run")
    assert not (tmp_path / "new").exists()
