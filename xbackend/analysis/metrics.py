"""How far apart two traces are, step by step and stream by stream (docs/design.md, The protocol), in numpy alone.

Per step and stream, trace B against the reference A (their first min(steps) steps):

| metric | meaning |
| --- | --- |
| `max_abs` | max over the vocabulary of abs(logit_B - logit_A) |
| `rms` | root mean square of logit_B - logit_A over the vocabulary |
| `kl` | KL(A ‖ B) of softmax(logits / T), T the stream's sampling temperature |
| `dp_ref` | p_B(tok_A) - p_A(tok_A) under the same softmax, tok_A = the token A took |
| `top1` | argmax_A == argmax_B |
| `topk_overlap` | abs(topk_A ∩ topk_B) / k, k the stream's top-k capped at the vocabulary |
| `margin_a`, `margin_b` | each trace's recorded margin of that decision, in logit units |

KL and Δp use the full softmax at the sampling temperature (no top-k cut: a token leaving
one top-k set would make KL infinite while its probability barely moved); a temperature of
0 (greedy) uses T = 1. Top-k sets count ties at the k-th value as inside, as the samplers do.

KL is computed without cancellation (see `_chunk_metrics`): as E_A[φ(x)] with
φ(x) = x + exp(-x) - 1 >= 0 and x the centred log-ratio, plus a float64 correction per row.
Its error is ~1e-7 relative at any size, where the textbook float64 log-sum-exp difference has
an absolute error of ~1e-15 (1% of the KL ~1e-13 of a same-weights fp32 pair). `max_abs` is
exact whenever the two logits are within a factor of 2 of each other (always, for drift),
otherwise within one float32 rounding of Δ; identical logits give exactly 0 everywhere.

A logit that is NaN or ±inf in either trace makes that step's `max_abs` non-finite.

Tolerances live in `tolerances.py`.

## Drift explains a divergence when

    2 * max_abs(s, k) >= min(margin_A(s, k), margin_B(s, k))

A margin is the winner's score minus the runner-up's, in logit units (samplers.py). Moving every
logit by at most max_abs moves that gap by at most 2 * max_abs, so a smaller delta cannot have
flipped the decision: the divergence then comes from the sampler, not from the numbers. The
test is generous on purpose (with the same portable noise a drift-made flip in fact needs
2 * max_abs >= margin_A + margin_B, except when the winner crossed the top-k boundary). Native
decisions record no margin (NaN): there the question has no answer (None).

## Speed

`step_metrics` maps the `[steps, vocab]` files and runs (block of 256 steps, stream) units on a
thread pool, every metric of a cache-sized chunk from whole-array numpy calls; docs/design.md
("How fast diff is") says how, and what it measured. `xbackend.testing.bench` times it.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import XBackendError
from ..samplers import SamplingSettings, effective_top_k
from ..store.trace import LOGITS_DTYPES, Trace, decode_logits

METRICS = ("max_abs", "rms", "kl", "dp_ref", "top1", "topk_overlap", "margin_a", "margin_b")
PERCENTILES = {"median": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}

BLOCK_STEPS = 256
_CHUNK_ELEMENTS = 1 << 18  # logits per numpy call: 1 MB per float32 temporary, cache-sized
_INLINE_ELEMENTS = 1 << 22  # below this many logits per trace a thread pool costs more than it saves


# --------------------------------------------------------------------------- per-step metrics


@dataclass(frozen=True, eq=False)
class StepMetrics:
    """Per-step metrics of B against A: every array is `[steps, streams]` (float64, `top1` bool)."""

    streams: tuple[str, ...]
    temperatures: tuple[float, ...]
    top_k: tuple[int, ...]
    max_abs: np.ndarray
    rms: np.ndarray
    kl: np.ndarray
    dp_ref: np.ndarray
    top1: np.ndarray
    topk_overlap: np.ndarray
    margin_a: np.ndarray
    margin_b: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.max_abs.shape[0])

    def column(self, metric: str, stream: str) -> np.ndarray:
        """One metric of one stream, `[steps]`."""
        if metric not in METRICS:
            raise XBackendError(f"Unknown metric {metric!r}", asked=f"metrics are {', '.join(METRICS)}")
        if stream not in self.streams:
            raise XBackendError(f"Unknown stream {stream!r}", asked=f"streams are {', '.join(self.streams)}")
        return getattr(self, metric)[:, self.streams.index(stream)]

    def head(self, steps: int) -> StepMetrics:
        """The metrics of the first `steps` steps only."""
        cut = {f.name: getattr(self, f.name)[:steps] for f in fields(self) if f.name in METRICS}
        return StepMetrics(self.streams, self.temperatures, self.top_k, **cut)


def _check_shapes(a: Trace, b: Trace) -> None:
    if a.streams != b.streams or a.vocab != b.vocab:
        raise XBackendError(
            f"Traces {a.path} and {b.path} have different streams or vocabularies",
            asked=f"{a.path.name}: {a.vocab}; {b.path.name}: {b.vocab}",
            fix="compare traces of the same model")


@dataclass(frozen=True)
class _StreamPlan:
    """How one stream is compared: its vocabulary, 1/temperature, top-k and top-k search."""

    vocab: int
    inv_t: float
    k: int
    group: int  # elements per group for the group-maxima top-k search; 0: plain partition


def _group_size(vocab: int, k: int) -> int:
    """Group size g whose maxima make the k-th largest cheap to find, or 0 (partition the row).

    The (k+1)-th largest of the g-element group maxima is a lower bound of the row's (k+1)-th
    largest, and every element above it lies in the k+1 groups with the largest maxima: a
    partition of vocab/g maxima plus one of (k+1)·g candidates replaces a partition of the row
    (text: 32000 logits, k = 25, g = 40: 800 maxima + 1040 candidates).
    """
    if k >= vocab:
        return 0
    best, best_cost = 0, 0.6 * vocab
    for g in range(2, 257):
        if vocab % g or vocab // g <= k:
            continue
        cost = 1.6 * (vocab // g) + g * (k + 1) + 0.1 * vocab  # argpartition costs ~1.6x partition
        if cost < best_cost:
            best, best_cost = g, cost
    return best


def _plan(trace: Trace) -> list[_StreamPlan]:
    settings = SamplingSettings.from_meta(trace.meta)
    plans = []
    for i, v in enumerate(trace.meta["vocab"]):
        temp, top_k = settings.for_stream(i)
        k = effective_top_k(top_k, int(v))
        plans.append(_StreamPlan(int(v), 1.0 / temp if temp > 0 else 1.0, k, _group_size(int(v), k)))
    return plans


_local = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype: str | np.dtype) -> np.ndarray:
    """A per-thread reusable buffer: fresh multi-MB temporaries cost more in page faults than in math."""
    cache = _local.__dict__.setdefault("buffers", {})
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = cache.get(name)
    if buf is None or buf.nbytes < size:
        buf = cache[name] = np.empty(size, dtype=np.uint8)
    return buf[:size].view(dtype).reshape(shape)


def _kth_largest(x: np.ndarray, k: int, g: int, tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                  np.ndarray | None]:
    """Row-wise k-th and (k+1)-th largest values (k < vocab).

    With g > 0 the search runs on the k+1 groups of g columns with the largest maxima, which
    hold the k+1 largest values; it then also returns those candidates and their columns.
    """
    n, v = x.shape
    if not g:
        work = _buffer(f"part{tag}", x.shape, x.dtype)
        np.copyto(work, x)
        work.partition(v - k, axis=1)
        return work[:, v - k].copy(), work[:, :v - k].max(axis=1), None, None
    n_groups, k1 = v // g, k + 1
    x3 = x.reshape(n, g, n_groups)  # group j = columns j, j + n_groups, ...
    top = np.argpartition(x3.max(axis=1), n_groups - k1, axis=1)[:, n_groups - k1:]
    cand = np.take_along_axis(x3, top[:, None, :], axis=2).reshape(n, g * k1)
    cols = (np.arange(g)[None, :, None] * n_groups + top[:, None, :]).reshape(n, g * k1)
    m = g * k1 - k
    work = cand.copy()
    work.partition(m, axis=1)
    return work[:, m], work[:, :m].max(axis=1), cand, cols


def _count_rows(mask: np.ndarray) -> np.ndarray:
    """Row-wise count of True (summing bytes: 3x faster than count_nonzero with an axis)."""
    return mask.view(np.uint8).sum(axis=1, dtype=np.uint16 if mask.shape[1] < 65536 else np.uint32).astype(np.int64)


def _topk_overlap(a: np.ndarray, b: np.ndarray, k: int, g: int) -> np.ndarray:
    """abs(topk_A ∩ topk_B) / k per row; only A's threshold is searched from scratch.

    Wherever exactly k logits of B reach a value `hint` between A's k-th and (k+1)-th largest,
    those k are B's top-k set (all others are below it): with small drift that holds for most
    rows, so B costs one comparison pass. Elsewhere B's threshold is searched like A's.
    """
    n, v = a.shape
    if k >= v:
        return np.ones(n)
    tha, next_a, cand, cols = _kth_largest(a, k, g, "a")
    # a value strictly between A's k-th and (k+1)-th largest, which B's drift rarely crosses
    hint = (next_a + (tha.astype(np.float64) - next_a) / 2).astype(a.dtype)
    in_b = _buffer("in_b", b.shape, bool)
    np.greater_equal(b, hint[:, None], out=in_b)
    count_b = _count_rows(in_b)
    if cand is None:
        both = _buffer("both", a.shape, bool)
        np.greater_equal(a, tha[:, None], out=both)
        both &= in_b
        inter = _count_rows(both)
    else:
        inter = _count_rows((cand >= tha[:, None]) & np.take_along_axis(in_b, cols, axis=1))
    redo = np.flatnonzero(count_b != k)
    if redo.size:
        br = b[redo]
        thb = _kth_largest(br, k, g, "b")[0]
        if cand is None:
            both_r = (a[redo] >= tha[redo, None]) & (br >= thb[:, None])
        else:
            both_r = (cand[redo] >= tha[redo, None]) & (np.take_along_axis(br, cols[redo], axis=1) >= thb[:, None])
        inter[redo] = _count_rows(both_r)
    return np.minimum(inter, k) / k


# Taylor terms of φ that are exact to the dtype's rounding up to each |x|; past the last tier the
# direct formula x + expm1(-x) takes over (its cancellation costs ~2u/|x| there, under 1e-6)
_TIERS = {np.dtype(np.float32): ((1e-3, 2), (1e-2, 3), (0.3, 6)),
          np.dtype(np.float64): ((1e-5, 3), (1e-2, 6))}
_TERMS = (1 / 2, -1 / 6, 1 / 24, -1 / 120, 1 / 720, -1 / 5040)


def _phi(xp: np.ndarray, scale: float, bound: float, out: np.ndarray) -> np.ndarray:
    """φ(x) = x + exp(-x) - 1 >= 0 of x = scale * xp, elementwise, without cancellation.

    The usual drift (every |x| <= `bound` small) takes the shortest Taylor series that is exact
    to the dtype's rounding, with `scale` folded into its coefficients. Wider drift blends in
    expm1 (in float64 where exp(-x) could overflow) for the elements past the series' range.
    """
    ft = xp.dtype.type
    tiers = _TIERS[xp.dtype]
    terms = next((n for top, n in tiers if bound <= top), tiers[-1][1])
    coefs = [ft(c * scale ** (i + 2)) for i, c in enumerate(_TERMS[:terms])]
    np.multiply(xp, coefs[-1], out=out)  # Horner: x² (c0 + x (c1 + x (c2 + ...)))
    for c in reversed(coefs[:-1]):
        out += c
        out *= xp
    out *= xp
    reach = tiers[-1][0]
    if bound <= reach:
        return out
    x = xp * ft(scale)
    if np.all(x >= -60.0):  # exp(60) ~ 1e26: past that float32 weighted sums could overflow
        direct = np.expm1(-x)
        direct += x
    else:
        x64 = np.maximum(x.astype(np.float64), -700.0)
        direct = (np.expm1(-x64) + x64).astype(out.dtype)
    far = (np.abs(x, out=x) > ft(reach)).astype(out.dtype)
    if bound > 1e4:  # the series may have overflowed there: 0 * inf would be NaN
        return np.where(far > 0, direct, out)
    direct *= far  # exact blend, branch-free: out * (1 - far) + direct * far
    far -= ft(1)
    out *= far
    np.subtract(direct, out, out=out)
    return out


def _chunk_metrics(a: np.ndarray, b: np.ndarray, tok: np.ndarray, inv_t: float, k: int, g: int) -> tuple:
    """All metrics of `[n, vocab]` rows at once; returns (max_abs, rms, kl, dp_ref, top1, overlap).

    KL without cancellation: with Δ = A - B, w = exp((A - max A)/T) (so p_A = w / s_A) and
    x = (Δ - c)/T for any constant c (here A's top token's Δ), log(p_A/p_B) = x + y for one
    constant y, and Σ p_B = 1 gives y = log1p(F - X) with F = E_A[φ(x)] >= 0, X = E_A[x]:
    KL = X + y. Every elementwise pass runs in the logits' own dtype; only row sums are float64.
    """
    with np.errstate(all="ignore"):  # NaN/inf logits are reported through max_abs, not warned about
        return _chunk_metrics_raw(a, b, tok, inv_t, k, g)


def _chunk_metrics_raw(a: np.ndarray, b: np.ndarray, tok: np.ndarray, inv_t: float, k: int, g: int) -> tuple:
    if a.dtype != b.dtype or a.dtype not in _TIERS:
        common = np.float64 if np.float64 in (a.dtype, b.dtype) else np.float32
        a, b = a.astype(common), b.astype(common)
    ft = a.dtype.type
    n, v = a.shape
    rows = np.arange(n)
    ia, ib = a.argmax(axis=1), b.argmax(axis=1)
    ma = a[rows, ia]
    d = np.subtract(a, b, out=_buffer("d", a.shape, a.dtype))  # exact while A and B are within 2x
    dmax, dmin = d.max(axis=1), d.min(axis=1)
    max_abs = np.maximum(dmax, -dmin).astype(np.float64) + 0.0  # + 0.0: no -0.0
    rms = np.sqrt(np.einsum("ij,ij->i", d, d).astype(np.float64) / v)  # einsum: no BLAS threads
    w = np.subtract(a, ma[:, None], out=_buffer("w", a.shape, a.dtype))
    w *= ft(inv_t)
    np.exp(w, out=w)
    sa = w.sum(axis=1).astype(np.float64)
    centre = d[rows, ia]  # most of p_A sits there: Δ - centre stays small even under a constant shift
    xp = np.subtract(d, centre[:, None], out=_buffer("xp", a.shape, a.dtype))  # x = xp / T
    bound = float(np.max(np.maximum(dmax - centre, centre - dmin))) * inv_t  # >= max |x| (NaN: inf)
    bound = bound if bound == bound else math.inf
    phi = _phi(xp, inv_t, bound, _buffer("phi", a.shape, a.dtype))
    # numpy's pairwise row sums, not einsum's running ones: 1e-7 instead of 1e-5 relative error
    phi *= w
    big_f = phi.sum(axis=1).astype(np.float64) / sa
    np.multiply(w, xp, out=phi)
    big_x = phi.sum(axis=1).astype(np.float64) * inv_t / sa
    y = np.log1p(big_f - big_x)
    kl = np.maximum(big_x + y, 0.0)
    valid = (tok >= 0) & (tok < v)
    t = np.where(valid, tok, 0)
    pa_tok = w[rows, t].astype(np.float64) / sa
    dp = np.where(valid, pa_tok * np.expm1(-(xp[rows, t].astype(np.float64) * inv_t + y)), np.nan) + 0.0
    return max_abs, rms, kl, dp, ia == ib, _topk_overlap(a, b, k, g)


_OUT = ("max_abs", "rms", "kl", "dp_ref", "top1", "topk_overlap")


def logits_file(trace: Trace, stream: str) -> Path:
    return Path(trace.path) / f"logits-{stream}.bin"


class _Decoded:
    """Rows of a 2-byte trace, widened to float32 as they are sliced (the file stays mapped, not copied)."""

    def __init__(self, raw: np.ndarray, stored: str):
        self.raw, self.stored, self.shape = raw, stored, raw.shape

    def __getitem__(self, index) -> np.ndarray:
        return decode_logits(self.raw[index], self.stored)


class _Mapped:
    """Read-only maps of a trace's logits files: rows come straight from the page cache, no copy."""

    def __init__(self, trace: Trace, steps: int):
        self.rows: dict[str, np.ndarray] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._row_bytes: dict[str, int] = {}
        if not trace.has_logits:
            raise XBackendError(f"Trace {trace.path} holds tokens only (has_logits is false): no logits to compare",
                                fix="compare its tokens, or replay it on a backend to get logits")
        stored = trace.logits_dtype
        dtype = LOGITS_DTYPES[stored]
        for stream, vocab in trace.vocab.items():
            self._row_bytes[stream] = vocab * dtype.itemsize
            if steps == 0 or vocab == 0:
                self.rows[stream] = np.zeros((steps, vocab), dtype=dtype)
                continue
            path = logits_file(trace, stream)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < steps * vocab * dtype.itemsize:
                    raise XBackendError(f"Trace file {path} holds {size} bytes, fewer than its {steps} steps need",
                                        fix="reload the trace: it was truncated after it was loaded")
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[stream] = mapped
            raw = np.frombuffer(mapped, dtype=dtype, count=steps * vocab).reshape(steps, vocab)
            self.rows[stream] = raw if stored in ("float32", "float64") else _Decoded(raw, stored)

    def prefetch(self, stream: str, s0: int, s1: int) -> None:
        """Start reading rows s0:s1 from disk in the background (madvise WILLNEED) where supported."""
        mapped = self._maps.get(stream)
        if mapped is None or s1 <= s0 or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_WILLNEED"):
            return
        row = self._row_bytes[stream]
        start = (s0 * row) // mmap.PAGESIZE * mmap.PAGESIZE
        length = min(s1 * row, len(mapped)) - start
        if length > 0:
            mapped.madvise(mmap.MADV_WILLNEED, start, length)


