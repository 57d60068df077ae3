"""Tolerances: how far logits may move before a difference needs attention.

Two tables, one per question:

- `TOLERANCES` (compare, diff): a healthy backend against an fp32 reference of the same weights,
  per-step max |Δlogit|. Comparing two tiers uses the looser of the two (`tolerance(a, b)`).
- `CHECK_TOLERANCES` (check): a backend against *its own* baseline on the same kind of machine,
  so far tighter. A TOML file (`load_tolerances`) overrides them tier by tier.

| tier | compare | why | check | why |
| --- | --- | --- | --- | --- |
| fp64 | 1e-5 | computed in float64, but upstream casts logits to float32 before sampling, which is what traces keep: one float32 ulp at abs(logit) ~ 20 is 2e-6 | 4e-6 | two float32 ulps at abs(logit) ~ 20 |
| fp32 | 1e-3 | measured ~1e-6 (tiny model); 7B depth and width grow it, see below | 1e-5 | same kernels give 0; another BLAS build, thread count or CPU generation reorders sums by a few ulps of logits ~±10 (1e-6) |
| fp16 | 0.25 | unit roundoff 4.9e-4 (2^13 x fp32's); logits near 20 sit 0.016 apart, and the rounding of every activation adds up over the layers | 4e-3 | about 8 half-precision ulps of a logit near 1 |
| bf16 | 1.0 | unit roundoff 3.9e-3 (8 x fp16's); logits in [16, 32) sit 0.125 apart; measured on the tiny model: MLX bf16 vs fp32 up to 0.72, PyTorch CPU bf16 up to ~0.77 | 1.6e-2 | about 2 bf16 ulps of a logit near 1 |
| q8 | 2.0 | int8 weights: a different (quantized) model; measured on the tiny model (only its depformer quantizes) 0.26 against fp32, and a 7B model quantized throughout shifts more | 5e-2 | rounding inside dequantization may reorder |
| q4 | 8.0 | 4-bit group-quantized weights move logits by whole units (tiny model, MLX q4 vs fp32: p99 4.1, max 5.2): gross errors only | 2e-1 | coarse, only real changes should trip it |

fp32 (compare): same weights on the tiny model measured CPU vs MLX ~2e-6 and CPU vs CUDA ~1e-6.
A 7B Moshi has 32 layers of width 4096 and logits of ±20, whose fp32 spacing alone is 2e-6, so
its healthy cross-backend drift is expected 10-100x larger; 1e-3 keeps such runs inside while
the semantic rule (100 x tolerance = 0.1 logit) still catches the ~1 logit of wrong weights,
config or alignment.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import XBackendError
from .spec import tier_name

TOLERANCES: dict[str, float] = {"fp64": 1e-5, "fp32": 1e-3, "fp16": 0.25, "bf16": 1.0, "q8": 2.0, "q4": 8.0}
CHECK_TOLERANCES: dict[str, float] = {"fp64": 4e-6, "fp32": 1e-5, "fp16": 4e-3, "bf16": 1.6e-2, "q8": 5e-2,
                                      "q4": 2e-1}

# The semantic threshold (docs/design.md, What the sampler sees): a decision's sampler-visible
# |Δlogit| is over it when the tier's numerics cannot give it, broad or concentrated:
GROSS = 2.0  # broad: visible > GROSS x tolerance (healthy: visible <= max|Δlogit| <= tolerance)
CONCENTRATED = 8.0  # concentrated: the most changed token > CONCENTRATED x the step's robust noise ...
CONCENTRATED_SHARE = 0.25  # ... with visible > this share of the tolerance. Healthy pairs of the bundled model, 200
#   steps: where visible > tolerance / 4, the most changed token is at most 4.1x the noise (mlx:q4; cpu:bf16 3.8,
#   mlx:cpu:bf16 2.8, cpu:fp16 1.8, mlx:q8 never there); ungated, 8.7x once (mlx:cpu:bf16, one text token near 8.6 moved two
#   bf16 ulps, visible 0.08 of its tolerance of 1). docs/design.md, What the sampler sees, has the table.
NOISE_FLOOR = 0.01  # the step noise is floored at this share of the tolerance (fp32 rows whose Δ is mostly 0)


def over_threshold(visible: np.ndarray, deviation: np.ndarray, noise: np.ndarray, tol: float,
                   run_to_run: float | None = None) -> np.ndarray:
    """Decisions whose sampler-visible distance the tier's numerics cannot explain (NaN counts as over).

    `tol` is the tier's tolerance, `run_to_run` the largest drift between repeats of either backend:
    over when the sampler-visible |Δlogit| is broad (beyond GROSS x the larger of the two), or
    concentrated: the most changed token's deviation beyond CONCENTRATED x the step's own noise,
    with the visible |Δlogit| beyond CONCENTRATED_SHARE x the tolerance and GROSS x the run-to-run
    drift (which kernels may put on any token)."""
    visible = np.where(np.isnan(visible), np.inf, visible)
    deviation = np.where(np.isnan(deviation), np.inf, deviation)
    rr = run_to_run or 0.0
    return (visible > GROSS * max(tol, rr)) | (
        (deviation > CONCENTRATED * np.maximum(noise, NOISE_FLOOR * tol))
        & (visible > max(CONCENTRATED_SHARE * tol, GROSS * rr)))


def tier_of(trace) -> str:
    """A trace's (or a trace meta dict's) tolerance tier: its quantization if any, else its dtype (fp32 when unrecorded)."""
    meta = getattr(trace, "meta", trace)
    spec = meta.get("spec") or {}
    return tier_name(spec.get("dtype"), spec.get("quant"))


def tolerance(tier_a: str, tier_b: str = "fp32", overrides: dict[str, float] | None = None) -> float:
    """The max |Δlogit| allowed between two tiers: the looser of the two (`overrides` replace `TOLERANCES` entries)."""
    table = {**TOLERANCES, **(overrides or {})}
    for tier in (tier_a, tier_b):
        if tier not in table:
            raise XBackendError(f"No tolerance for tier {tier!r}", asked=f"known tiers are {', '.join(table)}",
                                fix=f"add `{tier} = ...` under [tolerances]")
    return max(table[tier_a], table[tier_b])


TOLERANCES_EXAMPLE = "[tolerances] then one line per tier, e.g. fp32 = 1e-5"


def tolerance_table(data: dict, path, defaults: dict[str, float] = CHECK_TOLERANCES) -> dict[str, float]:
    """`defaults` with the `[tolerances]` table of a parsed TOML file on top (tiers only, non-negative numbers)."""
    example = TOLERANCES_EXAMPLE
    for key in data:
        if key != "tolerances":
            raise XBackendError(f"Unknown key {key!r} in tolerances file {path}",
                                asked="the file has one table, [tolerances]", fix=f"write {example}")
    table = data.get("tolerances", {})
    if not isinstance(table, dict):
        raise XBackendError(f"'tolerances' in {path} is not a table", fix=f"write {example}")
    out = dict(defaults)
    for key, value in table.items():
        if key not in defaults:
            raise XBackendError(f"Unknown key {key!r} in tolerances file {path}",
                                asked=f"tiers are {', '.join(defaults)}", fix=f"write {example}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e300 \
                or not math.isfinite(value):
            raise XBackendError(f"Tolerance {key!r} in {path} is {value!r}, not a non-negative number",
                                fix=f"write a number, e.g. {key} = {defaults[key]:g}")
        out[key] = float(value)
    return out
