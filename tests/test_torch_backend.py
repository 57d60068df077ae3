"""The PyTorch backend on the CPU: repeatability, precision, upstream's golden numbers, layouts."""

import json

import numpy as np
import pytest

import xbackend
from xbackend.capture.models import resolve_model
from xbackend.tolerances import CHECK_TOLERANCES, tier_of, tolerance

from .helpers import PEER, needs_peer, needs_tiny, run

pytestmark = needs_tiny


def test_native_runs_are_bitwise_repeatable(tmp_path):
    a = run(tmp_path, "a", steps=50)
    b = run(tmp_path, "b", steps=50)
    assert a.steps == b.steps == 50
    assert a.digests == b.digests
    assert np.array_equal(a.tokens, b.tokens)
    assert a.meta["sampler"]["mode"] == "native" and np.isnan(a.margins).all()


def test_fp64_teacher_forced_matches_fp32(tmp_path):
    ref = run(tmp_path, "ref", steps=30)
    hi = run(tmp_path, "hi", backend="cpu:fp64", steps=30, sampler=f"forced:{ref.path}")
    assert np.array_equal(hi.tokens, ref.tokens)
    worst = max(np.abs(hi.logits(s).astype(np.float64) - ref.logits(s)).max() for s in ref.streams)
    assert 0 < worst <= tolerance("fp64", "fp32"), worst  # 1e-3; measured 2.0e-5 over 30 steps: 50x margin


def test_greedy_takes_the_argmax_and_records_its_margin(tmp_path):
    tr = run(tmp_path, "g", steps=8, sampler="greedy")
    for k, s in enumerate(tr.streams):
        logits = tr.logits(s)
        assert np.array_equal(tr.tokens[:, k], logits.argmax(axis=1))
        top2 = np.sort(logits, axis=1)[:, -2:]
        # not a tolerance: the same float32 subtraction, measured exact (0); rtol 1e-6 is ~8 float32 ulps,
        # and IEEE 754 rounds a subtraction the same way on every CPU
        np.testing.assert_allclose(tr.margins[:, k], top2[:, 1] - top2[:, 0], rtol=1e-6)


def test_portable_is_repeatable_and_differs_from_native(tmp_path):
    a = run(tmp_path, "a", steps=20, sampler="portable")
    b = run(tmp_path, "b", steps=20, sampler="portable")
    n = run(tmp_path, "n", steps=20)
    assert np.array_equal(a.tokens, b.tokens) and a.digests == b.digests
    assert not np.array_equal(a.tokens, n.tokens)
    assert (a.margins >= 0).all()


def test_forced_reproduces_the_reference_tokens(tmp_path):
    ref = run(tmp_path, "ref", steps=12)
    forced = run(tmp_path, "forced", steps=12, sampler=f"forced:{ref.path}")
    assert np.array_equal(forced.tokens, ref.tokens)
    assert forced.digests == ref.digests  # same backend, same inputs: bitwise equal logits


def test_aligned_feeding_passes_the_previous_frame(tmp_path):
    tr = run(tmp_path, "a", steps=6, sampler="greedy")
    up = run(tmp_path, "u", steps=6, sampler="greedy", alignment="upstream")
    assert np.array_equal(tr.inputs[1:], up.inputs[:-1])
    assert tr.meta["alignment"] == {"mode": "aligned", "consumes_late": False, "user_delays": [0] + [1] * 7}


def test_trace_records_settings_and_env(tmp_path):
    tr = run(tmp_path, "t", steps=2, seed=7)
    m = tr.meta
    assert m["seed"] == 7 and m["settings"] == {"temp_text": 0.7, "top_k_text": 25, "temp_audio": 0.8, "top_k_audio": 250}
    assert m["effective"]["torch_compile"] is False and m["effective"]["cuda_graphs"] is False
    assert m["env"]["versions"]["moshi"] == "0.2.13" and m["env"]["threads"] >= 1
    assert m["model"]["name"] == "tiny" and len(m["model"]["digest"]) == 16
    assert m["streams"] == ["text"] + [f"audio{i}" for i in range(8)]
    assert m["status"] == "complete" and m["ms_per_step"] > 0


def test_newer_per_step_layout_gives_identical_logits(tmp_path):
    """A local checkpoint saved with moshi's current keys (in_projs.N) loads like the published one."""
    import torch
    from moshi.models.loaders import get_moshi_lm
    from safetensors.torch import save_file

    tiny = resolve_model("tiny")
    lm = get_moshi_lm(tiny.weights, lm_kwargs=tiny.config, device="cpu", dtype=torch.float32)
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    assert any(".in_projs." in k for k in state)
    local = tmp_path / "local"
    local.mkdir()
    save_file(state, str(local / "model.safetensors"))
    (local / "config.json").write_text(json.dumps(tiny.config))
    assert resolve_model(str(local)).layout == "per_step"
    a = run(tmp_path, "a", steps=5, sampler="greedy")
    b = run(tmp_path, "b", steps=5, sampler="greedy", model=str(local))
    # Same values, but not bitwise: the published layout leaves per-step weights as slices of one
    # concatenated tensor (other memory alignment, other GEMM path); measured 1.5e-5, within the fp32
    # tolerance (1e-3, 65x margin): another GEMM path is a summation order, a few ulps on any CPU.
    assert np.array_equal(a.tokens, b.tokens)
    for s in a.streams:
        np.testing.assert_allclose(a.logits(s), b.logits(s), atol=tolerance("fp32"), rtol=0)