def step_metrics(a: Trace, b: Trace, *, steps: int | None = None, block: int = BLOCK_STEPS,
                 workers: int | None = None) -> StepMetrics:
    """Per-step, per-stream metrics of B against the reference A over their first `steps` steps.

    Work is split into (block of steps, stream) units run on `workers` threads (numpy releases
    the GIL; None: one per CPU, or none for small traces); each unit asks the kernel for the
    rows two blocks ahead so that disk reads overlap the arithmetic.
    """
    _check_shapes(a, b)
    n = min(a.steps, b.steps) if steps is None else max(0, min(int(steps), a.steps, b.steps))
    streams = a.streams
    n_streams = len(streams)
    settings = SamplingSettings.from_meta(a.meta)
    plan = _plan(a)
    out = {name: np.zeros((n, n_streams), dtype=bool if name == "top1" else np.float64) for name in _OUT}
    tokens = np.asarray(a.tokens[:n], dtype=np.int64)
    src_a, src_b = _Mapped(a, n), _Mapped(b, n)
    block = max(1, int(block))

    def prefetch(stream: str, s0: int) -> None:
        for src in (src_a, src_b):
            src.prefetch(stream, s0, min(s0 + block, n))

    def run_unit(unit: tuple[int, int]) -> None:
        s0, col = unit
        s1, stream, grp = min(s0 + block, n), streams[col], plan[col]
        prefetch(stream, s0 + 2 * block)
        rows_a, rows_b = src_a.rows[stream], src_b.rows[stream]
        chunk = max(1, _CHUNK_ELEMENTS // max(grp.vocab, 1))
        for r0 in range(s0, s1, chunk):
            r1 = min(r0 + chunk, s1)
            values = _chunk_metrics(rows_a[r0:r1], rows_b[r0:r1], tokens[r0:r1, col], grp.inv_t, grp.k, grp.group)
            for name, value in zip(_OUT, values):
                out[name][r0:r1, col] = value

    for stream in streams:
        for s0 in (0, block):
            prefetch(stream, s0)
    units = [(s0, col) for s0 in range(0, n, block) for col in range(n_streams)]
    small = n * sum(p.vocab for p in plan) < _INLINE_ELEMENTS
    workers = workers or (1 if small else min(8, os.cpu_count() or 1))
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            run_unit(unit)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xbackend-metrics") as pool:
            list(pool.map(run_unit, units))
    temps = tuple(settings.for_stream(i)[0] for i in range(n_streams))
    return StepMetrics(tuple(streams), temps, tuple(plan[i].k for i in range(n_streams)), **out,
                       margin_a=np.asarray(a.margins[:n], dtype=np.float64),
                       margin_b=np.asarray(b.margins[:n], dtype=np.float64))


# --------------------------------------------------------------------------- summaries


def finite_or_none(x) -> float | None:
    """A JSON-safe number: non-finite values (and None) become None."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


@dataclass(frozen=True)
class Summary:
    """Statistics of one metric of one stream over the steps; NaN/inf steps are counted, not averaged."""

    count: int
    nonfinite: int
    mean: float
    min: float
    min_step: int | None
    max: float
    max_step: int | None
    median: float
    p90: float
    p99: float
    p999: float

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = finite_or_none(value) if isinstance(value, float) else value
        return out


def summarize(values: np.ndarray) -> Summary:
    """Mean, min, max (with their steps) and percentiles (linear interpolation) of one series."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values)
    good = values[finite]
    nonfinite = int(values.size - good.size)
    if good.size == 0:
        nan = math.nan
        return Summary(int(values.size), nonfinite, nan, nan, None, nan, None, nan, nan, nan, nan)
    where = np.flatnonzero(finite)
    pct = np.percentile(good, list(PERCENTILES.values()))
    return Summary(int(values.size), nonfinite, float(good.mean()), float(good.min()), int(where[good.argmin()]),
                   float(good.max()), int(where[good.argmax()]), *(float(p) for p in pct))


def summarize_metrics(m: StepMetrics) -> dict[str, dict[str, Summary]]:
    """stream -> metric -> Summary."""
    return {s: {name: summarize(getattr(m, name)[:, i]) for name in METRICS} for i, s in enumerate(m.streams)}


# --------------------------------------------------------------------------- decisions


def first_token_divergence(a: Trace, b: Trace) -> tuple[int, str] | None:
    """First (step, stream) whose tokens differ, in step order then stream order (text, audio0, ...)."""
    _check_shapes(a, b)
    n = min(a.steps, b.steps)
    mismatch = np.asarray(a.tokens[:n]) != np.asarray(b.tokens[:n])
    if not mismatch.any():
        return None
    step, col = divmod(int(np.argmax(mismatch.reshape(-1))), mismatch.shape[1])
    return step, a.streams[col]


def same_input_drift(base: Trace, fresh: Trace) -> dict:
    """Max abs Δlogit of `fresh` against `base` where both saw the same inputs: every step before the
    first token difference, and at that step the streams up to and including the one that differs."""
    n = min(base.steps, fresh.steps)
    until = first_token_divergence(base, fresh)
    last = n if until is None else until[0] + 1
    if last == 0:
        return {"max_abs": 0.0, "at": None, "steps": 0, "token_divergence": None}
    d = step_metrics(base, fresh, steps=last).max_abs.copy()
    if until is not None:
        d[until[0], base.streams.index(until[1]) + 1:] = 0.0
    d = np.where(np.isnan(d), np.inf, d)
    step, col = np.unravel_index(int(np.argmax(d)), d.shape)
    return {"max_abs": float(d[step, col]), "at": {"step": int(step), "stream": base.streams[col]}, "steps": int(last),
            "token_divergence": None if until is None else {"step": until[0], "stream": until[1]}}


def max_abs_at(a: Trace, b: Trace, step: int, stream: str) -> float:
    """max |Δlogit| of one decision (step, stream), in float64."""
    return float(np.max(np.abs(np.asarray(a.logits(stream)[step], dtype=np.float64)
                               - np.asarray(b.logits(stream)[step], dtype=np.float64))))


def bitwise_equal_steps(a: Trace, b: Trace) -> int | None:
    """First step of the common prefix whose logits digests differ (no logits read), or None."""
    n = min(a.steps, b.steps)
    if n == 0:
        return None
    differ = np.asarray(a.digests[:n]) != np.asarray(b.digests[:n])
    return int(np.argmax(differ)) if differ.any() else None


def drift_explains(max_abs: float, margin_a: float, margin_b: float) -> bool | None:
    """Could a logit drift of `max_abs` have flipped this decision? None when no margin is recorded."""
    margins = [m for m in (margin_a, margin_b) if m is not None and not math.isnan(m)]
    if not margins or max_abs is None or math.isnan(max_abs):
        return None
    return bool(2.0 * max_abs >= min(margins))


# --------------------------------------------------------------------------- what a sampler sees

VISIBLE_P_MIN = 1e-6  # a kept token below this probability in both distributions is never drawn in practice


@dataclass(frozen=True, eq=False)
class Visible:
    """Per step and stream (`[steps, streams]` float64, `topk_changed`/`top1_changed` bool): how far apart
    the distributions a top-k/temperature sampler draws from are (docs/design.md, Verdict rules).

    - `visible`: the sampler-visible |Δlogit|: half the range of Δ = B − A (logit units) over the seen
      tokens (the union of both top-k sets, or both argmaxes for greedy, less tokens of probability
      < `VISIBLE_P_MIN` in both), i.e. max abs(Δ − c) for the best shift c, so at most max|Δlogit|. A
      uniform shift (log-softmax instead of logits) and any change of the tail below top-k give 0:
      softmax and top-k cannot see them.
    - `deviation`: max over the seen tokens of abs(Δ_i − median Δ): how far the most changed token
      stands out.
    - `noise`: 1.4826 × the median absolute deviation of Δ over the whole vocabulary, the row's own
      robust drift level (a change of a few tokens leaves it where the numerics put it).
    - `tv`: total variation distance of the two truncated tempered distributions (greedy: 0 or 1).
    """

    streams: tuple[str, ...]
    visible: np.ndarray
    deviation: np.ndarray
    noise: np.ndarray
    tv: np.ndarray
    topk_changed: np.ndarray
    top1_changed: np.ndarray


def _kept(x: np.ndarray, k: int) -> np.ndarray:
    """Row-wise top-k membership, ties at the k-th value inside (as the samplers count them)."""
    n, v = x.shape
    if k >= v:
        return np.ones(x.shape, dtype=bool)
    kth = np.partition(x, v - k, axis=1)[:, v - k]
    return x >= kth[:, None]


def _truncated(x: np.ndarray, kept: np.ndarray, inv_t: float) -> np.ndarray:
    z = np.where(kept, x * inv_t, -np.inf)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def visible_rows(a: np.ndarray, b: np.ndarray, temp: float, top_k: int) -> tuple[np.ndarray, ...]:
    """(visible, deviation, noise, tv, topk_changed, top1_changed) of `[n, vocab]` rows of A and B (see `Visible`)."""
    with np.errstate(all="ignore"):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        n, v = a.shape
        rows = np.arange(n)
        ia, ib = a.argmax(axis=1), b.argmax(axis=1)
        if temp <= 0:  # greedy: only the top-1 is seen
            ka = np.zeros(a.shape, dtype=bool)
            ka[rows, ia] = True
            kb = np.zeros(b.shape, dtype=bool)
            kb[rows, ib] = True
            seen = ka | kb
            tv = (ia != ib).astype(np.float64)
        else:
            k = effective_top_k(top_k, v)
            ka, kb = _kept(a, k), _kept(b, k)
            pa, pb = _truncated(a, ka, 1.0 / temp), _truncated(b, kb, 1.0 / temp)
            tv = 0.5 * np.abs(pa - pb).sum(axis=1)
            seen = (ka | kb) & (np.maximum(pa, pb) >= VISIBLE_P_MIN)
            seen[rows, ia] = seen[rows, ib] = True
        d = b - a
        masked = np.where(seen, d, np.nan)
        centre = np.nanmedian(masked, axis=1)
        visible = (np.nanmax(masked, axis=1) - np.nanmin(masked, axis=1)) / 2
        deviation = np.nanmax(np.abs(masked - centre[:, None]), axis=1)
        noise = 1.4826 * np.median(np.abs(d - np.median(d, axis=1, keepdims=True)), axis=1)
        bad = ~np.isfinite(d).all(axis=1)
        visible[bad], deviation[bad], noise[bad], tv[bad] = np.inf, np.inf, np.inf, 1.0
        return visible + 0.0, deviation + 0.0, noise + 0.0, tv, (ka != kb).any(axis=1), ia != ib


def visible_metrics(a: Trace, b: Trace, *, steps: int | None = None) -> Visible:
    """`Visible` of B against the reference A over their first `steps` steps, at A's recorded sampling settings."""
    _check_shapes(a, b)
    n = min(a.steps, b.steps) if steps is None else max(0, min(int(steps), a.steps, b.steps))
    settings = SamplingSettings.from_meta(a.meta)
    out = [np.zeros((n, len(a.streams))) for _ in range(4)] + [np.zeros((n, len(a.streams)), dtype=bool)
                                                                for _ in range(2)]
    if n:
        for col, stream in enumerate(a.streams):
            temp, top_k = settings.for_stream(col)
            va, vb = a.logits(stream)[:n], b.logits(stream)[:n]
            chunk = max(1, _CHUNK_ELEMENTS // max(va.shape[1], 1))
            for r0 in range(0, n, chunk):
                for arr, value in zip(out, visible_rows(va[r0:r0 + chunk], vb[r0:r0 + chunk], temp, top_k)):
                    arr[r0:r0 + chunk, col] = value
    return Visible(tuple(a.streams), *out)
