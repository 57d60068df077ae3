"""The codec contract: one small class per Mimi implementation, the device a parameter.

A codec loads a Mimi checkpoint (`CodecRef`) and turns 24 kHz mono float32 audio into codes
`[K, frames]` (int64) and back, in one call (`encode`/`decode`) and frame by frame the way a
live app runs it (`encode_steps`/`decode_steps`, 1920 samples = one 80 ms frame per call).
Everything downstream sees numpy only.

Plugins observe or change activations through `on_activation(point, frames, x) -> x`, where
`frames` is the range of 80 ms frames that `x` (frame-major: `[len(frames), ...]`) covers and
`point` is one of `HOOK_POINTS`. In one call the whole utterance passes at once (`range(0, F)`),
frame by frame one frame at a time; an implementation that cannot reach a point never calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..env import fingerprint
from ..errors import BackendFailed, XBackendError
from ..capture.models import CodecRef, safetensors_header
from ..spec import BackendSpec

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # 80 ms at 24 kHz: one Mimi frame, one LM step
ActivationHook = Callable[[str, range, np.ndarray], np.ndarray]
# encode.latent: the encoder's output at 12.5 Hz before quantization, [n, 512]
# encode.codes: the codes, [n, K]; decode.embedding: the dequantized latent, [n, 512]
# decode.audio: decoded samples, [n, 1920]
HOOK_POINTS = ("encode.latent", "encode.codes", "decode.embedding", "decode.audio")

# Mimi as released (moshi's `_mimi_config`, moshi_mlx's `mimi_202407`, rustymimi's hard-coded config):
# the shapes that implementations with a fixed architecture can load.
RELEASED_SHAPES = {
    "encoder.model.0.conv.conv.weight": [64, 1, 7],
    "decoder.model.14.conv.conv.weight": [1, 64, 3],
    "encoder_transformer.transformer.layers.7.self_attn.in_proj_weight": [1536, 512],  # or in_projs.0.weight
    "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum": [2048, 256],
}
FIRST_CODEBOOK = "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"
REST_CODEBOOK = "quantizer.rvq_rest.vq.layers.{}._codebook.embedding_sum"
MARKERS = ("encoder.model.0.conv.conv.weight", FIRST_CODEBOOK)


@dataclass(frozen=True)
class CodecInfo:
    """What a Mimi checkpoint's header says: codebooks, their size, and whether it is the released shape."""

    n_q: int
    bins: int
    released_shape: bool
    transformer_layout: str  # published (in_proj_weight) | per_step (in_projs.N)


def codec_info(ref: CodecRef) -> CodecInfo:
    """Read the checkpoint's header (no weights) and refuse what is not a Mimi checkpoint."""
    from ..store.files import regular_file

    path = ref.weights
    regular_file(path, "Codec checkpoint", "pass a Mimi .safetensors file or directory with --codec", follow=True)
    header = safetensors_header(path)
    missing = [k for k in MARKERS if k not in header]
    if missing:
        some = ", ".join(sorted(header)[:3]) or "no tensors"
        raise XBackendError(f"{path} is not a Mimi checkpoint (no {missing[0]})",
                            asked=f"it holds {len(header)} tensors, e.g. {some}",
                            fix="pass Mimi's weights (e.g. tokenizer-e351c8d8-checkpoint125.safetensors from "
                                "a Moshi repository), not the language model's")
    n_q = 1
    while REST_CODEBOOK.format(n_q - 1) in header:
        n_q += 1
    layout = "per_step" if any(".in_projs." in k for k in header) else "published"
    rename = (lambda k: k.replace(".in_proj_weight", ".in_projs.0.weight")) if layout == "per_step" else (lambda k: k)
    released = all(header.get(rename(k), {}).get("shape") == v for k, v in RELEASED_SHAPES.items())
    return CodecInfo(n_q=n_q, bins=int(header[FIRST_CODEBOOK]["shape"][0]), released_shape=released,
                     transformer_layout=layout)


def check_codebooks(ref: CodecRef, n_codebooks: int) -> CodecInfo:
    """The checkpoint must hold at least the codebooks asked for (Moshi uses 8)."""
    info = codec_info(ref)
    if not 1 <= n_codebooks <= info.n_q:
        raise XBackendError(f"Asked for {n_codebooks} codebooks from {ref.weights.name}, which has {info.n_q}",
                            asked=f"a codec encodes with 1 to {info.n_q} codebooks of this checkpoint",
                            fix=f"pass --codebooks between 1 and {info.n_q} (Moshi uses 8)")
    return info


