"""Mimi on candle through `rustymimi` (the Rust port's Python binding, CPU only): `candle`, `candle:bf16`, `candle:fp16`.

`rustymimi.Tokenizer(path, num_codebooks=K, dtype="f32"|"f16"|"bf16")`: `encode` takes float32
`[B, 1, T]` and gives uint32 `[B, K, T/1920]`, `decode` the reverse, `encode_step`/`decode_step`
frame by frame (None while the model buffers), `reset` between runs. Its config is hard-coded to
the released Mimi, and the binding exposes only codes and audio, so only the `encode.codes` and
`decode.audio` hooks reach it. `rustymimi` is imported only here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BackendFailed, XBackendError
from ..capture.models import CodecRef, to_published_layout
from ..spec import BackendSpec
from .base import FRAME_SIZE, Codec, CodecInfo

DTYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
INSTALL = "pip install rustymimi (or pip install moshi_mlx, which depends on it)"


class CandleCodec(Codec):
    library = "rustymimi"

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        if spec.dtype not in DTYPES or spec.quant:
            raise XBackendError(f"Codec {spec} asks for {spec.quant or spec.dtype}",
                                asked="rustymimi runs f32, f16 and bf16", fix="use candle, candle:fp16 or candle:bf16")
        if spec.device not in (None, "cpu"):
            raise XBackendError(f"Codec {spec} names device {spec.device!r}",
                                asked="rustymimi's Tokenizer runs on the CPU only (candle's Metal and CUDA paths "
                                      "are not exposed to Python)", fix="write candle or candle:cpu")
        self.tokenizer = None

    def unavailable_reason(self) -> str | None:
        try:
            import rustymimi  # noqa: F401
        except ImportError:
            return f"rustymimi is not installed; install with `{INSTALL}`"
        return None

    def check(self, ref: CodecRef, info: CodecInfo) -> None:
        if not info.released_shape:
            raise XBackendError(f"Codec {self.label} cannot load {ref.weights.name}: rustymimi's Mimi config is "
                                "hard-coded to the released architecture (SEANet 512, 8-layer transformer, "
                                "2048 x 256 codebooks)",
                                asked="this checkpoint has other shapes (the bundled tiny codec is PyTorch-only)",
                                fix="pass a full-size Mimi with --codec (e.g. hf://kyutai/moshiko-pytorch-bf16), "
                                    "or compare torch codecs only")

    def load(self, ref: CodecRef, n_codebooks: int) -> None:
        import rustymimi

        from .base import codec_info

        info = codec_info(ref)
        with tempfile.TemporaryDirectory(prefix="xbackend-mimi-") as tmp:
            path = ref.weights if info.transformer_layout == "published" else _published_copy(ref.weights, Path(tmp))
            try:
                self.tokenizer = rustymimi.Tokenizer(str(path), num_codebooks=n_codebooks, dtype=DTYPES[self.spec.dtype])
            except ValueError as exc:
                raise XBackendError(f"Codec {self.label} cannot load {ref.weights} ({str(exc).splitlines()[0][:200]})",
                                    fix="pass Mimi weights in the released layout") from None
        self.n_codebooks, self.bins = n_codebooks, info.bins

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        self.tokenizer.reset()
        return self.tokenizer.encode(np.ascontiguousarray(audio, dtype=np.float32)[None, None])

    def _encode_steps(self, audio: np.ndarray) -> Iterator[np.ndarray]:
        self.tokenizer.reset()
        for t in range(audio.shape[0] // FRAME_SIZE):
            codes = self.tokenizer.encode_step(np.ascontiguousarray(audio[t * FRAME_SIZE:(t + 1) * FRAME_SIZE])[None, None])
            if codes is None:
                raise BackendFailed(f"Codec {self.label} gave no codes for frame {t} (encode_step returned None)")
            yield codes

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        self.tokenizer.reset()
        return self.tokenizer.decode(np.ascontiguousarray(codes, dtype=np.uint32)[None])

    def _decode_steps(self, codes: np.ndarray) -> Iterator[np.ndarray]:
        self.tokenizer.reset()
        for t in range(codes.shape[1]):
            pcm = self.tokenizer.decode_step(np.ascontiguousarray(codes[:, t:t + 1], dtype=np.uint32)[None])
            if pcm is None:
                raise BackendFailed(f"Codec {self.label} gave no audio for frame {t} (decode_step returned None)")
            yield pcm


def _published_copy(weights: Path, tmp: Path) -> Path:
    """candle reads the released layout (`in_proj_weight`); moshi's newer per-step keys are joined first.
    The copy lives in `tmp` only while the Tokenizer reads it (candle maps, then copies, the tensors)."""
    from safetensors.numpy import load_file, save_file

    try:
        state = load_file(str(weights))
    except (TypeError, ValueError) as exc:  # bf16 has no numpy dtype
        raise XBackendError(f"Cannot rewrite {weights.name} to the released layout for candle ({exc})",
                            fix="save the Mimi weights in float32, or in the released layout (in_proj_weight)") from None
    out = tmp / "mimi.safetensors"
    save_file(to_published_layout(state), str(out))
    return out
