import json
import warnings

import numpy as np
import pytest

from xbackend.errors import XBackendError
from xbackend.store.trace import TraceWriter, TruncatedTraceWarning, load_trace, step_digest

STREAMS, VOCAB = ["text", "audio0"], [5, 3]


def write(path, steps, close=True):
    w = TraceWriter(path, {"seed": 1}, STREAMS, VOCAB, n_inputs=2)
    rng = np.random.default_rng(0)
    rows = []
    for t in range(steps):
        logits = [rng.normal(size=v).astype(np.float32) for v in VOCAB]
        rows.append(logits)
        w.write_step(logits, [t % 5, t % 3], [0.5, float("nan")], np.array([t, t + 1]))
    if close:
        w.close()
    return rows


def test_round_trip(tmp_path):
    rows = write(tmp_path / "t", 4)
    tr = load_trace(tmp_path / "t")
    assert tr.steps == 4 and tr.streams == STREAMS and tr.complete
    assert tr.logits("text").shape == (4, 5) and tr.logits("audio0").shape == (4, 3)
    assert np.array_equal(tr.logits("text")[2], rows[2][0])
    assert tr.tokens.tolist() == [[0, 0], [1, 1], [2, 2], [3, 0]]
    assert tr.inputs[3].tolist() == [3, 4]
    assert tr.margins[0, 0] == 0.5 and np.isnan(tr.margins[0, 1])
    assert tr.digests[1] == step_digest(rows[1])
    assert tr.meta["seed"] == 1 and tr.meta["schema"] == "xbackend.trace/1"


def test_loadable_with_numpy_alone(tmp_path):
    rows = write(tmp_path / "t", 3)
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    raw = np.fromfile(tmp_path / "t" / "logits-audio0.bin", dtype=meta["logits_dtype"]).reshape(meta["steps"], -1)
    assert np.array_equal(raw[1], rows[1][1])
    assert all(not p.name.endswith((".pkl", ".pt", ".pickle")) for p in (tmp_path / "t").iterdir())


def test_killed_run_keeps_complete_steps(tmp_path):
    write(tmp_path / "t", 6, close=False)  # status stays "running", as after a kill -9
    with open(tmp_path / "t" / "logits-text.bin", "ab") as f:  # half of a 7th step
        f.write(np.zeros(5, np.float32).tobytes())
    with pytest.warns(TruncatedTraceWarning, match="6 complete steps"):
        tr = load_trace(tmp_path / "t")
    assert tr.steps == 6 and tr.tokens.shape == (6, 2)


def test_torn_step_is_dropped(tmp_path):
    write(tmp_path / "t", 5)
    path = tmp_path / "t" / "tokens.bin"
    path.write_bytes(path.read_bytes()[:-4])  # last step's tokens torn
    with pytest.warns(TruncatedTraceWarning):
        tr = load_trace(tmp_path / "t")
    assert tr.steps == 4


def test_complete_trace_loads_without_warning(tmp_path):
    write(tmp_path / "t", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_trace(tmp_path / "t")


@pytest.mark.parametrize("damage", ["missing", "garbage", "schema", "no_tokens"])
def test_bad_traces_raise_clear_errors(tmp_path, damage):
    write(tmp_path / "t", 2)
    meta = tmp_path / "t" / "meta.json"
    if damage == "missing":
        meta.unlink()
    elif damage == "garbage":
        meta.write_text("{not json")
    elif damage == "schema":
        meta.write_text(json.dumps({"schema": "other/1"}))
    else:
        (tmp_path / "t" / "tokens.bin").unlink()
    with pytest.raises(XBackendError, match="Cannot load trace"):
        load_trace(tmp_path / "t")


# --------------------------------------------------------------------------- storage dtypes, token-only traces, integrity

from xbackend.store.trace import round_logits, token_digest  # noqa: E402


def bf16_rows(seed=0, steps=5):
    rng = np.random.default_rng(seed)
    return [[round_logits(rng.normal(size=v).astype(np.float32) * 4, "bfloat16") for v in VOCAB] for _ in range(steps)]


@pytest.mark.parametrize("stored,itemsize", [("bfloat16", 2), ("float16", 2), ("float32", 4)])
def test_compact_storage_is_lossless_and_digests_the_logical_values(tmp_path, stored, itemsize):
    rows = bf16_rows()
    if stored == "float16":
        rows = [[round_logits(r, "float16") for r in step] for step in rows]
    for name, dtype in (("compact", stored), ("wide", "float32")):
        w = TraceWriter(tmp_path / name, {}, STREAMS, VOCAB, n_inputs=0, logits_dtype=dtype)
        for t, step in enumerate(rows):
            w.write_step(step, [0, 0], [0.0, 0.0], np.zeros(0))
        w.close()
    compact, wide = load_trace(tmp_path / "compact"), load_trace(tmp_path / "wide")
    assert compact.meta["logits_dtype"] == stored
    assert (tmp_path / "compact" / "logits-text.bin").stat().st_size == len(rows) * VOCAB[0] * itemsize
    assert compact.digests == wide.digests  # digests are over the float32 values
    for s, stream in enumerate(STREAMS):
        got = compact.logits(stream)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), np.stack([r[s] for r in rows]).view(np.uint32))


