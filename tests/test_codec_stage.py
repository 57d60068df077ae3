"""The codec stage's pure comparisons and verdict rules, on arrays made here (no codec runs)."""

import numpy as np
import pytest

from xbackend.codecs.stage import (CODEC_TOLERANCES, MISMATCH_FACTOR, codec_tolerance, compare_audio, compare_codes,
                                  exit_code, snr_db, verdict)
from xbackend.codecs.base import FRAME_SIZE
from xbackend.errors import XBackendError

TOL = CODEC_TOLERANCES["fp32"]


def audio(frames: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(frames * FRAME_SIZE).astype(np.float32) * 0.1


def test_compare_codes_names_first_frame_and_codebook():
    ref = np.arange(40).reshape(4, 10) % 7
    other = ref.copy()
    other[2, 6] += 1
    other[1, 8] += 1
    c = compare_codes(ref, other)
    assert c["first"] == {"frame": 6, "codebook": 2}
    assert c["disagreement"] == pytest.approx(2 / 40)
    assert [cb["first_frame"] for cb in c["codebooks"]] == [None, 8, 6, None]
    assert c["codebooks"][1]["agreement"] == pytest.approx(0.9)
    assert compare_codes(ref, ref)["identical"] and compare_codes(ref, ref)["first"] is None


def test_compare_audio_first_frame_above_tolerance_and_snr():
    ref = audio()
    other = ref.copy()
    rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    other[3 * FRAME_SIZE + 5] += 3e-6 * rms  # below tolerance
    other[6 * FRAME_SIZE + 100] += 2e-5 * rms  # above tolerance (1e-5)
    a = compare_audio(ref, other, TOL["audio"])
    assert a["first_frame_above_tolerance"] == 6 and a["frames_above_tolerance"] == 1
    assert a["first_frame_far_above"] is None
    assert a["max_rel"] == pytest.approx(2e-5, rel=1e-3)
    assert a["snr_db"] > 100
    assert snr_db(ref, ref) is None and compare_audio(ref, ref, 1e-5)["identical"]
    assert snr_db(ref, -ref) == pytest.approx(-6.02, abs=0.01)  # a sign flip: Δ = 2·ref


def test_verdict_rules_in_order():
    ref, codes = audio(), np.arange(80).reshape(8, 10) % 5
    same = {"one-shot": compare_codes(codes, codes)}
    drift = ref + np.float32(1e-9)
    v = verdict("b", "a", same, {"one-shot": compare_audio(ref, ref.copy(), 1e-5)}, TOL)
    assert v["verdict"] == "IDENTICAL" and v["figures"]["within_tolerance"]
    v = verdict("b", "a", same, {"one-shot": compare_audio(ref, drift, 1e-5)}, TOL)
    assert v["verdict"] == "NUMERIC_DRIFT" and v["figures"]["within_tolerance"] and v["first_divergence"] is None
    flipped = ref.copy()
    flipped[4 * FRAME_SIZE:] *= -1  # a sign flip from frame 4 on: far beyond any drift
    v = verdict("b", "a", same, {"one-shot": compare_audio(ref, flipped, 1e-5)}, TOL)
    assert v["verdict"] == "MISMATCH" and v["first_divergence"]["frame"] == 4
    other = codes.copy()
    other[5, 7] += 1
    v = verdict("b", "a", {"streaming": compare_codes(codes, other)}, {"one-shot": compare_audio(ref, drift, 1e-5)}, TOL)
    assert v["verdict"] == "CODE_DIVERGENCE"
    assert v["first_divergence"] == {"frame": 7, "codebook": 5, "path": "streaming", "what": "codes"}
    assert not v["figures"]["within_tolerance"]  # 1 of 80 codes is 1.25% > 0.5%
    v = verdict("b", "a", {}, {}, TOL, failure="crashed")
    assert v["verdict"] == "FAILED" and not v["figures"]["within_tolerance"]


def test_mismatch_threshold_is_the_factor_times_the_tolerance():
    ref = audio()
    rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    below, above = ref.copy(), ref.copy()
    below[2 * FRAME_SIZE] += 0.5 * MISMATCH_FACTOR * TOL["audio"] * rms
    above[2 * FRAME_SIZE] += 2.0 * MISMATCH_FACTOR * TOL["audio"] * rms
    codes = {"one-shot": compare_codes(np.zeros((8, 10), int), np.zeros((8, 10), int))}
    assert verdict("b", "a", codes, {"one-shot": compare_audio(ref, below, TOL["audio"])}, TOL)["verdict"] == "NUMERIC_DRIFT"
    assert verdict("b", "a", codes, {"one-shot": compare_audio(ref, above, TOL["audio"])}, TOL)["verdict"] == "MISMATCH"


def test_tolerance_is_the_looser_tier_and_unknown_tiers_are_refused():
    assert codec_tolerance("fp32", "bf16") == CODEC_TOLERANCES["bf16"]
    with pytest.raises(XBackendError, match="tier"):
        codec_tolerance("fp32", "q4")


def test_exit_codes():
    ok = {"codecs": [{"status": "ok"}], "reference": "a", "streaming_consistency": [],
          "verdicts": [{"verdict": "NUMERIC_DRIFT", "figures": {"within_tolerance": True}}]}
    assert exit_code(ok) == 0
    assert exit_code({**ok, "verdicts": [{"verdict": "MISMATCH", "figures": {"within_tolerance": False}}]}) == 1
    assert exit_code({**ok, "streaming_consistency": [{"codec": "a", "within_tolerance": False}]}) == 1
    assert exit_code({**ok, "codecs": [{"status": "failed"}]}) == 3
