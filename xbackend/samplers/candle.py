"""candle's TopK sampler, bit for bit: what the Rust Moshi stack decides on given logits.

candle-transformers 0.9.1 `LogitsProcessor::from_sampling(seed, Sampling::TopK {k, temperature})`
(`candle-transformers/src/generation/mod.rs`, `sample_f` and `sample_topk`):

1. logits to f32, then `logits / T`, which candle computes as `v * (1/T as f32) + 0`;
2. `softmax_last_dim` on the CPU: max, `f32::exp` (glibc's `expf`, reproduced here), a sequential
   f32 sum, a division;
3. optionally `prs[pad] *= exp(pad_mult)` (moshi-backend's text sampler);
4. `k >= len`: `WeightedIndex` over the whole vector; else `select_nth_unstable_by(k, total_cmp
   descending)` on the indices, and `WeightedIndex` over the k probabilities *in the partition order
   Rust leaves them in*; the draw picks a position in that order;
5. `WeightedIndex<f32>` draws with one `next_u32` of `StdRng` (ChaCha12 seeded by PCG32 from a u64).

The order of step 4 comes from Rust's introselect (`core/src/slice/sort/select.rs` with the
ipnsort pivot and the branchless cyclic Lomuto partition of `sort/unstable/quicksort.rs`, Rust
1.81 and later), reimplemented here exactly; large partitions are computed with numpy through the
closed form of where the cyclic Lomuto partition moves each element.

The RNG never depends on the logits: decision i of a sampler uses word i of its stream. Only the
softmax can differ between platforms (Apple's libm `expf`, Metal and CUDA kernels), which can move
a decision only when the draw lies within a few ulps of a cumulative boundary; `CandleDecision`
carries that distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import XBackendError
from ..streams import TEXT_PADDING_ID

ALGORITHM = "candle TopK WeightedIndex"
RNG = "StdRng ChaCha12 seeded by PCG32 from u64"
IDENTITY = {"algorithm": ALGORITHM, "rng": RNG}  # what decides a token: two runs share a sampler when both agree
_M64 = (1 << 64) - 1

# --- StdRng: ChaCha12 (rand_chacha), key from rand_core's PCG32 seed_from_u64 ------------------


def pcg32_key(seed: int) -> np.ndarray:
    """The 32-byte ChaCha key `StdRng::seed_from_u64(seed)` makes, as 8 little-endian u32 words."""
    state = seed & _M64
    words = []
    for _ in range(8):
        state = (state * 6364136223846793005 + 11634580027462260723) & _M64
        xorshifted = (((state >> 18) ^ state) >> 27) & 0xFFFFFFFF
        rot = state >> 59
        words.append(((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & 0xFFFFFFFF)
    return np.array(words, dtype=np.uint32)


def _rotl(x: np.ndarray, n: int) -> np.ndarray:
    return (x << np.uint32(n)) | (x >> np.uint32(32 - n))


def chacha12_blocks(key: np.ndarray, first_block: int, n_blocks: int) -> np.ndarray:
    """Words of ChaCha12 blocks `first_block ..`, stream 0, 64-bit counter: `[n_blocks * 16]` u32."""
    counters = np.arange(first_block, first_block + n_blocks, dtype=np.uint64)
    state = np.empty((16, n_blocks), dtype=np.uint32)
    state[0:4] = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], dtype=np.uint32)[:, None]
    state[4:12] = key[:, None]
    state[12] = (counters & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    state[13] = (counters >> np.uint64(32)).astype(np.uint32)
    state[14:16] = 0
    x = [state[i].copy() for i in range(16)]

    def quarter(a: int, b: int, c: int, d: int) -> None:
        x[a] += x[b]; x[d] = _rotl(x[d] ^ x[a], 16)  # noqa: E702
        x[c] += x[d]; x[b] = _rotl(x[b] ^ x[c], 12)  # noqa: E702
        x[a] += x[b]; x[d] = _rotl(x[d] ^ x[a], 8)  # noqa: E702
        x[c] += x[d]; x[b] = _rotl(x[b] ^ x[c], 7)  # noqa: E702

    with np.errstate(over="ignore"):
        for _ in range(6):  # 12 rounds = 6 double rounds
            quarter(0, 4, 8, 12); quarter(1, 5, 9, 13); quarter(2, 6, 10, 14); quarter(3, 7, 11, 15)  # noqa: E702
            quarter(0, 5, 10, 15); quarter(1, 6, 11, 12); quarter(2, 7, 8, 13); quarter(3, 4, 9, 14)  # noqa: E702
        out = np.stack(x) + state
    return np.ascontiguousarray(out.T).reshape(-1)


class StdRng:
    """rand's `StdRng::seed_from_u64(seed)`; only `next_u32` (what `WeightedIndex<f32>` uses)."""

    _BATCH = 64  # blocks generated at once; the stream does not depend on it

    def __init__(self, seed: int):
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _M64:
            raise XBackendError(f"A candle seed must be an integer in 0 .. 2**64-1, got {seed!r}",
                                fix="pass the u64 seed the Rust app used")
        self.seed = int(seed)
        self.key = pcg32_key(self.seed)
        self.position = 0  # words consumed
        self._buf = np.empty(0, dtype=np.uint32)
        self._buf_start = 0

    def word(self, i: int) -> int:
        """Word `i` of the stream (0-based), without consuming anything."""
        if not self._buf_start <= i < self._buf_start + self._buf.size:
            block = i // 16
            self._buf = chacha12_blocks(self.key, block, self._BATCH)
            self._buf_start = block * 16
        return int(self._buf[i - self._buf_start])

    def next_u32(self) -> int:
        w = self.word(self.position)
        self.position += 1
        return w


