"""`locate`: module faults planted through `wrap_backend(on_load=...)` are found at exactly that module
and step in both modes; healthy pairs locate nothing over tolerance; the module map is the one
`Lm.load_pytorch_weights` loads; a context of 50 is found in the first layer's attention at step 50."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .helpers import HAVE_MLX, TINY, assert_clean_error, needs_mlx, needs_tiny, run_cli

pytestmark = needs_tiny

FROM = 6  # the step a planted fault starts at
STEPS = 9  # locate through step 8, window 4: steps 5..8


def job(model, steps: int = STEPS):
    """Teacher forcing on fixed random tokens: any tokens will do to compare two backends' modules."""
    from xbackend.backends import Job
    from xbackend.capture.prompt import load_prompt
    from xbackend.samplers import Sampler, SamplingSettings

    rng = np.random.default_rng(7)
    tokens = np.stack([rng.integers(0, v, steps) for v in model.vocab], 1).astype(np.int64)
    return Job(model, load_prompt(None, model, steps).codes, steps, 1,
               Sampler("forced", 1, SamplingSettings(), forced_tokens=tokens))


def session(spec: str, on_load=None):
    from xbackend.backends import create_backend, require_available, wrap_backend
    from xbackend.capture.run import LoadedBackend
    from xbackend.capture.models import resolve_model

    backend = wrap_backend(spec, on_load=on_load)(None) if on_load else create_backend(spec)
    return LoadedBackend(require_available(backend), resolve_model("tiny"))


@pytest.fixture(scope="module")
def torch_ref():
    return session("cpu")


@pytest.fixture(scope="module")
def mlx_ref():
    return session("mlx:cpu")


def locate(ref, other, window: int = 4):
    from xbackend.locate import locate_pair

    return locate_pair(ref, other, job(ref.model), window=window)


def assert_located(result, module: str, step: int = FROM) -> None:
    assert result.first is not None, result.sentence()
    assert (result.first.module, result.first.step, result.first.mode) == (module, step, "propagated and isolated"), \
        result.sentence()
    assert (result.first_isolated.module, result.first_isolated.step) == (module, step)
    assert result.amplifier["module"] == module and result.amplifier["step"] == step, result.amplifier
    assert result.first.max_abs > 10 * result.first.tolerance


# --- the planted faults (what a plugin would write) ---------------------------------------------

def torch_gating_scale(layer: int, scale: float = 1.5):
    def on_load(lm):
        target = lm.transformer.layers[layer]  # its offset_cpu is the step being run

        def hook(module, args, out):
            return out * scale if target._streaming_state.offset_cpu >= FROM else out

        target.gating.register_forward_hook(hook)
    return on_load


def torch_depformer_bias(codebook: int, bias: float = 0.5):
    def on_load(lm):
        main = lm.transformer.layers[0]

        def hook(module, args, out):  # the depformer layer counts this step's codebooks, this one included
            if module._streaming_state.offset_cpu - 1 == codebook and main._streaming_state.offset_cpu - 1 >= FROM:
                return out + bias
            return out

        lm.depformer.layers[0].register_forward_hook(hook)
    return on_load


def torch_cache_skip(layer: int):
    def on_load(lm):
        def pre(module, args):  # at step FROM the cache skips a slot: a zero key, positions off by one
            state = module._streaming_state
            if state.offset_cpu == FROM:
                state.kv_cache.end_offset += 1
                state.offset += 1

        lm.transformer.layers[layer].self_attn.register_forward_pre_hook(pre)
    return on_load


def _mlx_wrapper(fn):
    import mlx.nn as nn

    class Faulty(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, xs, *args, **kwargs):
            return fn(self.inner, xs, *args, **kwargs)

    return Faulty


def mlx_gating_scale(layer: int, scale: float = 1.5):
    def on_load(lm):
        cache = lm.transformer_cache[layer].self_attn  # steps cached, this one included

        def fault(inner, xs):
            out = inner(xs)
            return out * scale if cache.offset - 1 >= FROM else out

        lm.transformer.layers[layer].gating = _mlx_wrapper(fault)(lm.transformer.layers[layer].gating)
    return on_load


def mlx_depformer_bias(codebook: int, bias: float = 0.5):
    def on_load(lm):
        cache = lm.transformer_cache[0].self_attn

        def fault(inner, xs, *args, **kwargs):
            out = inner(xs, *args, **kwargs)
            return out + bias if cache.offset - 1 >= FROM else out

        layers = lm.depformer.slices[codebook].transformer.layers
        layers[0] = _mlx_wrapper(fault)(layers[0])
    return on_load


def mlx_cache_skip(layer: int):
    def on_load(lm):
        def fault(inner, xs, cache, mask=None):
            if cache.offset == FROM:
                cache.offset += 1
                cache._idx += 1
            return inner(xs, cache=cache, mask=mask)

        attn = lm.transformer.layers[layer]
        attn.self_attn = _mlx_wrapper(fault)(attn.self_attn)
    return on_load


# --- planted faults: (reference, backend, fault, module located) ---------------------------------

