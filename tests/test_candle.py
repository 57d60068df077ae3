"""candle's TopK sampler, bit for bit: goldens from the Rust program (peer data), Rust's own
select_nth_unstable_by when rustc is here, and the parts (RNG, expf, partition) on their own."""

from __future__ import annotations

import ctypes
import json
import ctypes.util
import platform
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

import xbackend
from xbackend.samplers import candle_select
from xbackend.samplers.candle import CandleSampler, StdRng, expf, select_nth_unstable_desc, softmax_f32, weighted_index
from xbackend.errors import XBackendError

from .helpers import ROOT

GOLDEN = ROOT.parent / "shared" / "peer" / "candle-sampler"
needs_golden = pytest.mark.skipif(not (GOLDEN / "cases").is_dir(), reason=f"candle goldens not found at {GOLDEN}")
CASES = sorted(p.name for p in (GOLDEN / "cases").iterdir()) if (GOLDEN / "cases").is_dir() else []


def _case(name: str):
    d = GOLDEN / "cases" / name
    p = (d / "case.txt").read_text().split()
    seed, steps, dep_q, tv, av = (int(x) for x in p[:5])
    kt, tt, ka, ta = int(p[5]), float(p[6]), int(p[7]), float(p[8])
    text = np.fromfile(d / "text.f32", "<f4").reshape(steps, tv)
    audio = np.fromfile(d / "audio.f32", "<f4").reshape(steps, dep_q, av)
    expected = [[int(x) for x in line.split()] for line in (d / "expected.txt").read_text().splitlines()]
    decisions = (d / "decisions.txt").read_text().splitlines()
    return seed, (kt, tt, ka, ta), text, audio, expected, decisions


@needs_golden
@pytest.mark.parametrize("name", CASES)
def test_goldens_token_for_token(name):
    seed, (kt, tt, ka, ta), text, audio, expected, decisions = _case(name)
    ts, aus = CandleSampler(seed, kt, tt), CandleSampler(seed, ka, ta)
    rows, log = [], []
    for s in range(text.shape[0]):
        d = ts.decide(text[s])
        row = [d.token]
        log.append(d)
        for c in range(audio.shape[1]):
            d = aus.decide(audio[s, c])
            row.append(d.token)
            log.append(d)
        rows.append(row)
    assert rows == expected
    described = [f"topk pos {d.position} of {d.k}" if d.k < len(text[0] if i % (audio.shape[1] + 1) == 0 else audio[0, 0])
                 else f"all {d.token}" for i, d in enumerate(log)]
    assert described == decisions  # the position within Rust's partition order, not just the token
    assert ts.position == text.shape[0] and aus.position == text.shape[0] * audio.shape[1]


@needs_golden
def test_sample_equals_decide_and_margins_are_positive():
    seed, (kt, tt, _, _), text, _, expected, _ = _case("cli-defaults-7b")
    a, b = CandleSampler(seed, kt, tt), CandleSampler(seed, kt, tt)
    for s in range(4):
        d = b.decide(text[s])
        assert a.sample(text[s]) == d.token == expected[s][0]
        assert 0 < d.margin < 1 and d.margin_ulps > 0 and d.logit_margin > 0


@needs_golden
def test_rng_words_and_weighted_draws():
    for line in (GOLDEN / "rng.txt").read_text().splitlines():
        if m := re.match(r"seed (\d+) next_u32\[0..130\] \[(.*)\]", line):
            rng = StdRng(int(m.group(1)))
            assert [rng.next_u32() for _ in range(130)] == [int(x) for x in m.group(2).split(",")]
        elif m := re.match(r"seed (\d+) weighted\S* x16 \[(.*)\]", line):
            rng = StdRng(int(m.group(1)))
            w = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
            assert [weighted_index(w, rng.next_u32()).index for _ in range(16)] == [int(x) for x in m.group(2).split(",")]


def test_rng_known_words_without_goldens():
    # StdRng::seed_from_u64(299792458), first words (also in the peer rng.txt)
    rng = StdRng(299792458)
    assert [rng.next_u32() for _ in range(3)] == [1721509750, 63497963, 2452207152]
    assert rng.word(0) == 1721509750 and rng.word(64) == StdRng(299792458).word(64)  # random access = stream order


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or ctypes.util.find_library("m") is None,
                    reason="glibc's expf is what is reproduced; this machine has another libm")