def frame_count(samples: int) -> int:
    """80 ms frames that hold `samples` (a last partial frame counts; at least one)."""
    return max(1, -(-samples // FRAME_SIZE))


def pad_to_frames(audio: np.ndarray) -> np.ndarray:
    """Zero-pad to a whole number of 80 ms frames: streaming encoders take exactly 1920 samples a call."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    frames = frame_count(audio.shape[0])
    out = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    out[: audio.shape[0]] = audio
    return out


class Codec:
    """Base class: subclasses set `library`, implement `load` and the four `_…` methods.

    The public methods check shapes and values, and apply the `encode.codes` and `decode.audio`
    hooks, so every implementation is held to the same contract."""

    library = ""
    hook_points: tuple[str, ...] = ("encode.codes", "decode.audio")
    known_issues: tuple[str, ...] = ()  # upstream reports a divergence of this library may be

    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.label = str(spec)
        self.on_activation: ActivationHook | None = None
        self.n_codebooks = 0
        self.bins = 0

    # --- what subclasses provide -----------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        """None when this codec can run here, else why not and how to fix it."""
        return None

    def check(self, ref: CodecRef, info: CodecInfo) -> None:
        """Refuse (XBackendError) a checkpoint this implementation cannot load, before loading it."""

    def load(self, ref: CodecRef, n_codebooks: int) -> None:
        raise NotImplementedError

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _encode_steps(self, audio: np.ndarray) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode_steps(self, codes: np.ndarray) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def device_name(self) -> str:
        return self.spec.device or "cpu"

    def env(self) -> dict:
        return fingerprint(codec=self.label, library=self.library, device=self.device_name(), dtype=self.spec.dtype)

    # --- the contract ------------------------------------------------------------------------------

    def hook(self, point: str, frames: range, x: np.ndarray) -> np.ndarray:
        """Pass `x` (frame-major) through the plugin hook, if any."""
        if self.on_activation is None:
            return x
        y = np.asarray(self.on_activation(point, frames, np.array(x, copy=True)))
        if y.shape != x.shape:
            raise BackendFailed(f"Codec {self.label}: the activation hook changed {point} from shape "
                                f"{x.shape} to {y.shape}")
        return y.astype(x.dtype, copy=False)

    def encode(self, audio: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Codes `[K, F]` of padded audio in one call."""
        audio = pad_to_frames(audio)
        codes = self._checked_codes(self._encode(audio), audio.shape[0] // FRAME_SIZE, "encode")
        if progress:
            progress(codes.shape[1], codes.shape[1])
        return self.hook("encode.codes", range(codes.shape[1]), codes.T).T

    def encode_steps(self, audio: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Codes `[K, F]`, one 1920-sample frame a call, as a live app feeds the microphone."""
        audio = pad_to_frames(audio)
        total = audio.shape[0] // FRAME_SIZE
        out = []
        for t, step in enumerate(self._encode_steps(audio)):
            step = self._checked_codes(step, 1, f"encode step {t}")
            out.append(self.hook("encode.codes", range(t, t + 1), step.T).T)
            if progress:
                progress(t + 1, total)
        if len(out) != total:
            raise BackendFailed(f"Codec {self.label} gave {len(out)} frames of codes for {total} frames of audio")
        return np.concatenate(out, axis=1)

    def decode(self, codes: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Audio `[F * 1920]` from codes `[K, F]` in one call."""
        codes = self._checked_input(codes)
        audio = self._checked_audio(self._decode(codes), codes.shape[1], "decode")
        if progress:
            progress(codes.shape[1], codes.shape[1])
        frames = audio.reshape(codes.shape[1], FRAME_SIZE)
        return self.hook("decode.audio", range(codes.shape[1]), frames).reshape(-1)

    def decode_steps(self, codes: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Audio `[F * 1920]`, one frame of codes a call, as a live app plays the model's output."""
        codes = self._checked_input(codes)
        out = []
        for t, pcm in enumerate(self._decode_steps(codes)):
            pcm = self._checked_audio(pcm, 1, f"decode step {t}")
            out.append(self.hook("decode.audio", range(t, t + 1), pcm.reshape(1, FRAME_SIZE)).reshape(-1))
            if progress:
                progress(t + 1, codes.shape[1])
        if len(out) != codes.shape[1]:
            raise BackendFailed(f"Codec {self.label} gave {len(out)} frames of audio for {codes.shape[1]} frames of codes")
        return np.concatenate(out)

    # --- checks --------------------------------------------------------------------------------------

    def _checked_codes(self, codes: np.ndarray, frames: int, what: str) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim == 3:
            codes = codes[0]
        if codes.shape != (self.n_codebooks, frames):
            raise BackendFailed(f"Codec {self.label} {what} gave codes of shape {codes.shape}, "
                                f"expected {(self.n_codebooks, frames)}")
        codes = codes.astype(np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.bins):
            raise BackendFailed(f"Codec {self.label} {what} gave codes outside 0..{self.bins - 1} "
                                f"({codes.min()}..{codes.max()})")
        return codes

    def _checked_input(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.n_codebooks or not np.issubdtype(codes.dtype, np.integer):
            raise XBackendError(f"Codec {self.label} decodes integer codes [{self.n_codebooks}, frames], "
                                f"got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.bins):
            raise XBackendError(f"Codes to decode lie outside 0..{self.bins - 1} ({codes.min()}..{codes.max()})",
                                fix="decode codes made by a codec with the same codebooks")
        return codes.astype(np.int64)

    def _checked_audio(self, audio: np.ndarray, frames: int, what: str) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.shape[0] < frames * FRAME_SIZE:
            raise BackendFailed(f"Codec {self.label} {what} gave {audio.shape[0]} samples for {frames} frames")
        audio = audio[: frames * FRAME_SIZE]
        if not np.isfinite(audio).all():
            bad = np.flatnonzero(~np.isfinite(audio))
            raise BackendFailed(f"Codec {self.label} {what} gave NaN/Inf audio ({bad.size} samples, first in "
                                f"frame {int(bad[0]) // FRAME_SIZE})")
        return audio
