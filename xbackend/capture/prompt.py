"""Prompts: the user's audio, encoded once by the reference codec, or a codes file.

Every backend receives the same `Prompt.codes`; nothing here depends on a backend, nor on
`--steps`: audio is encoded frame by frame by the streaming encoder, as upstream's servers and
`moshi.run_inference` feed Moshi (one 1920-sample frame a call inside `mimi.streaming`), and the
steps past the audio's end are the same encoder fed silence. Each frame's code then depends only on
the audio up to that frame, so runs of any `--steps` get equal codes on their common prefix
(docs/design.md, Prompts). Encoding the whole clip in one call instead gave codes that changed
with the padded length (convolution and matmul shapes change the rounding; issue 18).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codecs.base import FRAME_SIZE, SAMPLE_RATE, frame_count
from ..errors import XBackendError
from .models import REFERENCE, ModelRef, codec_for

DEFAULT_PROMPT = REFERENCE / "prompts" / "hello.wav"
CODES_SUFFIXES = (".npy", ".safetensors")
MIN_RATE, MAX_RATE = 4000, 768000  # telephone speech to the highest studio rate
MAX_PROMPT_SECONDS = 7200.0
ENCODING = "streaming"  # how audio became codes: frame by frame, then silence (recorded in every trace)


@dataclass(frozen=True)
class Prompt:
    """User codes `[n_user, fed frames]` (int64) and where they came from.

    `frames` is the prompt's own length (its audio's frames, or a codes file's); the codes past it
    are the silence fill that makes `steps` frames. `digest` covers the prompt's own codes only, so
    it does not change with `--steps`."""

    codes: np.ndarray
    source: str
    kind: str  # audio | codes
    digest: str
    seconds: float | None = None
    frames: int | None = None  # None: all of `codes`

    @property
    def own_frames(self) -> int:
        return int(self.codes.shape[1]) if self.frames is None else int(self.frames)

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "digest": self.digest, "frames": self.own_frames,
                "fed_frames": int(self.codes.shape[1]), "encoding": ENCODING if self.kind == "audio" else None,
                "seconds": self.seconds}


def codes_digest(codes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codes, dtype=np.int64).tobytes()).hexdigest()[:16]


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by FFT (exact for the prompt's length; no extra dependency)."""
    if rate_in == rate_out or audio.size == 0:
        return audio.astype(np.float32)
    n_out = int(round(audio.shape[-1] * rate_out / rate_in))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    keep = min(spectrum.shape[-1], n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=n_out) * (n_out / audio.shape[-1])
    return out.astype(np.float32)


def check_length(frames: int, rate: int, source: str) -> None:
    if frames / rate > MAX_PROMPT_SECONDS:
        raise XBackendError(f"Audio {source} lasts {frames / rate:.0f} s, longer than the {MAX_PROMPT_SECONDS:.0f} s "
                            "a prompt may take", fix="cut the prompt to the part you need")


def check_audio(samples: np.ndarray, rate, source: str) -> None:
    """Audio a codec can encode: a sane sample rate, some samples, all finite, not hours long."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
        raise XBackendError(f"Audio {source} has sample rate {rate!r} Hz",
                            asked=f"prompts are resampled to {SAMPLE_RATE} Hz from rates of {MIN_RATE} to {MAX_RATE} Hz",
                            fix="re-export the audio at a standard rate such as 24000 or 48000 Hz")
    if samples.shape[0] == 0:
        raise XBackendError(f"Audio file {source} is empty", fix="pass a prompt with some audio in it")
    check_length(samples.shape[0], rate, source)
    bad = ~np.isfinite(samples)
    if bad.any():
        first = int(np.argmax(bad.any(axis=1) if bad.ndim > 1 else bad))
        raise XBackendError(f"Audio {source} holds {int(bad.sum())} NaN or infinite samples (the first at "
                            f"{first / rate:.3f} s)", asked="a codec would encode them to meaningless codes",
                            fix="re-export the audio from its source")


def read_audio(path: Path) -> np.ndarray:
    """Mono float32 at 24 kHz, whatever the file's rate and channel count."""
    import soundfile as sf

    try:
        info = sf.info(str(path))  # rate and length first: never read (or resample) hours of audio
        check_audio(np.zeros((min(int(info.frames), 1), 1)), int(info.samplerate), str(path))
        check_length(int(info.frames), int(info.samplerate), str(path))
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except XBackendError:
        raise
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError for bad files
        raise XBackendError(f"Cannot read audio {path} ({(str(exc).splitlines() or [type(exc).__name__])[0]})",
                            asked="prompts are WAV/FLAC audio or a codes file (.npy/.safetensors)",
                            fix="re-export the audio as WAV or FLAC") from None
    check_audio(data, int(rate), str(path))
    return resample(data.mean(axis=1), int(rate))


def read_codes(path: Path, key: str = "codes") -> np.ndarray:
    """A 2-D integer array `[K, T]` from .npy or .safetensors (no pickle)."""
    try:
        if path.suffix.lower() == ".npy":
            codes = np.load(path, allow_pickle=False)
            if not isinstance(codes, np.ndarray):  # np.load opens a .npz archive whatever its name
                codes.close()
                raise XBackendError(f"Codes file {path} is an .npz archive named .npy",
                                    fix="save one array with np.save('codes.npy', codes), or rename the file .npz "
                                        "and extract the codes array")
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if key not in tensors:
                raise XBackendError(f"Codes file {path} has no tensor {key!r}",
                                    asked=f"it holds {', '.join(tensors) or 'nothing'}")
            codes = tensors[key]
    except XBackendError:
        raise
    except Exception as exc:
        raise XBackendError(f"Cannot read codes file {path} ({str(exc).splitlines()[0]})") from None
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise XBackendError(f"Codes file {path} holds an array of shape {codes.shape} and dtype {codes.dtype}",
                            asked="expected integer codes of shape [K, T]: row 0 text, then the audio codebooks",
                            fix="save codes as int64 [K, T], e.g. np.save('codes.npy', codes)")
    return codes.astype(np.int64)


