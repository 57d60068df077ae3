"""Mimi on PyTorch (`moshi.models.loaders.get_mimi`): `torch`, `torch:cpu`, `torch:cuda`, `torch:mps`.

Upstream's own `MimiModel.encode`/`decode`, one-shot outside and frame by frame inside
`mimi.streaming(1)`. Activation hooks are forward hooks on the modules that carry the 12.5 Hz
latent: `downsample` (its output is the latent the quantizer reads, in one call and in streaming)
and `upsample` (its input is the dequantized embedding). `torch` is imported only here.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np

from ..env import COMPILE_ENV, install_hint, mps_unavailable
from ..errors import XBackendError
from ..capture.models import CodecRef
from ..spec import BackendSpec
from .base import FRAME_SIZE, Codec

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


class TorchCodec(Codec):
    library = "torch"
    hook_points = ("encode.latent", "encode.codes", "decode.embedding", "decode.audio")

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        if spec.quant:
            raise XBackendError(f"Codec {spec} asks for quantized tier {spec.quant}",
                                asked="codecs run fp32, bf16, fp16 (and fp64 on the CPU)", fix=f"use {spec.name}:bf16")
        if spec.device not in (None, "cpu", "cuda", "mps"):
            raise XBackendError(f"Codec {spec} names device {spec.device!r}",
                                asked="PyTorch codecs run on cpu, cuda and mps", fix="write e.g. torch:cuda:bf16")
        if spec.dtype == "fp64" and spec.device not in (None, "cpu"):
            raise XBackendError(f"Codec {spec} asks for fp64 on {spec.device}",
                                asked="MPS has no float64; fp64 is the CPU's high-precision reference",
                                fix="use torch:cpu:fp64")
        self.device = spec.device or "cpu"
        self.mimi = None
        self._frames = range(0)  # the frames the current call covers (for the module hooks)
        # As for the LM: moshi compiles rope lazily with torch.compile (slow start, other numerics); eager by default.
        self.compile = os.environ.get(COMPILE_ENV, "") not in ("", "0") and not os.environ.get("NO_TORCH_COMPILE")

    def unavailable_reason(self) -> str | None:
        try:
            import moshi  # noqa: F401
            import torch
        except ImportError as exc:
            return f"PyTorch or moshi is not installed ({exc.name}); install with `{install_hint('torch')}`"
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if self.device == "mps":
            return mps_unavailable(torch)
        return None

    def device_name(self) -> str:
        import torch

        if self.device == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name()
        return "Apple MPS" if self.device == "mps" else "cpu"

    def env(self) -> dict:
        import torch

        return {**super().env(), "threads": torch.get_num_threads(), "torch_compile": self.compile}

    def _run(self):
        """no_grad, and eager unless XBACKEND_TORCH_COMPILE=1."""
        import torch
        from moshi.utils.compile import no_compile

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if not self.compile:
            stack.enter_context(no_compile())
        return stack

    def load(self, ref: CodecRef, n_codebooks: int) -> None:
        import torch
        from moshi.models.loaders import get_mimi

        try:
            mimi = get_mimi(ref.weights, ref.config, device=self.device, num_codebooks=n_codebooks)
        except (RuntimeError, KeyError, TypeError, AssertionError, ValueError) as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            raise XBackendError(f"Codec checkpoint {ref.weights} does not fit its config "
                                f"({' '.join(x.strip() for x in lines[:2])[:300]})",
                                fix="pass the config.json that belongs to these weights (beside them in the "
                                    "codec directory), or the released Mimi file") from None
        self.mimi = mimi.to(dtype=getattr(torch, DTYPES[self.spec.dtype]))
        self.n_codebooks, self.bins = n_codebooks, int(mimi.cardinality)
        mimi.downsample.register_forward_hook(self._latent_hook)
        mimi.upsample.register_forward_pre_hook(self._embedding_hook)

    # --- hooks on upstream modules ([B, C, T] tensors; the hook sees [T, C]) -----------------------

    def _through(self, point: str, x):
        import torch

        if self.on_activation is None:
            return x
        host = x[0].detach().float().cpu().numpy().T
        out = self.hook(point, self._frames, host)
        return torch.from_numpy(np.ascontiguousarray(out.T)).to(device=x.device, dtype=x.dtype)[None]

    def _latent_hook(self, module, inputs, output):
        return self._through("encode.latent", output)

    def _embedding_hook(self, module, inputs):
        return (self._through("decode.embedding", inputs[0]),)

    # --- encode / decode ---------------------------------------------------------------------------

    def _tensor(self, audio: np.ndarray):
        import torch

        dtype = next(self.mimi.parameters()).dtype
        # a copy in torch's own (aligned) memory: kernels must not see where numpy happened to allocate
        return torch.tensor(audio, dtype=dtype, device=self.device).view(1, 1, -1)

    def _codes(self, codes: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(codes)).long().to(self.device)[None]

    @staticmethod
    def _host(x) -> np.ndarray:
        return x[0].detach().float().cpu().numpy()

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        self._frames = range(audio.shape[0] // FRAME_SIZE)
        with self._run():
            return self.mimi.encode(self._tensor(audio))[0].cpu().numpy()

    def _encode_steps(self, audio: np.ndarray) -> Iterator[np.ndarray]:
        with self._run(), self.mimi.streaming(1):
            for t in range(audio.shape[0] // FRAME_SIZE):
                self._frames = range(t, t + 1)
                yield self.mimi.encode(self._tensor(audio[t * FRAME_SIZE:(t + 1) * FRAME_SIZE]))[0].cpu().numpy()

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        self._frames = range(codes.shape[1])
        with self._run():
            return self._host(self.mimi.decode(self._codes(codes)))

    def _decode_steps(self, codes: np.ndarray) -> Iterator[np.ndarray]:
        with self._run(), self.mimi.streaming(1):
            for t in range(codes.shape[1]):
                self._frames = range(t, t + 1)
                yield self._host(self.mimi.decode(self._codes(codes[:, t:t + 1])))

