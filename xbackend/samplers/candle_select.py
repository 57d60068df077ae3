"""Rust's `select_nth_unstable_by` (introselect), exactly: the order candle's TopK leaves the k most probable
tokens in (`core/src/slice/sort/select.rs` with the ipnsort pivot and the branchless cyclic Lomuto partition of
`sort/unstable/quicksort.rs`, Rust 1.81 and later); large partitions are computed with numpy through the closed
form of where the cyclic Lomuto partition moves each element. Part of `samplers.candle`."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

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
