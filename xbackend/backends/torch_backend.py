"""PyTorch backend (`moshi` package) for `cpu`, `cuda` and `mps`, plus the reference codec.

It drives upstream's own `moshi.models.lm.LMGen.step`, so users test what they ship; every
sampling decision goes through `moshi.models.lm.sample_token`, which this module replaces for
the duration of a run by a hook that hands the logits to xbackend.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import numpy as np

from ..errors import BackendUnavailable, XBackendError
from ..models import CodecRef, ModelRef
from ..spec import BackendSpec
from .base import Backend, Job, StepRecord, StepRecorder

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
COMPILE_ENV = "XBACKEND_TORCH_COMPILE"  # set to 1 to keep moshi's lazy torch.compile of rope/gating/norm


class TorchBackend(Backend):
    library = "torch"

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        if spec.quant:
            raise XBackendError(f"Backend {spec} asks for quantized tier {spec.quant}",
                                asked="q8/q4 are MLX tiers (mlx:q8, mlx:q4); PyTorch runs fp32, bf16, fp16, fp64",
                                fix=f"use {spec.name}:bf16 or mlx:{spec.quant}")
        if spec.dtype == "fp64" and spec.name != "cpu":
            raise XBackendError(f"Backend {spec} asks for fp64 on {spec.name}",
                                asked="fp64 runs on the CPU only (MPS has no float64; CUDA fp64 is not a shipped path)",
                                fix="use cpu:fp64 as the high-precision reference")
        if spec.device and not (spec.name == "cuda" and spec.device.isdigit()):
            raise XBackendError(f"Backend {spec} names device {spec.device!r}",
                                asked="PyTorch backends are cpu, cuda (or cuda:N) and mps",
                                fix="write e.g. cuda:1:bf16")
        self.device = f"cuda:{spec.device}" if spec.device else spec.name
        self.lm = None
        # moshi compiles rope, gating and RMSNorm lazily with torch.compile: minutes of start-up
        # on a CPU, in every worker process, and different numerics from eager. Eager is the
        # default; the choice is recorded in every trace.
        self.compile = os.environ.get(COMPILE_ENV, "") not in ("", "0") and not os.environ.get("NO_TORCH_COMPILE")

    def unavailable_reason(self) -> str | None:
        try:
            import moshi  # noqa: F401
            import torch
        except ImportError as exc:
            return f"PyTorch or moshi is not installed ({exc.name}); install with `pip install torch moshi`"
        if self.spec.name == "cuda" and not torch.cuda.is_available():
            return f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
        if self.spec.name == "mps" and not torch.backends.mps.is_available():
            built = torch.backends.mps.is_built()
            return "MPS needs macOS on Apple silicon" + ("" if built else " and a torch built with MPS")
        return None

    def device_name(self) -> str:
        import torch

        if self.spec.name == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(self.device))
        if self.spec.name == "mps":
            return "Apple MPS"
        return "cpu"

    def env(self) -> dict:
        import torch

        env = super().env()
        env["threads"] = torch.get_num_threads()
        if self.spec.name == "cuda" and torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
        return env

    def effective(self) -> dict:
        import torch

        out = {"cuda_graphs": False, "torch_compile": self.compile}
        if self.spec.name == "cuda":
            out["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
            out["allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        return out

    def seed_rng(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators

    def load(self, model: ModelRef) -> None:
        import torch
        from moshi.models.loaders import get_moshi_lm

        if model.layout == "mlx":
            raise XBackendError(f"Model {model.name} is an MLX-native checkpoint ({model.weights.name})",
                                asked="PyTorch backends load PyTorch checkpoints only",
                                fix="compare it with mlx backends, or use the PyTorch repository of the same model")
        try:
            self.lm = get_moshi_lm(model.weights, lm_kwargs=model.config, device=self.device,
                                   dtype=getattr(torch, DTYPES[self.spec.dtype]))
        except (RuntimeError, KeyError, TypeError, AssertionError) as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            detail = " ".join(line.strip() for line in lines[:3])[:400]
            raise XBackendError(f"Checkpoint {model.weights} does not fit its config ({detail})",
                                asked=f"model {model.name}, layout {model.layout}",
                                fix="pass the config.json that belongs to these weights") from None

    def generate(self, job: Job, recorder: StepRecorder, on_step: Callable[[StepRecord], None]) -> None:
        import torch
        from moshi.models import lm as lm_module
        from moshi.utils.compile import no_compile, no_cuda_graph

        s = job.sampler.settings
        gen = lm_module.LMGen(self.lm, use_sampling=True, temp=s.temp_audio, temp_text=s.temp_text,
                              top_k=s.top_k_audio, top_k_text=s.top_k_text)
        original = lm_module.sample_token

        def hook(logits, use_sampling=False, temp=1.0, top_k=0, top_p=0.0):
            flat = logits.reshape(-1, logits.shape[-1])
            host = recorder.take(flat[0].float().cpu().numpy())
            if recorder.native:
                if recorder.on_logits is not None:
                    logits = torch.from_numpy(host).to(device=logits.device, dtype=logits.dtype).view_as(logits)
                token = original(logits, use_sampling, temp, top_k, top_p)
                recorder.native_token(int(token.reshape(-1)[0]))
                return token
            return torch.full(logits.shape[:-1], recorder.decide(), dtype=torch.long, device=logits.device)

        n_user = job.model.n_user
        self.seed_rng(job.seed)
        lm_module.sample_token = hook
        try:
            with no_cuda_graph(), (contextlib.nullcontext() if self.compile else no_compile()), \
                    gen.streaming(1), torch.no_grad():
                for t in range(job.steps):
                    frame = job.frame(t, self.consumes_late)
                    recorder.begin(t)
                    gen.step(torch.tensor(frame, dtype=torch.long, device=self.device).view(1, n_user, 1))
                    on_step(recorder.finish(frame))
        finally:
            lm_module.sample_token = original


def _mimi(codec: CodecRef, n_codebooks: int):
    from moshi.models.loaders import get_mimi

    return get_mimi(codec.weights, codec.config, device="cpu", num_codebooks=n_codebooks)


def mimi_encode(codec: CodecRef, audio: np.ndarray, n_codebooks: int) -> np.ndarray:
    """Encode 24 kHz mono audio to codes `[n_codebooks, frames]` with the reference codec (CPU, fp32)."""
    import torch

    mimi = _mimi(codec, n_codebooks)
    with torch.no_grad():
        codes = mimi.encode(torch.from_numpy(audio).float().view(1, 1, -1))
    return codes[0].cpu().numpy().astype(np.int64)


def mimi_decode(codec: CodecRef, codes: np.ndarray) -> np.ndarray:
    """Decode codes `[n_codebooks, frames]` to 24 kHz mono float32 audio."""
    import torch

    mimi = _mimi(codec, codes.shape[0])
    with torch.no_grad():
        audio = mimi.decode(torch.from_numpy(np.ascontiguousarray(codes)).long()[None])
    return audio[0, 0].cpu().numpy().astype(np.float32)