# --- glibc expf (sysdeps/ieee754/flt-32/e_expf.c, ARM optimized-routines), in float64 ---------

_EXP2F_TAB = np.array([
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
], dtype=np.uint64)
_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * 32
_SHIFT = float.fromhex("0x1.8p+52")
_C0 = float.fromhex("0x1.c6af84b912394p-5") / 32 / 32 / 32
_C1 = float.fromhex("0x1.ebfce50fac4f3p-3") / 32 / 32
_C2 = float.fromhex("0x1.62e42ff0c52d6p-1") / 32
_OVER = np.float32(float.fromhex("0x1.62e42ep6"))
_UNDER = np.float32(-float.fromhex("0x1.9fe368p6"))


def expf(x: np.ndarray) -> np.ndarray:
    """glibc's `expf`, elementwise: what Rust's `f32::exp` calls on Linux.

    Not correctly rounded (0.502 ulp): about 1 value in 1,600 differs from float64 `exp` rounded
    to float32, and numpy's own float32 `exp` differs far more often.
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return _expf(x)


def _expf(x: np.ndarray) -> np.ndarray:
    xd = x.astype(np.float64)
    z = _INVLN2N * xd
    kd = z + _SHIFT
    ki = kd.view(np.uint64)
    kd = kd - _SHIFT
    r = z - kd
    t = _EXP2F_TAB[ki & np.uint64(31)] + (ki << np.uint64(47))
    s = t.view(np.float64)
    zz = _C0 * r + _C1
    y = _C2 * r + 1.0
    y = zz * (r * r) + y
    out = (y * s).astype(np.float32)
    special = ~(np.abs(x) < np.float32(88.0))  # |x| >= 88 or NaN: glibc's slow path
    if special.any():
        xs = x[special]
        fix = out[special]
        fix = np.where(xs > _OVER, np.float32(np.inf), fix)
        fix = np.where(xs < _UNDER, np.float32(0.0), fix)
        fix = np.where(np.isnan(xs) | np.isinf(xs), np.where(xs == -np.inf, np.float32(0.0), xs + xs), fix)
        out[special] = fix
    return out


def softmax_f32(logits: np.ndarray, temperature: float) -> np.ndarray:
    """candle's CPU path: `v * (1/T as f32) + 0`, max, `expf`, sequential f32 sum, divide."""
    v = np.asarray(logits).astype(np.float32, copy=False).reshape(-1)
    mul = np.float32(1.0 / float(temperature))
    scaled = v * mul + np.float32(0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        e = expf(scaled - scaled.max())
        total = np.cumsum(e, dtype=np.float32)[-1]
        return e / total


# --- Rust's select_nth_unstable_by (introselect), exactly ----------------------------------------

_INSERTION_SORT_THRESHOLD = 16
_PSEUDO_MEDIAN_REC_THRESHOLD = 64
_VECTOR_MIN = 160  # partitions of this many elements or more are computed with numpy


def total_order_keys(prs: np.ndarray) -> np.ndarray:
    """int64 keys ordering f32 values as `f32::total_cmp` does."""
    bits = np.asarray(prs, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@lru_cache(maxsize=4096)
def _pivot_leaves(n: int) -> np.ndarray:
    """Offsets `choose_pivot` reads in a slice of n >= 8 elements, in groups of three.

    `median3_rec` splits each of its three sections into three sub-sections of an eighth; the
    leaves, taken three at a time, are the arguments of the innermost `median3` calls.
    """
    d8 = n // 8
    pos = np.array([0, d8 * 4, d8 * 7], dtype=np.int64)
    m = d8
    while n >= _PSEUDO_MEDIAN_REC_THRESHOLD and m * 8 >= _PSEUDO_MEDIAN_REC_THRESHOLD:
        m8 = m // 8
        pos = (pos[:, None] + np.array([0, m8 * 4, m8 * 7], dtype=np.int64)).reshape(-1)
        m = m8
    return pos


class _Select:
    """One `select_nth_unstable_by` over `v` (indices), is_less(a, b) = key[a] < key[b]."""

    def __init__(self, keys: np.ndarray, vector_min: int = _VECTOR_MIN):
        self.keys = keys
        self.vector_min = vector_min

    # comparisons between elements (indices into keys)
    def less(self, a: int, b: int) -> bool:
        return self.keys[a] < self.keys[b]

    def run(self, index: int) -> np.ndarray:
        n = self.keys.shape[0]
        v = np.arange(n, dtype=np.int64)
        if index >= n:
            raise ValueError("index out of range")
        if index == n - 1:
            i = int(np.argmax(self.keys))  # max_index: the first maximal element
            v[[i, index]] = v[[index, i]]
        elif index == 0:
            i = int(np.argmin(self.keys))
            v[[i, index]] = v[[index, i]]
        else:
            self.loop(v, 0, n, index)
        return v

    def loop(self, v: np.ndarray, lo: int, hi: int, index: int) -> None:
        """`partition_at_index_loop` on v[lo:hi], index relative to lo."""
        limit = 16
        ancestor = None  # key of the ancestor pivot
        while True:
            n = hi - lo
            if n <= _INSERTION_SORT_THRESHOLD:
                self.small_sort(v, lo, hi)
                return
            if limit == 0:
                sub = v[lo:hi].tolist()
                self.median_of_medians(sub, 0, len(sub), index)
                v[lo:hi] = sub
                return
            limit -= 1
            pivot_pos = self.choose_pivot(v, lo, n)
            if ancestor is not None and not ancestor < self.keys[v[lo + pivot_pos]]:
                num_lt = self.partition(v, lo, hi, pivot_pos, True, index)
                mid = num_lt + 1
                if mid > index:
                    return
                lo += mid
                index -= mid
                ancestor = None
                continue
            mid = self.partition(v, lo, hi, pivot_pos, False, index)
            if mid < index:
                ancestor = self.keys[v[lo + mid]]
                lo, index = lo + mid + 1, index - mid - 1
            elif mid > index:
                hi = lo + mid
            else:
                return

    def small_sort(self, v: np.ndarray, lo: int, hi: int) -> None:
        """insertion_sort_shift_left: a stable sort."""
        if hi - lo >= 2:
            seg = v[lo:hi]
            v[lo:hi] = seg[np.argsort(self.keys[seg], kind="stable")]

    def choose_pivot(self, v: np.ndarray, lo: int, n: int) -> int:
        """shared/pivot.rs `choose_pivot`: median of 3, recursively above 64 elements."""
        pos = _pivot_leaves(n)
        ps = pos.tolist()
        ks = self.keys[v[lo + pos]].tolist()
        while len(ps) > 1:
            nps, nks = [], []
            for i in range(0, len(ps), 3):
                ka, kb, kc = ks[i], ks[i + 1], ks[i + 2]
                x, y = ka < kb, ka < kc
                if x == y:
                    j = i + 2 if (kb < kc) ^ x else i + 1
                else:
                    j = i
                nps.append(ps[j])
                nks.append(ks[j])
            ps, ks = nps, nks
        return ps[0]

    def partition(self, v: np.ndarray, lo: int, hi: int, pivot_pos: int, or_equal: bool, index: int) -> int:
        """quicksort::partition with partition_lomuto_branchless_cyclic; returns num_lt.

        `index` (relative to lo) only lets the numpy path skip ordering what the selection never reads.
        """
        p = lo + pivot_pos
        v[lo], v[p] = v[p], v[lo]
        pivot_key = self.keys[v[lo]]
        n = hi - lo - 1  # the slice without the pivot: v[lo+1:hi]
        if n >= self.vector_min:
            num_lt = _lomuto_cyclic_numpy(v, lo + 1, hi, self.keys, pivot_key, or_equal, index)
        else:
            w = v[lo + 1:hi].tolist()
            kl = self.keys
            if or_equal:
                num_lt = _lomuto_cyclic_list(w, lambda a: kl[a] <= pivot_key)
            else:
                num_lt = _lomuto_cyclic_list(w, lambda a: kl[a] < pivot_key)
            v[lo + 1:hi] = w
        q = lo + num_lt
        v[lo], v[q] = v[q], v[lo]
        return num_lt

    # --- median of medians (the fallback after 16 rounds), on a Python list -------------------

    def median_of_medians(self, v: list, lo: int, hi: int, k: int) -> None:
        keys = self.keys
        while True:
            n = hi - lo
            if n <= _INSERTION_SORT_THRESHOLD:
                if n >= 2:
                    v[lo:hi] = sorted(v[lo:hi], key=lambda a: keys[a])
                return
            if k == n - 1:
                seg = v[lo:hi]
                i = max(range(n), key=lambda j: (keys[seg[j]], -j))
                v[lo + i], v[lo + k] = v[lo + k], v[lo + i]
                return
            if k == 0:
                seg = v[lo:hi]
                i = min(range(n), key=lambda j: (keys[seg[j]], j))
                v[lo + i], v[lo + k] = v[lo + k], v[lo + i]
                return
            p = self.median_of_ninthers(v, lo, hi)
            if p == k:
                return
            if p > k:
                hi = lo + p
            else:
                lo, k = lo + p + 1, k - p - 1

    def median_of_ninthers(self, v: list, lo0: int, hi0: int) -> int:
        n = hi0 - lo0
        if n == 0:
            return 0
        frac = n // 12 if n <= 1024 else (n // 64 if n <= 128 * 1024 else n // 1024)
        pivot = frac // 2
        lo = n // 2 - pivot
        hi = frac + lo
        gap = (n - 9 * frac) // 4
        a = lo - 4 * frac - gap
        b = hi + gap
        for i in range(lo, hi):
            self.ninther(v, lo0, a, i - frac, b, a + 1, i, b + 1, a + 2, i + frac, b + 2)
            a += 3
            b += 3
        self.median_of_medians(v, lo0 + lo, lo0 + lo + frac, pivot)
        return self.partition_list(v, lo0, hi0, lo + pivot)

    def partition_list(self, v: list, lo: int, hi: int, pivot_pos: int) -> int:
        p = lo + pivot_pos
        v[lo], v[p] = v[p], v[lo]
        pk = self.keys[v[lo]]
        w = v[lo + 1:hi]
        kl = self.keys
        num_lt = _lomuto_cyclic_list(w, lambda a: kl[a] < pk)
        v[lo + 1:hi] = w
        v[lo], v[lo + num_lt] = v[lo + num_lt], v[lo]
        return num_lt

    def ninther(self, v: list, o: int, a, b, c, d, e, f, g, h, i) -> None:
        keys = self.keys

        def lt(x: int, y: int) -> bool:
            return keys[v[o + x]] < keys[v[o + y]]

        def median_idx(x: int, y: int, z: int) -> int:
            if lt(z, x):
                x, z = z, x
            if lt(z, y):
                return z
            if lt(y, x):
                return x
            return y

        def swap(x: int, y: int) -> None:
            v[o + x], v[o + y] = v[o + y], v[o + x]

        b = median_idx(a, b, c)
        h = median_idx(g, h, i)
        if lt(h, b):
            b, h = h, b
        if lt(f, d):
            d, f = f, d
        if lt(e, d):
            pass
        elif lt(f, e):
            d = f
        else:
            if lt(e, b):
                swap(e, b)
            elif lt(h, e):
                swap(e, h)
            return
        if lt(d, b):
            d = b
        elif lt(h, d):
            d = h
        swap(d, e)


def _lomuto_cyclic_list(w: list, is_lt) -> int:
    """partition_lomuto_branchless_cyclic, pointer for pointer (w: the slice without the pivot)."""
    n = len(w)
    if n == 0:
        return 0
    gap_value = w[0]
    gap_pos = 0
    num_lt = 0
    for right in range(1, n):
        x = w[right]
        lt = is_lt(x)
        w[gap_pos] = w[num_lt]
        w[num_lt] = x
        gap_pos = right
        num_lt += lt
    lt = is_lt(gap_value)
    w[gap_pos] = w[num_lt]
    w[num_lt] = gap_value
    return num_lt + lt


def _lomuto_cyclic_numpy(v: np.ndarray, lo: int, hi: int, keys: np.ndarray, pivot_key, or_equal: bool,
                         index: int) -> int:
    """The same partition of v[lo:hi] in closed form.

    The loop processes w[1], ..., w[n-1], then w[0] (steps r = 1..n); before step r, b_r elements
    compared less. Step r moves the element at position b_r to position r-1 and puts the processed
    element at b_r. So a less-than element stays at its rank b_r; any other element processed at
    step r < n lands at position r at step r+1, and from a position p it moves on to
    g(p) = first(p) - 1, where first(p) is the first step with b == p, as long as that step exists
    (the last processed element stays at b_n). The final positions are the fixed points of g,
    found by pointer doubling.

    When the selection goes on to the left (num_lt >= index, relative to the slice without the
    pivot), nothing right of the pivot is ever read again nor returned, so those elements are
    left in any order.
    """
    w = v[lo:hi]
    n = w.shape[0]
    order = np.concatenate([w[1:], w[:1]])
    k = keys[order]
    lt = k <= pivot_key if or_equal else k < pivot_key
    lt_at = np.flatnonzero(lt)
    num_lt = int(lt_at.size)
    out = np.empty_like(w)
    # rank of each less-than element = its index among them
    out[:num_lt] = order[lt_at]
    ge = ~lt
    if num_lt >= index:
        out[num_lt:] = order[ge]
        v[lo:hi] = out
        return num_lt
    first = np.full(n, n + 1, dtype=np.int64)
    first[0] = 1
    m = min(num_lt, n - 1)
    first[1:m + 1] = lt_at[:m] + 2  # b reaches p right after the p-th less-than element
    positions = np.arange(n)
    g = np.where(first <= n, first - 1, positions)
    while True:
        g2 = g[g]
        if np.array_equal(g2, g):
            break
        g = g2
    ge_at = np.flatnonzero(ge)
    landing = g[np.minimum(ge_at + 1, n - 1)]
    if ge[n - 1]:
        landing[-1] = num_lt  # the last processed element (the first of the slice) stays at b_n
    out[landing] = order[ge_at]
    v[lo:hi] = out
    return num_lt


def select_nth_unstable_desc(prs: np.ndarray, k: int, vector_min: int = _VECTOR_MIN) -> np.ndarray:
    """Indices after `idx.select_nth_unstable_by(k, |&i, &j| prs[j].total_cmp(&prs[i]))`.

    `vector_min` only chooses how partitions are computed (numpy above it, a plain loop below);
    the result never depends on it.
    """
    keys = -total_order_keys(prs)  # is_less(i, j) == prs[i] > prs[j]  ==  keys[i] < keys[j]
    return _Select(keys, vector_min).run(k)


# --- WeightedIndex<f32> --------------------------------------------------------------------------

_MAX_RAND = np.float32(1.0) - np.float32(2.0 ** -23)


@dataclass(frozen=True)
class WeightedDraw:
    """One `WeightedIndex<f32>` draw: the chosen position, the draw, and the bounds around it."""

    index: int
    x: float  # the uniform draw scaled to [0, total)
    lower: float | None  # cumulative weight where the chosen position starts (None for the first: fixed at 0)
    upper: float | None  # cumulative weight where it ends (None for the last: fixed at the total)
    total: float

    def boundaries(self) -> list[float]:
        """The decision boundaries around the draw that other weights could move."""
        return [b for b in (self.lower, self.upper) if b is not None]

    @property
    def margin(self) -> float:
        """Distance of the draw from the nearest movable boundary, in weight units (inf: none)."""
        return min((abs(self.x - b) for b in self.boundaries()), default=math.inf)


def weighted_index(weights: np.ndarray, word: int) -> WeightedDraw:
    """rand 0.9 `WeightedIndex::<f32>::new(weights)` then `sample` with the u32 `word`."""
    w = np.asarray(weights, dtype=np.float32)
    if w.size == 0:
        raise XBackendError("candle's WeightedIndex got no weights (top-k 0)",
                            fix="use a top-k of at least 1; the Rust app fails the same way")
    if not (w >= 0).all():
        raise XBackendError("candle's WeightedIndex got a negative or NaN probability",
                            asked="the logits hold NaN or the temperature is not positive",
                            fix="check the logits; the Rust app fails the same way")
    cum = np.cumsum(w, dtype=np.float32)
    total = cum[-1]
    if not total > 0:
        raise XBackendError("candle's WeightedIndex got only zero weights", fix="check the logits")
    if not np.isfinite(total):
        raise XBackendError("candle's WeightedIndex total is not finite", fix="check the logits")
    scale = total  # UniformFloat::new(0, total): shrink while scale * max_rand + 0 > total
    while scale * _MAX_RAND + np.float32(0.0) > total:
        scale = np.nextafter(scale, np.float32(0.0))
    u = np.array([(word >> 9) | 0x3F800000], dtype=np.uint32).view(np.float32)[0] - np.float32(1.0)
    x = u * scale + np.float32(0.0)
    bounds = cum[:-1]
    index = int(np.searchsorted(bounds, x, side="right"))
    lower = float(bounds[index - 1]) if index > 0 else None
    upper = float(bounds[index]) if index < bounds.size else None
    return WeightedDraw(index, float(x), lower, upper, float(total))


# --- the sampler ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandleDecision:
    """One decision of candle's sampler and how close it came to going another way.

    `margin` is the distance of the draw from the nearest cumulative boundary between candidates,
    in probability units (inf when there is no other candidate); `margin_ulps` counts it in float32
    ulps of that boundary: a decision within a few ulps can flip on another platform's softmax
    (Apple's `expf`, GPU kernels). `logit_margin` turns it into logit units: a drift of every logit
    by at most d can move the boundary fraction F = B/total by about 2 F (1-F) (2d/T), so the
    decision can flip only if 2 d >= logit_margin (first order), the rule trace margins follow.
    """

    token: int
    position: int  # position in the top-k partition order (the token itself for whole-vocabulary draws)
    k: int  # weights drawn over
    word: int  # the RNG word used
    index: int  # which word of the stream (decision number)
    draw: float
    margin: float
    margin_ulps: float
    logit_margin: float
    probability: float  # the chosen token's weight (probability, times exp(pad_mult) for the pad)

    @property
    def fragile(self) -> bool:
        """Within a few ulps: another libm or kernel could have decided otherwise."""
        return self.margin_ulps <= FRAGILE_ULPS

    def to_dict(self) -> dict:
        def num(x: float):
            return x if math.isfinite(x) else None

        return {"token": self.token, "position": self.position, "k": self.k, "rng_index": self.index,
                "draw": self.draw, "margin": num(self.margin), "margin_ulps": num(self.margin_ulps),
                "logit_margin": num(self.logit_margin), "probability": self.probability, "fragile": self.fragile}


FRAGILE_ULPS = 4.0


def _margins(d: WeightedDraw, temperature: float) -> tuple[float, float, float]:
    """(margin, margin in ulps of the boundary, margin in logit units) of a draw."""
    best = (math.inf, math.inf, math.inf)
    for b in d.boundaries():
        dist = abs(d.x - b)
        ulps = dist / float(np.spacing(np.float32(max(b, d.x, 1e-45))))
        f = b / d.total
        spread = 2.0 * f * (1.0 - f)
        logit = temperature * (dist / d.total) / spread if spread > 0 else math.inf
        if dist < best[0]:
            best = (dist, ulps, logit)
    return best


class CandleSampler:
    """candle's `LogitsProcessor` with `Sampling::TopK {k, temperature}`, one RNG stream per instance.

    `pad_mult` reproduces moshi-backend's text sampler (`prs[pad_token] *= exp(pad_mult)` after the
    softmax). Each decision consumes exactly one word of the stream, as candle does; `decide(logits,
    index=i)` takes decision i directly (word i), which a replay uses to line up with the app.
    """

    def __init__(self, seed: int, top_k: int, temperature: float, pad_mult: float | None = None,
                 pad_token: int = TEXT_PADDING_ID):
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise XBackendError(f"candle's TopK needs top_k >= 1, got {top_k!r}",
                                asked="Rust's select_nth_unstable_by(0) leaves no candidates and "
                                      "WeightedIndex fails", fix="pass a top-k of at least 1")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
                or not math.isfinite(float(temperature)) or not temperature > 0:
            raise XBackendError(f"candle's TopK needs a positive finite temperature, got {temperature!r}",
                                asked="candle divides the logits by it; 0 gives NaN probabilities",
                                fix="pass a temperature above 0")
        if pad_mult is not None and not math.isfinite(float(pad_mult)):
            raise XBackendError(f"pad_mult must be a finite number, got {pad_mult!r}")
        self.rng = StdRng(seed)
        self.seed = self.rng.seed
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self.pad_mult = None if pad_mult is None else float(pad_mult)
        self.pad_token = int(pad_token)
        self.last: CandleDecision | None = None

    @property
    def position(self) -> int:
        """How many decisions (RNG words) this sampler has used."""
        return self.rng.position

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The f32 weights candle draws from, before the top-k cut (pad_mult applied)."""
        v = np.asarray(logits)
        if v.ndim != 1 or v.size == 0:
            raise XBackendError(f"candle's sampler takes one non-empty logits vector, got shape {list(v.shape)}")
        prs = softmax_f32(v, self.temperature)
        if self.pad_mult is not None and 0 <= self.pad_token < prs.size:
            prs[self.pad_token] *= expf(np.float32(self.pad_mult))
        return prs

    def decide(self, logits: np.ndarray, index: int | None = None) -> CandleDecision:
        """Decision `index` (default: the next one) on `logits`; the stream continues after it."""
        prs = self.probabilities(logits)
        i = self.rng.position if index is None else int(index)
        if i < 0:
            raise XBackendError(f"A decision index must be >= 0, got {index}")
        word = self.rng.word(i)
        if self.top_k >= prs.size:
            d = weighted_index(prs, word)
            token, order_k = d.index, prs.size
        else:
            order = select_nth_unstable_desc(prs, self.top_k)[:self.top_k]
            d = weighted_index(prs[order], word)
            token, order_k = int(order[d.index]), self.top_k
        self.rng.position = i + 1
        margin, ulps, logit = _margins(d, self.temperature)
        self.last = CandleDecision(token=token, position=d.index, k=order_k, word=word, index=i, draw=d.x,
                                   margin=margin, margin_ulps=ulps, logit_margin=logit,
                                   probability=float(prs[token]))
        return self.last

    def sample(self, logits: np.ndarray) -> int:
        """candle's `LogitsProcessor::sample`: the next token for `logits`."""
        return self.decide(logits).token

    def describe(self) -> dict:
        out = {"algorithm": ALGORITHM, "rng": RNG, "seed": self.seed, "top_k": self.top_k,
               "temperature": self.temperature}
        if self.pad_mult is not None:
            out.update(pad_mult=self.pad_mult, pad_token=self.pad_token)
        return out


def rng_word_index(step: int, stream: int, dep_q: int) -> int:
    """Which word of its processor's RNG stream the decision of (`step`, `stream`) uses in the Rust Moshi stack:
    text word `step` for the text stream (0), audio word `step * dep_q + stream - 1` for audio stream `stream`."""
    return step if stream == 0 else step * dep_q + stream - 1


class CandleStreams:
    """The Rust Moshi stack's two processors: one for text, one shared by the depformer slices.

    moshi-core samples the text token once per step, then one token per depformer slice with the
    audio processor (lm_generate_multistream.rs `step_`, lm.rs `DepFormer::sample`), so the text
    decision of step s uses text word s and audio stream c (1-based) uses audio word
    s * dep_q + c - 1.
    """

    def __init__(self, text_seed: int, audio_seed: int, settings, dep_q: int | None = None,
                 pad_token: int = TEXT_PADDING_ID, pad_mult: float | None = None):
        self.text = CandleSampler(text_seed, settings.top_k_text, settings.temp_text, pad_mult, pad_token)
        self.audio = CandleSampler(audio_seed, settings.top_k_audio, settings.temp_audio)
        self.dep_q = dep_q

    def word_index(self, step: int, stream: int) -> int:
        if stream and self.dep_q is None:
            return self.audio.position  # in call order
        return rng_word_index(step, stream, self.dep_q)

    def decide(self, step: int, stream: int, logits: np.ndarray) -> CandleDecision:
        sampler = self.text if stream == 0 else self.audio
        return sampler.decide(logits, self.word_index(step, stream))

    def describe(self) -> dict:
        out = {"algorithm": ALGORITHM, "rng": RNG, "identity": IDENTITY, "text_seed": self.text.seed,
               "audio_seed": self.audio.seed}
        if self.text.pad_mult is not None:
            out.update(pad_mult=self.text.pad_mult, pad_token=self.text.pad_token)
        return out
