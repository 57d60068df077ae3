"""`xbackend.testing.bench`: the diff throughput harness reports both speeds over the bytes it read."""

import pytest

from xbackend.testing.bench import bench_diff
from xbackend.testing.traces import synthetic_trace


def test_bench_diff_reports_both_speeds(tmp_path):
    a = synthetic_trace(tmp_path / "a", steps=20, vocab=(3000, 256), seed=0)
    b = synthetic_trace(tmp_path / "b", steps=20, vocab=(3000, 256), seed=0, noise=1e-3)
    r = bench_diff(a, b)
    assert r.steps == 20 and r.bytes == r.read_bytes == 20 * 3256 * 4 * 2
    assert r.read_s > 0 and r.diff_s > 0 and r.ratio == pytest.approx(r.read_s / r.diff_s)
    assert set(r.to_dict()) >= {"read_mb_s", "diff_mb_s", "steps_per_s", "ratio"}
