"""One contract for every registered backend (STYLE rule 9): the same checks, or a skip with a reason."""

import numpy as np
import pytest

import xbackend
from xbackend import BackendUnavailable, CaptureRequest, capture, create_backend
from xbackend.backends import BUILTIN_SPECS
from xbackend.models import resolve_model
from xbackend.trace import step_digest

from .conftest import needs_tiny

pytestmark = needs_tiny

# A plugin registered through the same public hook third parties use.
xbackend.register_backend("contract-identity", xbackend.wrap_backend("cpu", on_logits=lambda run, step, stream, x: x))
SPECS = list(BUILTIN_SPECS) + ["contract-identity"]
STEPS = 6


@pytest.fixture(scope="module", params=SPECS)
def greedy_run(request, tmp_path_factory):
    spec = request.param
    reason = create_backend(spec).unavailable_reason()
    if reason:
        with pytest.raises(BackendUnavailable) as err:
            capture(CaptureRequest(backend=spec, steps=2), tmp_path_factory.mktemp("u") / "t")
        assert err.value.exit_code == 3 and reason in str(err.value)
        pytest.skip(f"{spec} unavailable here: {reason}")
    out = tmp_path_factory.mktemp(spec.replace(":", "_"))
    return spec, out, capture(CaptureRequest(backend=spec, steps=STEPS, sampler="greedy"), out / "greedy")


def test_streams_shapes_and_tokens(greedy_run):
    spec, _, tr = greedy_run
    model = resolve_model("tiny")
    assert tr.steps == STEPS and tr.streams == model.streams and tr.complete
    for k, stream in enumerate(tr.streams):
        logits = tr.logits(stream)
        assert logits.shape == (STEPS, model.vocab[k]) and np.isfinite(logits).all()
        assert np.array_equal(tr.tokens[:, k], logits.argmax(axis=1))


def test_digests_describe_the_logits(greedy_run):
    _, _, tr = greedy_run
    for step in range(tr.steps):
        assert tr.digests[step] == step_digest([tr.logits(s)[step] for s in tr.streams])


def test_metadata_is_self_describing(greedy_run):
    spec, _, tr = greedy_run
    m = tr.meta
    assert m["backend"] == spec
    for key in ("os", "machine", "chip", "python", "versions", "device", "dtype", "env"):
        assert key in m["env"], key
    assert m["alignment"]["mode"] == "aligned" and m["sampler"]["mode"] == "greedy"
    assert m["model"]["digest"] == resolve_model("tiny").digest


def test_same_model_input_at_every_step(greedy_run):
    """Whatever the library's step API, the model sees prompt frame t-1 at step t (SPEC §2.1)."""
    spec, _, tr = greedy_run
    late = tr.meta["alignment"]["consumes_late"]
    codes = np.asarray(tr.inputs)
    shift = 0 if late else 1  # what was passed at step t
    passed_frame = np.arange(tr.steps) - shift
    assert passed_frame[-1] == tr.steps - 1 - shift
    if not late:
        assert (codes[0] == 0).all()  # the filler frame PyTorch reads never


def test_forcing_its_own_tokens_reproduces_them(greedy_run):
    spec, out, tr = greedy_run
    forced = capture(CaptureRequest(backend=spec, steps=STEPS, sampler=f"forced:{tr.path}"), out / "forced")
    assert np.array_equal(forced.tokens, tr.tokens)
    for s in tr.streams:
        np.testing.assert_allclose(forced.logits(s), tr.logits(s), atol=1e-5, rtol=0)
