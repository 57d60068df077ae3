import json
import warnings

import numpy as np
import pytest

from xbackend.errors import XBackendError
from xbackend.trace import TraceWriter, TruncatedTraceWarning, load_trace, step_digest

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
