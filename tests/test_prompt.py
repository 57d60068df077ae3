"""A prompt is one input whatever `--steps` is (issue 18): audio is encoded frame by frame by the
streaming encoder, as upstream feeds Moshi, and continued with silence past its end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xbackend.codecs.base import FRAME_SIZE
from xbackend.analysis.diff import prompt_frames
from xbackend.capture.models import REFERENCE, codec_for, resolve_model
from xbackend.capture.prompt import load_prompt, read_audio

from .helpers import assert_clean_error, hardware, needs_tiny, run, run_cli, unavailable

PROMPTS = sorted((REFERENCE / "prompts").glob("*.wav"))
STEPS = (20, 45, 100, 200)


def test_every_bundled_prompt_is_listed():
    assert PROMPTS, "no bundled prompt found under reference/prompts"


@needs_tiny
@pytest.mark.parametrize("prompt", PROMPTS, ids=[p.name for p in PROMPTS])
def test_codes_equal_upstreams_streaming_encoder(prompt):
    """The codes are what moshi's own streaming path gives (run_inference.py: `mimi.streaming`, one
    1920-sample frame a call, silence after the file); the old one-call encoding of the padded clip
    differed from it at frame 52 of 200 on the bundled prompt."""
    import torch
    from moshi.models.loaders import get_mimi

    model = resolve_model("tiny")
    ref = codec_for(model, model.n_user, same_bins=False)
    audio = read_audio(prompt)
    padded = np.zeros(200 * FRAME_SIZE, dtype=np.float32)
    padded[: audio.shape[0]] = audio
    mimi = get_mimi(ref.weights, ref.config, device="cpu", num_codebooks=model.n_user)
    with torch.no_grad(), mimi.streaming(1):
        upstream = np.concatenate([mimi.encode(torch.tensor(padded[t * FRAME_SIZE:(t + 1) * FRAME_SIZE]).view(1, 1, -1))[0]
                                   .numpy() for t in range(200)], axis=1)
    got = load_prompt(str(prompt), model, 200)
    assert got.codes.shape == (model.n_user, 200)
    np.testing.assert_array_equal(got.codes, upstream)
    assert got.own_frames == -(-audio.shape[0] // FRAME_SIZE)


@needs_tiny
@pytest.mark.parametrize("prompt", PROMPTS, ids=[p.name for p in PROMPTS])
def test_prompt_codes_and_digest_do_not_depend_on_steps(prompt):
    model = resolve_model("tiny")
    loaded = {n: load_prompt(str(prompt), model, n) for n in STEPS}
    longest = loaded[max(STEPS)].codes
    for n, p in loaded.items():
        assert p.codes.shape[1] == max(n, p.own_frames)
        np.testing.assert_array_equal(p.codes, longest[:, :p.codes.shape[1]])
        assert p.digest == loaded[STEPS[0]].digest, n  # the digest of the prompt's own codes
        assert p.describe()["frames"] == p.own_frames and p.describe()["fed_frames"] == p.codes.shape[1]


@needs_tiny
@pytest.mark.parametrize("backend", [pytest.param(b, marks=hardware(b)) for b in ("cpu", "mlx:cpu")])
@pytest.mark.parametrize("prompt", PROMPTS, ids=[p.name for p in PROMPTS])
def test_captures_of_any_length_get_equal_inputs(tmp_path, backend, prompt):
    """Captures of 20, 45, 100 and 200 steps are fed equal inputs on their common prefix (issue 18:
    100 and 200 steps differed at frames 26 and 52), on PyTorch and MLX alike."""
    if unavailable(backend):
        pytest.skip(unavailable(backend))
    traces = {n: run(tmp_path, f"{n}", backend=backend, prompt=str(prompt), steps=n, sampler="greedy") for n in STEPS}
    longest = prompt_frames(traces[max(STEPS)])
    for n, t in traces.items():
        mine = prompt_frames(t)
        assert len(mine) >= n - 1
        np.testing.assert_array_equal(mine, longest[:len(mine)])
        assert t.meta["prompt"]["digest"] == traces[STEPS[0]].meta["prompt"]["digest"]
        assert t.meta["prompt"]["encoding"] == "streaming"


@needs_tiny
def test_different_steps_diff_on_their_common_prefix(tmp_path):
    """`diff` of a 30- and a 45-step capture compares their 30 common steps (it was refused)."""
    a = run(tmp_path, "a", steps=30, sampler="greedy")
    b = run(tmp_path, "b", steps=45, sampler="greedy")
    proc = run_cli("diff", str(a.path), str(b.path), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["steps_common"] == 30 and result["steps_compared"] == 30, result
    assert result["logits_identical"] is True and result["tokens_identical"] is True, result


@needs_tiny
def test_check_run_names_the_step_count(tmp_path):
    """A run of other --steps than its baseline is refused for its step count, not for its prompt."""
    base, other = tmp_path / "base", tmp_path / "other"
    common = ("--backends", "cpu,cpu", "--repeats", "1")
    assert run_cli("baseline", "create", *common, "--steps", "16", "--out", str(base)).returncode == 0
    assert run_cli("compare", *common, "--steps", "40", "--arbiter", "none", "--out", str(other)).returncode in (0, 1)
    baseline, report = json.loads((base / "baseline.json").read_text()), json.loads((other / "report.json").read_text())
    assert baseline["prompt"]["digest"] == report["request"]["prompt"]["digest"]
    assert baseline["prompt"]["frames"] == report["request"]["prompt"]["frames"] == 24
    proc = run_cli("check", "--baseline", str(base), "--run", str(other))
    assert_clean_error(proc, 2, "its steps is 40, the baseline's 16")
    assert "digest" not in proc.stderr
    rerun = run_cli("check", "--baseline", str(base), "--out", str(tmp_path / "rerun"))
    assert rerun.returncode == 0, rerun.stderr  # the rerun from prompt_codes.npy keeps the prompt's digest
    rerun_report = json.loads((tmp_path / "rerun" / "report.json").read_text())
    assert rerun_report["request"]["prompt"]["digest"] == baseline["prompt"]["digest"]


@needs_tiny
def test_prompt_frames_out_of_range_is_bad_input(tmp_path):
    codes = tmp_path / "codes.npy"
    np.save(codes, load_prompt(None, resolve_model("tiny"), 30).codes)
    for bad, needle in (("0", "--prompt-frames must be an integer from 1"), ("31", "holds 30 frames")):
        proc = run_cli("capture", "--prompt", str(codes), "--prompt-frames", bad, "--steps", "30",
                       "--out", str(tmp_path / f"t{bad}"))
        assert_clean_error(proc, 2, needle)
    proc = run_cli("capture", "--prompt-frames", "5", "--steps", "3", "--out", str(tmp_path / "wav"))
    assert_clean_error(proc, 2, "--prompt-frames 5 was given with audio prompt")
