"""Mimi on MLX (`moshi_mlx.models.mimi.Mimi`): `mlx`, `mlx:cpu`, `mlx:gpu`, `mlx:…:bf16`.

Upstream's `Mimi(mimi_202407(n_q))` with `load_pytorch_weights(path, strict=True)`, the way
moshi_mlx's `run_tts.py` loads the released file. Its architecture is fixed to the 202407 config,
and strict loading needs every codebook of the file, so the model is built with the file's n_q
and the first K codes are kept (residual quantization: the first K stages do not depend on the
others; decoding K codes sums K stages). `reset_all` before every call; `encode_step` /
`decode_step` frame by frame. Hooks wrap `downsample` and `upsample`, whose `__call__`/`step`
carry the 12.5 Hz latent. `mlx` is imported only here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..env import mlx_unavailable
from ..errors import XBackendError
from ..capture.models import CodecRef, to_published_layout
from ..spec import BackendSpec
from .base import FRAME_SIZE, Codec, CodecInfo

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class MlxCodec(Codec):
    library = "mlx"
    hook_points = ("encode.latent", "encode.codes", "decode.embedding", "decode.audio")
    known_issues = ("moshi#158: moshi_mlx's transformer never sets an attention mask, so its Mimi attends to "
                    "later frames within a call (a whole utterance in one call, two 25 Hz frames a step)",)

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        if spec.dtype not in DTYPES or spec.quant:
            raise XBackendError(f"Codec {spec} asks for {spec.quant or spec.dtype}",
                                asked="MLX codecs run fp32, bf16 and fp16", fix="use mlx:cpu or mlx:cpu:bf16")
        if spec.device not in (None, "cpu", "gpu"):
            raise XBackendError(f"Codec {spec} names device {spec.device!r}",
                                asked="MLX devices are cpu and gpu (left out: MLX's default device)",
                                fix="write e.g. mlx:gpu")
        self.mimi = None
        self._frames = range(0)

    def unavailable_reason(self) -> str | None:
        """The MLX backend's own rule (Apple silicon, installed packages, a GPU that really runs)."""
        return mlx_unavailable(self.spec.device, label=str(BackendSpec("mlx", self.spec.device)))

    def device_name(self) -> str:
        import mlx.core as mx

        return "cpu" if mx.default_device().type == mx.cpu else "Apple GPU (Metal)"

    def check(self, ref: CodecRef, info: CodecInfo) -> None:
        if not info.released_shape:
            raise XBackendError(f"Codec {self.label} cannot load {ref.weights.name}: moshi_mlx's Mimi is fixed to the "
                                "released 202407 architecture (SEANet 512, 8-layer transformer, 2048 x 256 codebooks)",
                                asked="this checkpoint has other shapes (the bundled tiny codec is PyTorch-only)",
                                fix="pass a full-size Mimi with --codec (e.g. hf://kyutai/moshiko-pytorch-bf16), "
                                    "or compare torch codecs only")

    def load(self, ref: CodecRef, n_codebooks: int) -> None:
        import mlx.core as mx
        from moshi_mlx.models.mimi import Mimi, mimi_202407

        from .base import codec_info

        if self.spec.device:
            mx.set_default_device(mx.Device(mx.gpu if self.spec.device == "gpu" else mx.cpu))
        info = codec_info(ref)
        mimi = Mimi(mimi_202407(info.n_q))
        try:
            if info.transformer_layout == "published":
                mimi.load_pytorch_weights(str(ref.weights), strict=True)
            else:
                with tempfile.TemporaryDirectory(prefix="xbackend-mimi-") as tmp:
                    published = Path(tmp) / "mimi.safetensors"
                    mx.save_safetensors(str(published), to_published_layout(mx.load(str(ref.weights)), mx.concatenate))
                    mimi.load_pytorch_weights(str(published), strict=True)
                    mx.eval(mimi.parameters())
        except ValueError as exc:
            raise XBackendError(f"Codec {self.label} cannot load {ref.weights} ({str(exc).splitlines()[0][:200]})",
                                fix="pass Mimi weights in the released layout") from None
        if self.spec.dtype != "fp32":
            mimi.set_dtype(getattr(mx, DTYPES[self.spec.dtype]))
        mx.eval(mimi.parameters())
        self.mimi, self.n_codebooks, self.bins = mimi, n_codebooks, info.bins
        mimi.downsample = _Hooked(mimi.downsample, self, "encode.latent", before=False)
        mimi.upsample = _Hooked(mimi.upsample, self, "decode.embedding", before=True)

    def _through(self, point: str, x):
        """moshi_mlx keeps PyTorch's [B, C, T] layout around the resampling modules: the hook sees [T, C]."""
        import mlx.core as mx

        if self.on_activation is None or x.shape[-1] == 0:
            return x
        out = self.hook(point, self._frames, np.array(x[0].astype(mx.float32)).T)
        return mx.array(np.ascontiguousarray(out.T)).astype(x.dtype)[None]

    def _pcm(self, audio: np.ndarray):
        import mlx.core as mx

        return mx.array(audio).astype(getattr(mx, DTYPES[self.spec.dtype]))[None, None]

    @staticmethod
    def _codes_out(codes, k: int) -> np.ndarray:
        return np.array(codes)[0, :k]

    @staticmethod
    def _pcm_out(pcm) -> np.ndarray:
        import mlx.core as mx

        return np.array(pcm.astype(mx.float32)).reshape(-1)

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        self.mimi.reset_all()
        self._frames = range(audio.shape[0] // FRAME_SIZE)
        return self._codes_out(self.mimi.encode(self._pcm(audio)), self.n_codebooks)

    def _encode_steps(self, audio: np.ndarray) -> Iterator[np.ndarray]:
        self.mimi.reset_all()
        for t in range(audio.shape[0] // FRAME_SIZE):
            self._frames = range(t, t + 1)
            yield self._codes_out(self.mimi.encode_step(self._pcm(audio[t * FRAME_SIZE:(t + 1) * FRAME_SIZE])),
                                  self.n_codebooks)

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        self.mimi.reset_all()
        self._frames = range(codes.shape[1])
        return self._pcm_out(self.mimi.decode(mx.array(codes.astype(np.uint32))[None]))

    def _decode_steps(self, codes: np.ndarray) -> Iterator[np.ndarray]:
        import mlx.core as mx

        self.mimi.reset_all()
        for t in range(codes.shape[1]):
            self._frames = range(t, t + 1)
            yield self._pcm_out(self.mimi.decode_step(mx.array(codes[:, t:t + 1].astype(np.uint32))[None]))


class _Hooked:
    """Stands in for a moshi_mlx resampling module; its input (`before`) or output passes the hook."""

    def __init__(self, inner, codec: MlxCodec, point: str, before: bool):
        self.inner, self.codec, self.point, self.before = inner, codec, point, before

    def _run(self, fn, xs):
        if self.before:
            return fn(self.codec._through(self.point, xs))
        return self.codec._through(self.point, fn(xs))

    def __call__(self, xs):
        return self._run(self.inner, xs)

    def step(self, xs):
        return self._run(self.inner.step, xs)

    def reset_state(self):
        self.inner.reset_state()
