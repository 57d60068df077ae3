"""Reference distributions for sampler tests."""

from __future__ import annotations

import numpy as np

from ..samplers import effective_top_k


def tempered_probs(logits: np.ndarray, temp: float, top_k: int) -> np.ndarray:
    """The distribution a top-k/temperature sampler draws from (float64)."""
    z = logits.astype(np.float64)
    if temp <= 0:
        p = np.zeros_like(z)
        p[np.argmax(z)] = 1.0
        return p
    z = z / temp
    v = z.shape[-1]
    k = effective_top_k(top_k, v)
    kth = np.partition(z, v - k)[v - k]
    z = np.where(z >= kth, z, -np.inf)
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()
