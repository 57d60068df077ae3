"""rand's `StdRng` as candle seeds it: ChaCha12 (rand_chacha), key from rand_core's PCG32 `seed_from_u64`.
Part of `samplers.candle`: decision i of a sampler uses word i of its stream."""

from __future__ import annotations

import numpy as np

from ..errors import XBackendError

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
