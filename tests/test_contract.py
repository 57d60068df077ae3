"""One contract for every registered backend (STYLE rule 9): the same checks, or a skip with a reason."""

import numpy as np
import pytest

import xbackend
from xbackend import BackendUnavailable, CaptureRequest, capture, create_backend
from xbackend.backends import BUILTIN_SPECS
from xbackend.capture.models import resolve_model
from xbackend.capture.prompt import load_prompt
from xbackend.store.trace import step_digest
from xbackend.tolerances import CHECK_TOLERANCES

from .helpers import hardware, needs_tiny, registry_scope

pytestmark = needs_tiny

SPECS = [pytest.param(spec, marks=hardware(spec)) for spec in BUILTIN_SPECS] + ["contract-identity"]
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def plugin():
    """A plugin registered through the same public hook third parties use, for this module only."""
    with registry_scope():
        xbackend.register_backend("contract-identity", xbackend.wrap_backend("cpu", on_logits=lambda run, step, stream, x: x))
        yield


@pytest.fixture(scope="module", params=SPECS)
def greedy_run(request, tmp_path_factory, plugin):
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
    """Whatever the library's step API, the model sees prompt frame t-1 at step t (docs/design.md,
    Same input): a library that consumes a frame in the step it is passed gets frame t-1 at step t,
    one that consumes it a step later gets frame t; before frame 0 a filler the model never reads."""
    spec, _, tr = greedy_run
    model = resolve_model("tiny")
    prompt = load_prompt(None, model, STEPS)
    assert tr.meta["prompt"]["digest"] == prompt.digest  # the codes below are the ones this run received
    late = tr.meta["alignment"]["consumes_late"]
    assert late == (spec.split(":")[0] == "mlx")  # moshi_mlx's LmGen reads the frame one step later
    passed = np.asarray(tr.inputs)
    assert passed.shape == (STEPS, model.n_user)
    for t in range(STEPS):
        frame = t if late else t - 1
        want = prompt.codes[:, frame] if frame >= 0 else np.zeros(model.n_user)
        assert np.array_equal(passed[t], want), (spec, t)


def test_forcing_its_own_tokens_reproduces_them(greedy_run):
    spec, out, tr = greedy_run
    forced = capture(CaptureRequest(backend=spec, steps=STEPS, sampler=f"forced:{tr.path}"), out / "forced")
    assert np.array_equal(forced.tokens, tr.tokens)
    # The same backend on the same machine, forced onto the tokens it sampled itself: the same kernels on
    # the same inputs, measured exactly 0 for cpu, cpu:fp64, mlx, mlx:cpu, mlx:q8 and mlx:q4. Held to the
    # same-machine fp32 check bound whatever the tier (a quantized tier's looser bound is for other runs
    # of its kernels, not for a repeat of one), so a step whose state leaks into the next still fails.
    for s in tr.streams:
        np.testing.assert_allclose(forced.logits(s), tr.logits(s), atol=CHECK_TOLERANCES["fp32"], rtol=0)