def check_codes_range(codes: np.ndarray, vocab: int, what: str) -> None:
    """Codes must index the model's embeddings: an out-of-range code is bad input, not a backend crash."""
    if codes.size and (codes.min() < 0 or codes.max() >= vocab):
        bad = codes[(codes < 0) | (codes >= vocab)]
        raise XBackendError(f"{what} holds code {int(bad[0])}, outside the vocabulary [0, {vocab - 1}]",
                            asked=f"{bad.size} of {codes.size} codes are out of range",
                            fix="encode the prompt with the codec that belongs to this model")


def user_rows(codes: np.ndarray, model: ModelRef, path: Path) -> np.ndarray:
    """Pick the user codebooks out of a codes file: `[n_user, T]` or the full `[1 + n_q, T]` layout."""
    k = codes.shape[0]
    if k in (model.n_user, 1 + int(model.config["n_q"])):
        rows = codes[k - model.n_user:]
        check_codes_range(rows, int(model.config["card"]), f"Codes file {path}")
        return rows
    raise XBackendError(
        f"Codes file {path} has {k} rows, which fits neither layout of model {model.name}",
        asked=f"expected {model.n_user} rows (the user's codebooks) or {1 + int(model.config['n_q'])} "
        "(text, then all audio codebooks, as LMModel.forward takes)",
        fix="re-encode the prompt for this model")


def prompt_of_codes(codes: np.ndarray, source: str, frames: int | None = None) -> Prompt:
    """A prompt given as codes; `frames` < the codes' length marks the rest as the fill an audio prompt
    was given (a run directory's `prompt_codes.npy` holds both), so the digest is the audio prompt's."""
    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or not 1 <= frames <= codes.shape[1]:
            raise XBackendError(f"Prompt frames {frames!r} do not fit codes file {source}",
                                asked=f"it holds {codes.shape[1]} frames; the prompt's own length is 1 to that",
                                fix="drop --prompt-frames (or fix baseline.json's prompt.frames), or pass the "
                                    "frames the prompt itself took")
        frames = int(frames)
    own = codes if frames is None else codes[:, :frames]
    return Prompt(codes, source, "codes", codes_digest(own), frames=frames)


def encode_audio(audio: np.ndarray, model: ModelRef, steps: int) -> tuple[np.ndarray, int]:
    """Codes for `max(steps, the audio's frames)` frames, and the audio's own frame count: the streaming
    encoder, one frame a call, over the audio and then silence (the last partial frame is zero-padded)."""
    own = frame_count(audio.shape[0])
    if model.n_user == 0:
        return np.zeros((0, max(steps, own)), dtype=np.int64), own
    codec = codec_for(model, model.n_user, same_bins=False)  # its codes must only fit the model's card
    padded = np.zeros(max(steps, own) * FRAME_SIZE, dtype=np.float32)
    padded[: audio.shape[0]] = audio
    from ..codecs import encode_prompt

    codes = encode_prompt(codec, padded, model.n_user)
    if codes.max(initial=0) >= int(model.config["card"]):
        raise XBackendError(f"The codec gives codes up to {codes.max()}, beyond model {model.name}'s "
                            f"vocabulary of {model.config['card']}",
                            fix="use the codec that belongs to the model (a codec/ folder beside the checkpoint)")
    return codes, own


def load_prompt(path: str | None, model: ModelRef, steps: int, frames: int | None = None) -> Prompt:
    """Codes for at least `steps` frames, equal on their common prefix whatever `steps` is.

    `frames` applies to a codes file only: its first `frames` frames are the prompt itself."""
    file = Path(path).expanduser() if path else DEFAULT_PROMPT
    if not file.exists():
        raise XBackendError(f"Prompt {file} does not exist",
                            fix="pass an existing WAV/FLAC file or codes file with --prompt")
    if not file.is_file():
        raise XBackendError(f"Prompt {file} is not a regular file",
                            fix="pass a WAV/FLAC file or codes file with --prompt")
    if file.suffix.lower() in CODES_SUFFIXES:
        codes = user_rows(read_codes(file), model, file)
        if codes.shape[1] < steps and model.n_user:
            raise XBackendError(f"Codes file {file} has {codes.shape[1]} frames, fewer than the {steps} steps asked for",
                                fix=f"pass --steps {codes.shape[1]} or a longer prompt")
        return prompt_of_codes(codes, str(file), frames)
    if frames is not None:
        raise XBackendError(f"--prompt-frames {frames} was given with audio prompt {file}",
                            asked="--prompt-frames marks the prompt's own frames in a codes file; audio knows its length",
                            fix="drop --prompt-frames")
    audio = read_audio(file)
    codes, own = encode_audio(audio, model, steps)
    return Prompt(codes, str(file), "audio", codes_digest(codes[:, :own]), round(audio.shape[0] / SAMPLE_RATE, 3),
                  frames=own)
