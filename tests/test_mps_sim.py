"""The MPS code paths on a machine without Metal: `tests/simulated_mps.py` runs spec `mps` on CPU
tensors under MpsRules (no float64/complex128, no op MPS lacks). Dtype discipline and branch logic,
not Metal numerics; the real-device checks are in test_mps.py (marked mps)."""

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("moshi")

import xbackend  # noqa: E402
from xbackend import BackendFailed, XBackendError  # noqa: E402
from xbackend.spec import BackendSpec  # noqa: E402

from . import simulated_mps as sim  # noqa: E402
from .helpers import assert_clean_error, needs_tiny, run, run_cli  # noqa: E402

pytestmark = needs_tiny
STEPS = 6
PLUGIN = str(Path(sim.__file__))


@pytest.fixture
def made(registry):
    """Registers the simulation as `mps` (and the negative control) for one test; returns the instances made."""
    instances = []

    def factory(cls):
        def make(spec):
            backend = cls(spec if cls is sim.SimulatedMps else BackendSpec("cpu", dtype=spec.dtype))
            instances.append(backend)
            return backend
        return make

    xbackend.register_backend("mps", factory(sim.SimulatedMps))
    xbackend.register_backend("mps-rules-on-cpu", factory(sim.RulesBackend))
    return instances