def test_expf_matches_this_libm():
    """glibc's expf is what Rust's f32::exp calls on Linux; numpy's float32 exp is not it."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-105, 0, 20000), rng.uniform(-1, 1, 5000),
                        [-88.0, -88.7, -103.9, -104.0, -150.0, 0.0, -0.0, -np.inf]]).astype(np.float32)
    want = np.array([libm.expf(float(v)) for v in x], dtype=np.float32)
    assert np.array_equal(expf(x).view(np.int32), want.view(np.int32))


def test_softmax_sums_sequentially_in_float32():
    logits = np.linspace(-3, 3, 1000).astype(np.float32)
    p = softmax_f32(logits, 0.8)
    assert p.dtype == np.float32
    e = expf(logits * np.float32(1 / 0.8) - (logits * np.float32(1 / 0.8)).max())
    total = np.float32(0)
    for v in e:  # the sequential f32 sum candle's CPU softmax does without AVX
        total = np.float32(total + v)
    assert np.array_equal(p, e / total)


def _rust_select_reference(prs: np.ndarray, k: int) -> list[int]:
    return select_nth_unstable_desc(prs, k, vector_min=10**9)[:k].tolist()


@pytest.mark.parametrize("seed", range(6))
def test_numpy_partition_equals_the_pointer_loop(seed):
    """The closed form of the cyclic Lomuto partition gives exactly the loop's order, ties included."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(2, 5000))
        kind = rng.integers(0, 4)
        prs = [rng.random(n), rng.integers(0, 4, n) / 4, np.sort(rng.random(n)), np.full(n, 0.25)][kind]
        prs = prs.astype(np.float32)
        k = int(rng.integers(1, n))
        assert select_nth_unstable_desc(prs, k, vector_min=17)[:k].tolist() == _rust_select_reference(prs, k)


def test_partition_loop_by_hand():
    """partition_lomuto_branchless_cyclic on a small slice, traced by hand from quicksort.rs."""
    w = [5, 1, 4, 2, 3]  # values; pivot 3, is_less = value < 3
    num_lt = candle_select._lomuto_cyclic_list(w, lambda a: a < 3)
    # r=1: 1<3 -> [1,1,4,2,3]; r=2: 4 -> [1,4,4,2,3]; r=3: 2<3 -> [1,2,4,2,3]; r=4: 3 -> [1,2,3,4,3];
    # the saved first element 5 goes last: w[4] = w[2], w[2] = 5
    assert num_lt == 2 and w == [1, 2, 5, 4, 3]


RUST_SELECT = r"""
use std::io::{Read, Write};
fn main() {
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).unwrap();
    let mut off = 0;
    let rd = |o: &mut usize| { let v = u32::from_le_bytes([buf[*o], buf[*o+1], buf[*o+2], buf[*o+3]]); *o += 4; v };
    let mut out = std::io::BufWriter::new(std::io::stdout());
    while off < buf.len() {
        let n = rd(&mut off) as usize; let k = rd(&mut off) as usize;
        let prs: Vec<f32> = (0..n).map(|_| f32::from_bits(rd(&mut off))).collect();
        let mut idx = (0..n).collect::<Vec<_>>();
        let (ind, _, _) = idx.select_nth_unstable_by(k, |&i, &j| prs[j].total_cmp(&prs[i]));
        for &i in ind.iter() { out.write_all(&(i as u32).to_le_bytes()).unwrap(); }
    }
}
"""


@pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc not installed: Rust's own order cannot be asked")
def test_order_equals_rusts_select_nth_unstable_by(tmp_path):
    """Rust's select_nth_unstable_by on this machine's rustc (1.81+: the same introselect) against ours,
    on random, tied, sorted, constant, organ-pipe and bf16-rounded probabilities."""
    (tmp_path / "sel.rs").write_text(RUST_SELECT)
    subprocess.run(["rustc", "-O", "sel.rs", "-o", "sel"], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    rng = np.random.default_rng(11)
    cases = []
    for i in range(160):
        n = int(rng.choice([2, 3, 17, 18, 64, 65, 300, 1000, 2048, 4100, 32000]))
        kind = i % 7
        if kind == 0:
            p = rng.random(n)
        elif kind == 1:
            p = rng.integers(0, 30, n) / 30
        elif kind == 2:
            p = np.sort(rng.random(n))
        elif kind == 3:
            p = np.sort(rng.random(n))[::-1]
        elif kind == 4:
            p = np.full(n, 0.5)
        elif kind == 5:
            p = np.concatenate([np.arange(n // 2), np.arange(n - n // 2)[::-1]]).astype(float)
        else:
            p = (rng.standard_normal(n).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
        p = np.asarray(p, dtype=np.float32)
        k = int(max(1, min(n - 1, rng.choice([1, 25, 250, n // 2, n - 1, int(rng.integers(1, n))]))))
        cases.append((p, k))
    blob = b"".join(struct.pack("<II", p.size, k) + p.astype("<f4").tobytes() for p, k in cases)
    res = np.frombuffer(subprocess.run([str(tmp_path / "sel")], input=blob, capture_output=True, check=True).stdout, "<u4")
    off = 0
    for p, k in cases:
        assert select_nth_unstable_desc(p, k)[:k].tolist() == res[off:off + k].tolist(), (p.size, k)
        off += k


def test_k_at_least_vocab_draws_over_everything():
    logits = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    a = CandleSampler(5, 3, 1.0).decide(logits)
    b = CandleSampler(5, 100, 1.0).decide(logits)
    assert a.token == b.token and a.k == 3
    u = (StdRng(5).word(0) >> 9) / 2**23
    p = softmax_f32(logits, 1.0)
    assert a.token == int(np.searchsorted(np.cumsum(p)[:-1], np.float32(u) * p.sum(), side="right"))


def test_pad_mult_moves_mass_to_the_pad_token():
    logits = np.zeros(50, dtype=np.float32)
    picks = [CandleSampler(s, 250, 0.8, pad_mult=8.0).sample(logits) for s in range(20)]
    plain = [CandleSampler(s, 250, 0.8).sample(logits) for s in range(20)]
    # measured 20 of 20 and 0 of 20; StdRng's words are integer arithmetic, the same draws on every CPU
    assert picks.count(3) >= 18 and plain.count(3) <= 3


def test_index_gives_random_access_to_the_stream():
    logits = np.random.default_rng(0).standard_normal((5, 200)).astype(np.float32)
    seq = CandleSampler(9, 20, 0.7)
    tokens = [seq.sample(x) for x in logits]
    assert CandleSampler(9, 20, 0.7).decide(logits[3], index=3).token == tokens[3]


@pytest.mark.parametrize("args,needle", [
    ((1, 0, 0.8), "top_k >= 1"), ((1, 5, 0.0), "positive finite temperature"),
    ((1, 5, float("nan")), "positive finite temperature"), ((-1, 5, 0.8), "0 .. 2**64-1"),
    ((2**64, 5, 0.8), "0 .. 2**64-1"), ((1, True, 0.8), "top_k"),
])
def test_bad_settings_are_errors(args, needle):
    with pytest.raises(XBackendError, match=re.escape(needle)):
        CandleSampler(*args)


def test_nan_logits_fail_like_candle():
    with pytest.raises(XBackendError, match="negative or NaN"):
        CandleSampler(1, 5, 0.8).sample(np.array([0.0, np.nan, 1.0], dtype=np.float32))


def test_public_api_and_identity():
    s = xbackend.CandleSampler(299792458, 250, 0.8)
    assert s.describe()["algorithm"] == "candle TopK WeightedIndex"
    assert s.describe()["rng"] == "StdRng ChaCha12 seeded by PCG32 from u64"


# --- --sampler candle on the real CLI --------------------------------------------------------------

from .helpers import assert_clean_error, have, needs_tiny, run_cli  # noqa: E402


@needs_tiny
@pytest.mark.skipif(not have("mlx") or not have("moshi_mlx"), reason="mlx / moshi_mlx not installed")
def test_capture_candle_cpu_and_mlx_cpu_sample_the_same_tokens(tmp_path):
    for spec in ("cpu", "mlx:cpu"):
        proc = run_cli("capture", "-b", spec, "--sampler", "candle", "--steps", "40", "--out", str(tmp_path / spec))
        assert proc.returncode == 0, proc.stderr
    a, b = xbackend.load_trace(tmp_path / "cpu"), xbackend.load_trace(tmp_path / "mlx:cpu")
    assert np.array_equal(a.tokens, b.tokens)
    assert a.meta["settings"] == {"temp_text": 0.8, "top_k_text": 250, "temp_audio": 0.8, "top_k_audio": 250}
    assert a.meta["sampler"]["algorithm"] == "candle TopK WeightedIndex" and a.meta["effective"]["capture_path"] == "host"
    assert np.isfinite(a.margins).all() and (a.margins > 0).all()
    # the decisions are candle's on the recorded logits, word by word
    text = CandleSampler(299792458, 250, 0.8)
    assert [text.sample(np.asarray(a.logits("text")[s])) for s in range(a.steps)] == a.tokens[:, 0].tolist()


@needs_tiny
def test_candle_settings_options_and_repeat(tmp_path):
    proc = run_cli("capture", "-b", "cpu", "--sampler", "candle", "--top-k-text", "5", "--steps", "3",
                   "--out", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    assert xbackend.load_trace(tmp_path / "t").meta["settings"]["top_k_text"] == 5
    assert xbackend.load_trace(tmp_path / "t").meta["settings"]["temp_text"] == 0.8
    proc = run_cli("repeat", "-b", "cpu", "--sampler", "candle", "--runs", "2", "--steps", "4", "--out",
                   str(tmp_path / "r"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens_identical"] is True
    assert xbackend.load_trace(tmp_path / "r" / "traces" / "run-1").meta["sampler"]["mode"] == "candle"
    assert_clean_error(run_cli("compare", "-b", "cpu,cpu", "--sampler", "greedy", "--out", str(tmp_path / "c")),
                       2, "free runs cannot use")
    assert_clean_error(run_cli("capture", "-b", "cpu", "--sampler", "candle", "--top-k-audio", "0", "--steps", "2",
                               "--out", str(tmp_path / "z")), 2, "top_k >= 1")


@needs_tiny
def test_compare_with_candle_free_runs(tmp_path):
    proc = run_cli("compare", "-b", "cpu,cpu", "--sampler", "candle", "--steps", "6", "--repeats", "1",
                   "--out", str(tmp_path / "c"), "--json")
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert report["request"]["sampler"] == "candle"
    free = xbackend.load_trace(tmp_path / "c" / "traces" / "cpu_2" / "portable")
    assert free.meta["sampler"]["mode"] == "candle" and free.meta["settings"]["top_k_text"] == 250
    assert report["verdicts"][0]["figures"]["portable_divergence"] is None