MLX = [pytest.mark.mlx, pytest.mark.skipif(not HAVE_MLX, reason="mlx or moshi_mlx not installed")]
FAULTS = [
    pytest.param("cpu", "cpu", torch_gating_scale(1), "transformer.layers.1.gating", id="torch-gating"),
    pytest.param("cpu", "cpu", torch_cache_skip(1), "transformer.layers.1.self_attn", id="torch-cache"),
    pytest.param("cpu", "mlx:cpu", mlx_gating_scale(0), "transformer.layers.0.gating", id="mlx-gating", marks=MLX),
    pytest.param("cpu", "mlx:cpu", mlx_depformer_bias(3), "depformer.layers.0@audio3", id="mlx-depformer", marks=MLX),
    pytest.param("mlx:cpu", "cpu", torch_depformer_bias(5), "depformer.layers.0@audio5", id="torch-depformer",
                 marks=MLX),
    pytest.param("cpu", "mlx:cpu", mlx_cache_skip(0), "transformer.layers.0.self_attn", id="mlx-cache", marks=MLX),
]


@pytest.mark.parametrize("ref, spec, fault, module", FAULTS)
def test_planted_fault_is_located_at_its_module_and_step(request, ref, spec, fault, module):
    result = locate(request.getfixturevalue("torch_ref" if ref == "cpu" else "mlx_ref"), session(spec, fault))
    assert_located(result, module)
    rows = {r["module"]: r for r in result.modules}
    before = [e for e in rows if list(rows).index(e) < list(rows).index(module)]
    assert not any(rows[e]["over"] or rows[e]["isolated_over"] for e in before)  # nothing earlier is over
    assert rows["text_linear"]["over"] or "@audio" in module  # what inherits it downstream, propagated...
    assert not rows["text_linear"]["isolated_over"]  # ...but not when fed the reference's input
    if module.startswith("depformer"):
        k = module.rsplit("@audio", 1)[1]
        assert rows[module]["mlx_name"] == f"depformer.slices.{k}.transformer.layers.0"
        assert rows[module]["torch_name"] == "depformer.layers.0"
        assert rows[f"linears@audio{k}"]["over"] and not rows[f"linears@audio{k}"]["isolated_over"]
        assert not rows[f"linears@audio{int(k) - 1}"]["over"]
    if module.endswith("self_attn"):  # the cache differs there, at that step
        diff = result.cache["first_difference"]
        assert (diff["module"], diff["step"]) == (module, FROM)
        assert list(diff["last_position"].values()) == [FROM, FROM + 1]


# --- healthy pairs --------------------------------------------------------------------------------

@needs_mlx
def test_healthy_pairs_locate_nothing_over_tolerance(torch_ref, mlx_ref):
    """Nothing over tolerance, in either mode. Measured on the bundled model (worst module's max|Δ| /
    tolerance over the window): cpu vs mlx:cpu 0.008 (relative drift ~1e-6 against 5e-5), mlx:cpu vs
    mlx:cpu 0 (bitwise), mlx:cpu vs mlx:cpu:q8 0.25 (only the depformer quantizes); bounds 4x to 25x above."""
    for ref, other, bound in ((torch_ref, mlx_ref, 0.2), (mlx_ref, session("mlx:cpu"), 0.2),
                              (mlx_ref, session("mlx:cpu:q8"), 0.5)):
        result = locate(ref, other)
        assert result.first is None and result.first_isolated is None, result.sentence()
        assert all(not r["over"] and not r["isolated_over"] for r in result.modules)
        worst = max(r["max_abs"] / r["tolerance"] for r in result.modules)
        assert worst < bound, (other.backend.label, worst)
        assert result.sentence().startswith("No mapped module exceeds its tolerance in steps 5-8")
        keys = result.cache["modules"][0]
        assert keys["module"] == "transformer.layers.0.self_attn"
        assert list(keys["keys"].values()) == [[6, 7, 8, 9], [6, 7, 8, 9]]  # step t attends t + 1 keys


def test_same_backend_twice_is_bitwise_equal(torch_ref):
    result = locate(torch_ref, session("cpu"))
    assert result.first is None
    assert all(r["max_abs"] == 0.0 and r["isolated_max_abs"] == 0.0 for r in result.modules)


# --- the module map -------------------------------------------------------------------------------

@needs_mlx
def test_module_map_pairs_the_modules_load_pytorch_weights_fills(torch_ref, mlx_ref):
    """Every mapped pair holds the same weights: PyTorch's (per-step index picked) and MLX's slice."""
    from xbackend.backends.modulemap import module_map

    torch_ref.load()
    mlx_ref.load()
    lm, mlm = torch_ref.backend.lm, mlx_ref.backend.lm
    torch_params = dict(lm.named_parameters())
    mlx_params = dict(_flatten(mlm.parameters()))
    entries = module_map(torch_ref.model.config)
    assert len(entries) == 2 * 5 + 2 + 8 * (2 + 5)
    checked = 0
    for e in entries:
        if e.kind == "block":
            continue
        pairs = {"norm": [("alpha", "weight")], "linear": [("weight", "weight")],
                 "gating": [("linear_in.weight", "linear_in.weight"), ("linear_out.weight", "linear_out.weight")],
                 "attention": [("in_projs.{w}.weight", "in_proj.weight"), ("out_projs.{w}.weight", "out_proj.weight")]}
        for t_suffix, m_suffix in pairs[e.kind]:
            w = e.stream[5:] if e.stream != "text" else "0"
            t = torch_params[f"{e.torch_name}.{t_suffix.format(w=w)}"].detach().float().numpy()
            m = np.array(mlx_params[f"{e.mlx_name}.{m_suffix}"])
            np.testing.assert_array_equal(t.reshape(m.shape), m)
            checked += 1
    assert checked == 2 * 6 + 2 + 8 * 8


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


