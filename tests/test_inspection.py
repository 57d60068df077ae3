"""`inspect`: entropy, repeated tokens, n-gram loops and padding of a trace; where two traces part."""

import json

import numpy as np
import pytest

from xbackend.analysis.inspection import (Loop, TokenRun, divergence, entropy, find_loop, inspect_trace, longest_run,
                                 padding_id)
from xbackend.testing.traces import default_meta, synthetic_trace

from .helpers import assert_clean_error, run_cli

VOCAB = (320,) + (256,) * 8  # the bundled tiny model's streams
LOOP = (101, 57, 230)  # one period of the planted loop


def planted(step: int, stream: int, z: np.ndarray) -> np.ndarray:
    """From step 40 on, every audio stream's argmax cycles through LOOP (period 3)."""
    if stream > 0 and step >= 40:
        z[LOOP[(step - 40) % 3] + stream] = z.max() + 20.0
    return z


@pytest.fixture
def looping(tmp_path):
    return synthetic_trace(tmp_path / "loop", steps=70, vocab=VOCAB, seed=5, edit=planted)


def test_planted_loop_is_found_at_its_start_step_and_period(looping):
    result = inspect_trace(looping)
    for k in range(1, 9):
        loop = result.stream(f"audio{k - 1}").loop
        assert (loop.start, loop.period) == (40, 3), loop
        assert loop.span == 30 and loop.pattern == tuple(t + k for t in LOOP)
    assert result.stream("text").loop is None


def test_inspect_cli_reports_the_loop_and_writes_a_plot(looping, tmp_path):
    plot = tmp_path / "inspect.png"
    proc = run_cli("inspect", str(looping.path), "--json", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["streams"]["audio3"]["loop"]["start"] == 40 and data["streams"]["audio3"]["loop"]["period"] == 3
    assert data["entropy"] == {"temperature": 1.0, "unit": "nats", "of": "softmax of the full vocabulary (no top-k)"}
    assert plot.read_bytes()[:4] == b"\x89PNG"
    proc = run_cli("inspect", str(looping.path))
    row = next(line for line in proc.stdout.splitlines() if "audio3" in line)
    assert proc.returncode == 0 and [c.strip() for c in row.split("│")][5:7] == ["40", "3"]


def test_against_a_second_trace(looping, tmp_path):
    other = synthetic_trace(tmp_path / "clean", steps=70, vocab=VOCAB, seed=5)
    d = divergence(looping, other, after=10)
    assert d["first_divergence"]["step"] == 40 and d["first_divergence"]["stream"] == "audio0"
    assert d["after"]["audio0"]["a"] == list(looping.tokens[40:50, 1])
    assert d["after"]["audio0"]["b"] == list(other.tokens[40:50, 1]) and len(d["after"]["text"]["a"]) == 10
    proc = run_cli("inspect", str(looping.path), "--against", str(other.path))
    assert proc.returncode == 0 and "first divergence" in proc.stdout and "step 40, audio0" in proc.stdout


def test_loop_rules():
    random = [5, 9, 2, 7, 1, 8, 4, 6, 3, 11, 13, 17]
    assert find_loop(random) is None
    assert find_loop(random + [0] * 12) == Loop(12, 1, 12, (0,))
    assert find_loop(random + [1, 2] * 5) is None  # 10 steps: under the 12-step minimum
    assert find_loop(random + [1, 2] * 6) == Loop(12, 2, 12, (1, 2))
    assert find_loop([3] * 30 + [1, 2, 4] * 4, ignore=frozenset({3})) == Loop(30, 3, 12, (1, 2, 4))
    assert longest_run(np.array([1, 1, 2, 2, 2, 3])) == TokenRun(2, 2, 3)
    assert longest_run(np.array([3, 3, 3, 5, 5]), ignore=frozenset({3})) == TokenRun(5, 3, 2)


def test_entropy_and_padding(tmp_path):
    meta = default_meta(model={"name": "x", "digest": "d", "config": {"existing_text_padding_id": 0}})
    t = synthetic_trace(tmp_path / "t", steps=6, vocab=(32, 16), seed=2, meta=meta)
    z = np.asarray(t.logits("audio0")[3], dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    assert entropy(t, "audio0")[3] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
    assert padding_id(t) == 0
    result = inspect_trace(t)
    assert result.padding_ratio == float(np.mean(t.tokens[:, 0] == 0))


def test_bad_trace_is_exit_2(tmp_path):
    assert_clean_error(run_cli("inspect", str(tmp_path)), 2, "meta.json")
