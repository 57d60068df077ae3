"""A simulated MPS backend for machines without Metal (load with `--plugin tests/simulated_mps.py`).

Its spec is `mps`, so every MPS branch of `TorchBackend` runs (host capture path, the MPS
availability and dtype probes, MPS knobs, device synchronization), but its tensors live on the
CPU, under `MpsRules`: a TorchDispatchMode that fails on what MPS cannot do. It checks dtype
discipline and branch logic, not Metal numerics: a run here says nothing about Metal's kernels.

What MPS cannot do, with sources (torch 2.9):
- float64 and complex128 tensors: "Cannot convert a MPS Tensor to float64 dtype as the MPS
  framework doesn't support float64" (aten/src/ATen/native/mps/OperationUtils.mm).
- `MISSING_ON_MPS`: ops with CPU and CUDA kernels and no MPS kernel in torch 2.9.1's
  `native_functions.yaml` (shipped as torchgen/packaged/ATen/native/native_functions.yaml; a
  test re-reads it): the random samplers a sampling change might reach for, and `mode`/`take`.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import xbackend
from xbackend.backends.torch_backend import TorchBackend
from xbackend.spec import BackendSpec

FORBIDDEN_DTYPES = (torch.float64, torch.complex128)
MISSING_ON_MPS = ("aten::cauchy_", "aten::log_normal_", "aten::geometric_", "aten::poisson", "aten::binomial",
                  "aten::_standard_gamma", "aten::_sample_dirichlet", "aten::mode", "aten::take")


class MpsUnsupported(RuntimeError):
    """What a real MPS device would have refused."""


class MpsRules(TorchDispatchMode):
    """Fails every op whose result MPS could not hold, or that MPS does not implement; counts the rest."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in MISSING_ON_MPS:
            raise MpsUnsupported(f"{name} is not implemented for the MPS device (torch 2.9 native_functions.yaml)")
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.dtype in FORBIDDEN_DTYPES:
                raise MpsUnsupported(f"{name} produced a {str(value.dtype).replace('torch.', '')} tensor: "
                                     "the MPS framework has no float64 or complex128")
        self.ops[name] += 1
        return out


class _Clock:
    """Stands in for `torch.mps`: counts the synchronizations a real run would make."""

    def __init__(self):
        self.calls = 0

    def synchronize(self) -> None:
        self.calls += 1


class RulesBackend(TorchBackend):
    """A PyTorch backend whose load and generate run under `MpsRules`, on the CPU."""

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        self.device = "cpu"
        self.rules = MpsRules()
        self.clock = _Clock()

    def load(self, model) -> None:
        with self.rules:
            super().load(model)

    def generate(self, job, recorder, on_step) -> None:
        with self.rules:
            super().generate(job, recorder, on_step)


class SimulatedMps(RulesBackend):
    """Spec `mps` (every MPS branch runs); the hardware check alone is replaced."""

    def unavailable_reason(self) -> str | None:
        return self._dtype_problem(torch)

    def accelerator(self):
        return self.clock

    def device_name(self) -> str:
        return "simulated MPS (CPU tensors under MpsRules)"


def register() -> None:
    """`mps` becomes the simulation; `mps-rules-on-cpu` is the CPU/CUDA device path under the same rules
    (the negative control: its float64 decisions must be caught)."""
    xbackend.register_backend("mps", SimulatedMps)
    xbackend.register_backend("mps-rules-on-cpu", lambda spec: RulesBackend(BackendSpec("cpu", dtype=spec.dtype)))


if __name__.startswith("xbackend_plugin_"):
    register()