def test_bf16_runs_and_stays_close(tmp_path):
    ref = run(tmp_path, "ref", steps=10)
    lo = run(tmp_path, "lo", backend="cpu:bf16", steps=10, sampler=f"forced:{ref.path}")
    worst = max(np.abs(lo.logits(s) - ref.logits(s)).max() for s in ref.streams)
    assert 0 < worst < tolerance(tier_of(lo)), worst  # bf16 1.0; measured 0.47 over 10 steps: 2.1x margin


@needs_peer
def test_upstream_golden_logits_through_xbackend(tmp_path):
    """moshi's own tiny LM and golden forward pass (../shared/peer), reproduced step by step."""
    from safetensors.numpy import load_file

    golden = load_file(str(PEER / "test_lm_out.safetensors"))
    codes = load_file(str(PEER / "test_lm_codes.safetensors"))["codes"]
    delays = json.loads((PEER / "lm_kwargs.json").read_text())["delays"]
    # The same code on another machine: the check tier's fp32 bound (1e-5: another BLAS build, thread
    # count or CPU generation reorders sums by a few ulps). Measured 4.8e-7 here: 21x margin.
    atol = CHECK_TOLERANCES["fp32"]
    for b in range(codes.shape[0]):
        np.save(tmp_path / f"codes{b}.npy", codes[b])
        tr = run(tmp_path, f"g{b}", model=str(PEER / "test_lm_model.safetensors"),
                 model_config=str(PEER / "lm_kwargs.json"), sampler=f"forced:{tmp_path / f'codes{b}.npy'}",
                 steps=codes.shape[-1] + max(delays))
        checked = 0
        for t in range(codes.shape[-1]):
            if golden["text_mask"][b, 0, t]:
                np.testing.assert_allclose(tr.logits("text")[t + delays[0]], golden["text_logits"][b, 0, t], atol=atol, rtol=0)
                checked += 1
            for k in range(golden["logits"].shape[1]):
                if golden["mask"][b, k, t]:
                    np.testing.assert_allclose(tr.logits(f"audio{k}")[t + delays[1 + k]], golden["logits"][b, k, t],
                                               atol=atol, rtol=0)
                    checked += 1
        assert checked == 21  # every valid position of this batch item


def test_prompt_of_any_rate_and_channels(tmp_path):
    import soundfile as sf

    from xbackend.capture.prompt import load_prompt

    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1) * 0.3
    sf.write(str(tmp_path / "p.flac"), stereo, 44100)
    p = load_prompt(str(tmp_path / "p.flac"), resolve_model("tiny"), steps=30)
    assert p.codes.shape == (8, 30) and p.seconds == pytest.approx(2.0)
    assert len(np.unique(p.codes[0])) > 1
    np.save(tmp_path / "codes.npy", p.codes)
    assert p.own_frames == 25  # 2 s at 24 kHz is 25 frames; frames 25-29 are the silence fill
    again = load_prompt(str(tmp_path / "codes.npy"), resolve_model("tiny"), steps=30, frames=p.own_frames)
    assert np.array_equal(again.codes, p.codes) and again.digest == p.digest
    whole = load_prompt(str(tmp_path / "codes.npy"), resolve_model("tiny"), steps=30)  # a codes file is all prompt
    assert whole.digest != p.digest and whole.own_frames == 30


def test_a_zero_probability_native_pick_fails_the_backend(tmp_path, monkeypatch):
    """What MPS's exponential_ bug does to moshi's sampler (pytorch#192577): caught, not recorded as data."""
    import torch
    from moshi.models import lm as lm_module

    from xbackend import BackendFailed

    def broken(logits, use_sampling=False, temp=1.0, top_k=0, top_p=0.0):
        return torch.argmin(logits, dim=-1)  # a token outside the top-k: probability zero

    monkeypatch.setattr(lm_module, "sample_token", broken)
    with pytest.raises(BackendFailed, match="zero probability") as err:
        run(tmp_path, "z", steps=4)
    assert err.value.exit_code == 3 and "pytorch#192577" in str(err.value)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = xbackend.load_trace(tmp_path / "z")
    assert kept.steps == 0 and kept.meta["status"] == "failed"
    assert kept.meta["failed_at"] == {"step": 0, "stream": "text"}
