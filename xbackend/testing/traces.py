"""Synthetic traces for tests and benchmarks: real trace files, no model, numbers you choose.

`synthetic_trace` writes Moshi-shaped traces (a confident text stream, spread audio streams)
from a seeded generator, step by step, so that a 3,750-step 7B-vocabulary trace (~730 MB) never
sits in memory; `noise` adds seeded Gaussian drift on top of the same base logits, which is
how two "backends" of the same model are faked. `write_trace` writes exact arrays you give it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..streams import stream_names as _names
from ..samplers import DEFAULT_SEED, SAMPLER_IDENTITIES, Sampler, SamplingSettings
from ..store.trace import Trace, TraceWriter, load_trace, round_logits

MOSHI_7B_VOCAB = (32000,) + (2048,) * 8  # text_card 32000, dep_q 8 audio codebooks of 2048
SYNTHETIC_SEED = DEFAULT_SEED  # the trace's recorded run seed (capture's default)


def stream_names(n: int) -> list[str]:
    return _names(n - 1)


def default_meta(*, seed: int = SYNTHETIC_SEED, mode: str = "greedy", dtype: str = "fp32",
                 settings: SamplingSettings | None = None, **overrides) -> dict:
    """Metadata shaped like `capture`'s; `overrides` replace top-level keys."""
    meta = {
        "backend": f"synthetic:{dtype}", "library": "numpy",
        "spec": {"name": "synthetic", "device": None, "dtype": dtype, "quant": None},
        "model": {"name": "synthetic", "digest": "synthetic-model"},
        "prompt": {"source": "synthetic", "kind": "codes", "digest": "synthetic-prompt"},
        "seed": seed, "sampler": {"mode": mode, "seed": seed, "identity": SAMPLER_IDENTITIES.get(mode)},
        "settings": (settings or SamplingSettings()).to_dict(),
        "alignment": {"mode": "aligned"},
    }
    meta.update(overrides)
    return meta


def greedy_margins(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax tokens and top-1 minus top-2 margins of `[n, vocab]` rows, vectorised."""
    rows = np.asarray(rows, dtype=np.float64)
    idx = np.arange(rows.shape[0])
    tok = rows.argmax(axis=1)
    best = rows[idx, tok]
    if rows.shape[1] < 2:
        return tok, np.full(rows.shape[0], np.inf)
    rest = rows.copy()
    rest[idx, tok] = -np.inf
    return tok, best - rest.max(axis=1)


def write_trace(path: str | Path, logits: Sequence[np.ndarray], *, tokens: np.ndarray | None = None,
                margins: np.ndarray | None = None, meta: dict | None = None, streams: list[str] | None = None,
                logits_dtype: str = "float32", close: bool = True) -> Trace | None:
    """Write exact `[steps, vocab]` arrays (one per stream) as a trace; greedy tokens if none given."""
    logits = [np.asarray(x) for x in logits]
    steps = logits[0].shape[0]
    streams = streams or stream_names(len(logits))
    if tokens is None or margins is None:
        pairs = [greedy_margins(round_logits(x, logits_dtype)) for x in logits]
        tokens = np.stack([t for t, _ in pairs], axis=1) if tokens is None else tokens
        margins = np.stack([m for _, m in pairs], axis=1) if margins is None else margins
    writer = TraceWriter(Path(path), meta if meta is not None else default_meta(), streams,
                         [int(x.shape[1]) for x in logits], n_inputs=0, logits_dtype=logits_dtype)
    for s in range(steps):
        writer.write_step([x[s] for x in logits], [int(t) for t in tokens[s]], [float(m) for m in margins[s]],
                          np.zeros(0, dtype=np.int32))
    if not close:
        return None
    writer.close()
    return load_trace(path)


def _base_logits(rng: np.random.Generator, vocab: int, text: bool) -> np.ndarray:
    """Trained-looking logits: text has a few clear favourites, audio is moderately spread."""
    z = rng.standard_normal(vocab, dtype=np.float32)
    if text:
        z *= 2.0
        z[rng.integers(0, vocab, 3)] += np.float32(9.0)
    else:
        z *= 1.5
    return z


def synthetic_trace(path: str | Path, *, steps: int, vocab: Sequence[int] = MOSHI_7B_VOCAB, seed: int = 0,
                    noise: float = 0.0, noise_seed: int | None = None, sampler: str = "greedy",
                    meta: dict | None = None, logits_dtype: str = "float32",
                    edit: Callable[[int, int, np.ndarray], np.ndarray] | None = None,
                    close: bool = True) -> Trace | None:
    """Write a trace whose logits are the base logits of `seed` plus `noise` * N(0, 1).

    Two traces with the same `seed` and different `noise_seed` differ only by that drift.
    `sampler` is `greedy` (vectorised, fast) or `portable` (the real portable sampler, slower);
    `edit(step, stream, logits)` may change one row before it is written (tests plant
    perturbations that way); `close=False` leaves the trace as a killed run leaves it.
    """
    if sampler not in ("greedy", "portable"):
        raise ValueError(f"synthetic traces sample greedy or portable, not {sampler!r}")
    settings = SamplingSettings.from_meta(meta or {})
    meta = meta if meta is not None else default_meta(mode=sampler)
    picker = Sampler(sampler, int(meta.get("seed", SYNTHETIC_SEED)), settings)
    streams = stream_names(len(vocab))
    writer = TraceWriter(Path(path), meta, streams, list(vocab), n_inputs=0, logits_dtype=logits_dtype)
    for s in range(steps):
        base = np.random.default_rng([seed, s])
        drift = np.random.default_rng([seed if noise_seed is None else noise_seed, s, 1])
        rows = []
        for k, v in enumerate(vocab):
            z = _base_logits(base, v, k == 0)
            if noise:
                z = z + np.float32(noise) * drift.standard_normal(v, dtype=np.float32)
            if edit is not None:
                z = np.asarray(edit(s, k, z.copy()))
            rows.append(round_logits(z, logits_dtype))
        if sampler == "greedy":
            decisions = [greedy_margins(r[None, :]) for r in rows]
            tokens = [int(t[0]) for t, _ in decisions]
            margins = [float(m[0]) for _, m in decisions]
        else:
            decisions = [picker.decide(s, k, r) for k, r in enumerate(rows)]
            tokens = [d.token for d in decisions]
            margins = [d.margin for d in decisions]
        writer.write_step(rows, tokens, margins, np.zeros(0, dtype=np.int32))
    if not close:
        return None
    writer.close()
    return load_trace(path)