# --- on_load through compare's workers and --plugin -----------------------------------------------

PLUGIN = """
import xbackend

def on_load(lm):  # layer 1's gating output x1.5 from step 6 on
    layer = lm.transformer.layers[1]
    layer.gating.register_forward_hook(
        lambda m, args, out: out * 1.5 if layer._streaming_state.offset_cpu >= 6 else out)

xbackend.register_backend("faulty", xbackend.wrap_backend("cpu", on_load=on_load))
"""


def test_on_load_fault_through_compare_is_located_by_the_cli(tmp_path):
    """The fault runs in compare's worker (the verdict sees it at step 6) and in locate's process
    (--plugin): locate's defaults (the backend needing attention, its first divergence) find it."""
    plugin = tmp_path / "faulty.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    proc = run_cli("compare", "--backends", "cpu,faulty", "--steps", "10", "--repeats", "1", "--arbiter", "none",
                   "--plugin", str(plugin), "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    (verdict,) = json.loads((out / "report.json").read_text())["verdicts"]
    assert verdict["verdict"] == "SEMANTIC_MISMATCH" and verdict["first_divergence"]["step"] == FROM
    proc = run_cli("locate", str(out), "--plugin", str(plugin))
    assert proc.returncode == 1, proc.stderr
    assert "First diverges in transformer.layers.1.gating at step 6 (propagated and isolated;" in proc.stdout
    located = json.loads((out / "report.json").read_text())["locate"]["faulty"]
    assert located["window"] == [3, 6] and located["run"]["reproduces"]["identical"] is True
    assert_clean_error(run_cli("locate", str(out)), 2, "unknown backend 'faulty'", "--plugin")


# --- the CLI on a real compare run: context 50 ---------------------------------------------------

@needs_mlx
def test_context_50_is_located_in_the_first_attention_at_step_50(tmp_path):
    """PyTorch masks keys older than `context` (50 keys at step 50), moshi_mlx keeps current + 50
    (51): compare --locate finds it, names the module and the key counts, and report draws it."""
    model = tmp_path / "ctx50"
    shutil.copytree(TINY.parent, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, context=50)))
    out = tmp_path / "run"
    proc = run_cli("compare", "--backends", "cpu,mlx:cpu", "--model", str(model), "--steps", "70", "--repeats", "1",
                   "--arbiter", "none", "--out", str(out), "--locate", timeout=900)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((out / "report.json").read_text())
    (verdict,) = report["verdicts"]
    assert verdict["first_divergence"]["step"] == 50
    sentence = ("First diverges in transformer.layers.0.self_attn at step 50 (propagated and isolated; ")
    assert sentence in verdict["explanation"] and verdict["explanation"].endswith("keys attended: cpu 50, mlx:cpu 51.")
    located = report["locate"]["mlx:cpu"]
    assert located["schema"] == "xbackend.locate/1" and located["window"] == [47, 50]
    assert located["run"]["reproduces"]["identical"] is True  # the instrumented run gives the forced trace's logits
    assert located["cache"]["first_difference"]["keys"] == {"cpu": 50, "mlx:cpu": 51}
    # the same from `locate --json`, and report.md gets the table and the heat map
    proc = run_cli("locate", str(out), "--json", "--window", "2")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert {"reference", "backend", "step", "stream", "first", "amplifier", "modules", "cache"} <= set(data)
    assert (data["reference"], data["backend"], data["step"], data["stream"]) == ("cpu", "mlx:cpu", 50, "text")
    assert data["first"]["module"] == "transformer.layers.0.self_attn" and data["first"]["step"] == 50
    assert {"module", "torch_name", "mlx_name", "max_abs", "rel", "tolerance", "over", "isolated_max_abs"} <= \
        set(data["modules"][0])
    report = json.loads((out / "report.json").read_text())
    assert report["verdicts"][0]["explanation"].count("First diverges in") == 1  # replaced, not appended twice
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "## Where in the network" in md and "transformer.layers.0.self_attn" in md
    assert (out / "plots" / "locate-mlx_cpu.png").stat().st_size > 1000
    # bad input: one line, exit 2
    assert_clean_error(run_cli("locate", str(out), "--backend", "mps"), 2, "not a compared backend")
    assert_clean_error(run_cli("locate", str(out), "--at", "500"), 2, "--at")
    assert_clean_error(run_cli("locate", str(out), "--window", "0"), 2, "--window")
    assert_clean_error(run_cli("locate", str(tmp_path / "nothing")), 2, "report.json")