def test_a_row_bf16_cannot_hold_turns_the_trace_into_float32(tmp_path):
    rows = bf16_rows(steps=4)
    rows[2][1] = rows[2][1] + np.float32(1e-3)  # not a bf16 value any more
    w = TraceWriter(tmp_path / "t", {}, STREAMS, VOCAB, n_inputs=0, logits_dtype="bfloat16")
    for step in rows:
        w.write_step(step, [0, 0], [0.0, 0.0], np.zeros(0))
    w.close()
    tr = load_trace(tmp_path / "t")
    assert tr.meta["logits_dtype"] == "float32" and "step 2, stream audio0" in tr.meta["logits_dtype_note"]
    for s, stream in enumerate(STREAMS):  # every step, before and after the switch, exactly as given
        assert np.array_equal(tr.logits(stream), np.stack([r[s] for r in rows]))


def test_token_only_trace(tmp_path):
    w = TraceWriter(tmp_path / "t", {"source": "candle log"}, STREAMS, VOCAB, n_inputs=0, has_logits=False)
    for t in range(3):
        w.write_step(None, [t, 2], [float("nan")] * 2, np.zeros(0))
    w.close()
    assert not list((tmp_path / "t").glob("logits-*.bin"))
    tr = load_trace(tmp_path / "t")
    assert not tr.has_logits and tr.tokens[:, 0].tolist() == [0, 1, 2]
    assert tr.digests[1] == token_digest([1, 2])
    with pytest.raises(XBackendError, match="tokens only"):
        tr.logits("text")
    tokens = bytearray((tmp_path / "t" / "tokens.bin").read_bytes())
    tokens[8] = 3  # step 1, text: 1 -> 3, still in the vocabulary
    (tmp_path / "t" / "tokens.bin").write_bytes(bytes(tokens))
    with pytest.raises(XBackendError, match="step 1's tokens do not match"):
        load_trace(tmp_path / "t")


def test_a_changed_byte_is_an_error_naming_the_step(tmp_path):
    write(tmp_path / "t", 4)
    raw = bytearray((tmp_path / "t" / "logits-audio0.bin").read_bytes())
    raw[3 * 3 * 4 + 1] ^= 1  # step 3, stream audio0
    (tmp_path / "t" / "logits-audio0.bin").write_bytes(bytes(raw))
    with pytest.raises(XBackendError, match="step 3's logits do not match its digest"):
        load_trace(tmp_path / "t")
    assert load_trace(tmp_path / "t", verify=False).steps == 4  # the internal fast path skips only that


@pytest.mark.parametrize("field,value,needle", [
    ("logits_dtype", "object", "logits_dtype"), ("vocab", [5], "vocab"), ("vocab", [5, True], "vocab"),
    ("streams", ["text", "../x"], "streams"), ("n_inputs", "2", "n_inputs"), ("steps", -1, "steps"),
    ("status", "done", "status"), ("settings", {"temp_text": "hot"}, "settings.temp_text"),
    ("settings", {"bogus": 1}, "settings.bogus"), ("has_logits", "no", "has_logits"),
    ("failed_at", {"step": 1, "stream": "nope"}, "failed_at.stream"), ("sampler", {"mode": 3}, "sampler.mode"),
])
def test_every_meta_field_is_checked(tmp_path, field, value, needle):
    write(tmp_path / "t", 2)
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    meta[field] = value
    (tmp_path / "t" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(XBackendError, match=needle):
        load_trace(tmp_path / "t")


def test_token_outside_vocabulary_and_symlinks_are_refused(tmp_path):
    write(tmp_path / "t", 2)
    tokens = np.fromfile(tmp_path / "t" / "tokens.bin", dtype="<i4")
    tokens[2] = 99
    tokens.tofile(tmp_path / "t" / "tokens.bin")
    with pytest.raises(XBackendError, match="token 99 at step 1"):
        load_trace(tmp_path / "t")
    write(tmp_path / "u", 2)
    (tmp_path / "u" / "margins.bin").rename(tmp_path / "elsewhere.bin")
    (tmp_path / "u" / "margins.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(XBackendError, match="symbolic link"):
        load_trace(tmp_path / "u")


def test_a_bf16_capture_stores_two_bytes_per_logit_and_loads_the_same_values(tmp_path):
    from xbackend.capture.run import CaptureRequest, capture
    from xbackend.capture.models import TINY

    if not (TINY / "model.safetensors").is_file():
        pytest.skip("bundled tiny model not built")
    tr = capture(CaptureRequest(backend="cpu:bf16", steps=4, sampler="greedy"), tmp_path / "bf16")
    assert tr.meta["logits_dtype"] == "bfloat16" and "logits_dtype_note" not in tr.meta
    vocab = tr.vocab
    for stream in tr.streams:
        assert (tmp_path / "bf16" / f"logits-{stream}.bin").stat().st_size == 4 * vocab[stream] * 2
    copy = TraceWriter(tmp_path / "f32", {}, tr.streams, list(vocab.values()), n_inputs=tr.inputs.shape[1])
    for s in range(tr.steps):
        copy.write_step([tr.logits(x)[s] for x in tr.streams], tr.tokens[s].tolist(), tr.margins[s].tolist(), tr.inputs[s])
    copy.close()
    wide = load_trace(tmp_path / "f32")
    assert wide.digests == load_trace(tmp_path / "bf16").digests
    assert all(np.array_equal(wide.logits(x), tr.logits(x)) for x in tr.streams)
