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

import numpy as np

from ..errors import XBackendError
from ..streams import TEXT_PADDING_ID
from .candle_rng import StdRng, chacha12_blocks, pcg32_key  # noqa: F401 (re-exported)
from .candle_select import select_nth_unstable_desc, total_order_keys  # noqa: F401 (re-exported)

ALGORITHM = "candle TopK WeightedIndex"
RNG = "StdRng ChaCha12 seeded by PCG32 from u64"
IDENTITY = {"algorithm": ALGORITHM, "rng": RNG}  # what decides a token: two runs share a sampler when both agree

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
