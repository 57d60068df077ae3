"""Rules that used to be restated in several modules now have one owner each (#19, One owner per rule);
these tests hold the owner to what the restatements did, and catch the drift they had."""

import json

import numpy as np
import pytest

from .helpers import needs_tiny, run


@needs_tiny
def test_a_traces_size_on_disk_is_step_bytes(tmp_path):
    """store.trace.step_bytes is what capture's disk check, the bundle's sizing and the loader all use: it is the
    bytes a written trace's data files and digests take per step."""
    from xbackend.capture.models import resolve_model
    from xbackend.capture.run import trace_bytes
    from xbackend.report import row_bytes
    from xbackend.store.trace import DIGESTS, file_sizes, step_bytes

    steps = 5
    tr = run(tmp_path, "t", steps=steps, sampler="greedy")
    data = sum((tr.path / name).stat().st_size for name, _ in file_sizes(tr.meta)) + (tr.path / DIGESTS).stat().st_size
    per_step = step_bytes(tr.meta)
    assert data == steps * per_step == steps * row_bytes(tr)
    assert trace_bytes(resolve_model("tiny"), steps, "fp32") == steps * per_step + 65536  # + room for meta.json


@pytest.mark.parametrize("config,want", [({}, 3), ({"existing_text_padding_id": 7}, 7),
                                         ({"existing_text_padding_id": True}, 3),
                                         ({"existing_text_padding_id": "7"}, 3)])
def test_one_reading_of_the_text_padding_id(config, want):
    """words and inspect read it the same way (inspect used to turn "7" into 7 and True into 1)."""
    from xbackend.analysis.inspection import padding_id
    from xbackend.analysis.words import END_OF_PADDING_ID, skipped_ids
    from xbackend.streams import text_padding_id

    meta = {"model": {"config": config}}

    class Meta:
        pass

    trace = Meta()
    trace.meta = meta
    assert text_padding_id(meta) == padding_id(trace) == want
    assert skipped_ids(meta) == {END_OF_PADDING_ID, want}


def test_one_tier_rule():
    from xbackend.spec import parse_spec
    from xbackend.tolerances import tier_of

    for text in ("cpu", "cpu:fp64", "mlx:q8", "mlx:gpu:bf16:q4", "mps:fp16"):
        spec = parse_spec(text)
        assert tier_of({"spec": {"dtype": spec.dtype, "quant": spec.quant}}) == spec.tier
    assert tier_of({}) == "fp32"


@needs_tiny
def test_a_hub_model_gets_the_checks_a_local_model_gets(tmp_path, monkeypatch):
    """A checkpoint from hf:// whose weights do not fit its config is refused from the header, as a local one is
    (the hub path skipped check_weights_fit and recorded the model as loadable)."""
    import huggingface_hub

    from xbackend.capture.models import TINY, resolve_model
    from xbackend.errors import XBackendError

    config = json.loads((TINY / "config.json").read_text())
    config["dim"] = 48
    served = {"model.safetensors": TINY / "model.safetensors", "config.json": tmp_path / "config.json"}
    served["config.json"].write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: sorted(served))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(served[name]))
    with pytest.raises(XBackendError, match="does not fit its config: text_emb.weight"):
        resolve_model("hf://someone/tiny-copy")
    served["config.json"].write_text((TINY / "config.json").read_text())
    from_hub, local = resolve_model("hf://someone/tiny-copy"), resolve_model("tiny")
    assert from_hub.digest == local.digest and from_hub.source == "hf"
    assert np.array_equal(from_hub.vocab, local.vocab)


def test_one_candle_sampler_identity():
    """A candle-mode run and an imported Rust run record one identity, and the table of modes says the same
    (the table held a second wording that no real run recorded, only synthetic traces)."""
    from xbackend.samplers import SAMPLER_IDENTITIES, Sampler, SamplingSettings, shares_sampler
    from xbackend.samplers.candle import IDENTITY

    sampler = Sampler("candle", 5, SamplingSettings(), dep_q=8)
    recorded = sampler.describe()["identity"]
    assert recorded == sampler.identity() == SAMPLER_IDENTITIES["candle"] == IDENTITY
    assert shares_sampler(SAMPLER_IDENTITIES["candle"], recorded)


def test_one_rng_word_index():
    """The word a decision uses, as the sampler consumes them and as the replay of a Rust log looks them up."""
    from xbackend.samplers import SamplingSettings
    from xbackend.samplers.candle import CandleStreams, rng_word_index

    dep_q = 3
    streams = CandleStreams(1, 2, SamplingSettings(), dep_q=dep_q)
    rng = np.random.default_rng(0)
    for step in range(4):
        for stream in range(1 + dep_q):
            d = streams.decide(step, stream, rng.standard_normal(40).astype(np.float32))
            assert d.index == rng_word_index(step, stream, dep_q) == (step if stream == 0 else step * dep_q + stream - 1)
    assert streams.text.position == 4 and streams.audio.position == 4 * dep_q


def test_one_install_hint_for_pytorch(monkeypatch):
    """The PyTorch codec named `pip install torch moshi`, the backend the extra: both now give env.install_hint."""
    import sys

    from xbackend.backends import create_backend
    from xbackend.codecs import create_codec
    from xbackend.env import install_hint

    monkeypatch.setitem(sys.modules, "moshi", None)  # `import moshi` raises ImportError
    for made in (create_codec("torch"), create_backend("cpu")):
        reason = made.unavailable_reason()
        assert reason is not None and f"install with `{install_hint('torch')}`" in reason, reason