@pytest.mark.parametrize("mode", ["native", "portable", "greedy", "forced"])
def test_every_sampler_mode_runs_the_mps_branches_within_mps_rules(tmp_path, made, mode):
    ref = run(tmp_path, "cpu", backend="cpu", steps=STEPS, sampler="native" if mode == "forced" else mode)
    sampler = f"forced:{ref.path}" if mode == "forced" else mode
    tr = run(tmp_path, "mps", backend="mps", steps=STEPS, sampler=sampler)
    backend = made[-1]
    e = tr.meta["effective"]
    assert tr.complete and tr.meta["backend"] == "mps"
    assert e["capture_path"] == "host" and e["cuda_graphs"] is False and e["weights_device"] == "cpu"
    assert tr.meta["env"]["device"].startswith("simulated MPS")
    # Same arithmetic as the CPU (it is the CPU): the host path writes the device path's bits.
    assert tr.digests == ref.digests and np.array_equal(tr.tokens, ref.tokens)
    ops = backend.rules.ops
    assert ops["aten::mm"] + ops["aten::addmm"] + ops["aten::bmm"] > 0  # the model really ran under the rules
    assert (ops["aten::exponential_"] > 0) == (mode == "native")  # moshi's own sampler ran only in native
    assert backend.clock.calls == 2  # synchronized after loading and at the end of the run


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_runs_within_mps_rules(tmp_path, made, dtype):
    ref = run(tmp_path, "cpu", backend=f"cpu:{dtype}", steps=STEPS, sampler="greedy")
    tr = run(tmp_path, "mps", backend=f"mps:{dtype}", steps=STEPS, sampler="greedy")
    assert tr.meta["effective"]["weights_dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert tr.digests == ref.digests


def test_negative_control_the_device_decision_path_is_caught(tmp_path, made):
    """CPU/CUDA take decisions on the device in float64: under the same rules that must fail,
    or the rules prove nothing about the MPS path passing them."""
    plain = run(tmp_path, "plain", backend="cpu", steps=2, sampler="greedy")
    assert plain.complete and plain.meta["effective"]["capture_path"] == "device"
    for mode in ("greedy", "portable", "native"):
        with pytest.raises(BackendFailed, match="float64") as err:
            run(tmp_path, f"caught-{mode}", backend="mps-rules-on-cpu", steps=2, sampler=mode)
        assert "MpsUnsupported" in str(err.value)
    assert made[-1].capture_path() == "device"


def test_the_rules_refuse_what_mps_lacks():
    rules = sim.MpsRules()
    with rules:
        x = torch.ones(4)
        (x * 2).sum()
        with pytest.raises(sim.MpsUnsupported, match="float64"):
            x.double()
        with pytest.raises(sim.MpsUnsupported, match="complex128"):
            torch.zeros(2, dtype=torch.complex128)
        with pytest.raises(sim.MpsUnsupported, match="aten::cauchy_"):
            x.cauchy_()
    assert rules.ops["aten::mul"] == 1


def test_the_list_of_ops_mps_lacks_is_what_torch_says():
    """Each listed op (its default overload, what the dispatcher calls) has CPU and CUDA kernels and
    no MPS kernel in the installed torch's own table."""
    yaml = pytest.importorskip("yaml")
    import torchgen

    table = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    if not table.is_file():
        pytest.skip(f"{table} not shipped with this torch")
    keys: dict[str, set] = {}
    for entry in yaml.safe_load(table.read_text()):
        name = "aten::" + entry["func"].split("(")[0]
        for k in (entry.get("dispatch") or {"CompositeImplicitAutograd": None}):
            keys.setdefault(name, set()).update(x.strip() for x in k.split(","))
    for op in sim.MISSING_ON_MPS:
        assert {"CPU", "CUDA"} <= keys[op] and "MPS" not in keys[op], (op, keys[op])
        assert not any(k.startswith("Composite") for k in keys[op]), op


def test_mps_exponential_bug_is_caught(tmp_path, made, monkeypatch):
    """pytorch#192577: exponential_ gives -0.0, p / q is NaN for p = 0, argmax takes the NaN:
    a top-k token of float32 probability 0. Caught on the simulated MPS path, not recorded as data."""
    def underflowing(run_, step, stream, logits):
        if stream == "text":
            logits = np.full_like(logits, -1000.0)
            logits[3] = 0.0
            logits[4:28] = -80.0  # tempered 114 below the best: float32 probability 0, float64 1e-50
        return logits

    class Hooked(sim.SimulatedMps):
        def __init__(self, spec):
            super().__init__(spec)
            self.on_logits = underflowing

    xbackend.register_backend("mps", Hooked)
    healthy = run(tmp_path, "healthy", backend="mps", steps=2)
    assert healthy.tokens[0, 0] == 3

    def minus_zero(self, lambd=1.0, *, generator=None):
        return self.fill_(-0.0)

    monkeypatch.setattr(torch.Tensor, "exponential_", minus_zero)
    with pytest.raises(BackendFailed, match="zero probability") as err:
        run(tmp_path, "broken", backend="mps", steps=2)
    assert err.value.exit_code == 3 and "pytorch#192577" in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = xbackend.load_trace(tmp_path / "broken")
    assert kept.meta["status"] == "failed" and kept.meta["failed_at"] == {"step": 0, "stream": "text"}


def test_mps_refuses_device_decisions_and_fp64(tmp_path, made, monkeypatch):
    monkeypatch.setenv("XBACKEND_CAPTURE_PATH", "device")
    with pytest.raises(XBackendError, match="float64, which MPS lacks"):
        run(tmp_path, "d", backend="mps", steps=2, sampler="greedy")
    with pytest.raises(XBackendError, match="fp64 runs on the CPU only"):
        xbackend.create_backend("mps:fp64")


def test_mps_knobs_and_timing_are_recorded(tmp_path, made, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "1")
    tr = run(tmp_path, "t", backend="mps", steps=3, sampler="greedy")
    e = tr.meta["effective"]
    assert e["mps_fast_math"] is True and e["mps_prefer_metal"] is False and e["mps_fallback"] is False
    assert tr.meta["env"]["env"]["PYTORCH_MPS_FAST_MATH"] == "1"
    m = tr.meta
    assert m["first_step_ms"] > 0 and m["ms_per_step"] > 0
    # The first step is apart: the mean covers steps 1..2 only.
    assert m["elapsed_s"] * 1000 == pytest.approx(m["first_step_ms"] + 2 * m["ms_per_step"], abs=1.0)


COMPILED_MPS = """
import functools, json, sys
import torch
torch.compile = functools.partial(torch.compile, backend="eager")  # no C++ toolchain needed
from xbackend.backends import load_plugin
from xbackend.capture.run import CaptureRequest, capture
load_plugin(sys.argv[1])
tr = capture(CaptureRequest(backend="mps", steps=2, sampler="greedy", compile=sys.argv[3]), sys.argv[2])
print(json.dumps(tr.meta["effective"]))
"""


@pytest.mark.parametrize("choice", ["auto", "on"])
def test_torch_compile_records_what_moshi_really_compiled(tmp_path, choice):
    """Off CUDA moshi's transformer layers run `no_compile()`: `auto` (as moshi ships) compiles the output
    RMSNorm only. In a process without NO_TORCH_COMPILE (moshi reads it at import; conftest sets it here)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NO_TORCH_COMPILE="")
    proc = subprocess.run([sys.executable, "-c", COMPILED_MPS, PLUGIN, str(tmp_path / "c"), choice],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    e = json.loads(proc.stdout.strip().splitlines()[-1])
    assert e["compile"] == choice and e["torch_compile_requested"] is True and e["torch_compiled"] == ["_rms_norm"]
    assert "apply_rope" not in e["torch_compiled"] and "gating_forward_kernel" not in e["torch_compiled"]


def test_first_commands_through_the_cli(tmp_path):
    """`repeat --backend mps` as a Mac user runs it first, the simulation loaded as a plugin (real workers)."""
    proc = run_cli("repeat", "--backend", "mps", "--runs", "2", "--steps", "4", "--plugin", PLUGIN,
                   "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert "mps" in proc.stdout
    bad = run_cli("capture", "-b", "mps:fp64", "--steps", "2", "--plugin", PLUGIN, "-o", str(tmp_path / "x"))
    assert_clean_error(bad, 2, "fp64 runs on the CPU only")
