"""Mimi codecs: one module per implementation (PyTorch, MLX, candle), a registry, and the codec
that encodes prompts and decodes generated audio everywhere else in xbackend.

Codec specs follow the backend grammar, `NAME[:DEVICE][:DTYPE]`: `torch`, `torch:cpu:fp64`,
`torch:mps`, `mlx:cpu`, `mlx:gpu:bf16`, `candle`, `candle:bf16`. Built-ins register through the
same hook plugins use (`register_codec`), third parties also through the `xbackend.codecs` entry-point
group; frameworks are imported only when a codec is created.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BackendUnavailable, XBackendError
from ..capture.models import MIMI_NAME, CodecRef, _local_codec, hub_error, hub_parts, tiny_codec, weights_digest
from ..registry import Registry
from ..spec import BackendSpec, Grammar, parse_spec, parse_specs
from .base import FRAME_SIZE, HOOK_POINTS, SAMPLE_RATE, ActivationHook, Codec, check_codebooks, codec_info

CodecFactory = Callable[[BackendSpec], Codec]
ENTRY_POINT_GROUP = "xbackend.codecs"
CODECS = Grammar(what="codec", devices=("cpu", "gpu", "cuda", "mps"),
                 examples="torch, torch:cpu:fp64, torch:mps, mlx:cpu, mlx:gpu:bf16, candle, candle:fp16",
                 option="--codecs torch,mlx:cpu,candle")
REFERENCE_CODEC = "torch:cpu"


def parse_codec_spec(text: str) -> BackendSpec:
    return parse_spec(text, CODECS)


def parse_codec_specs(text: str) -> list[BackendSpec]:
    return parse_specs(text, CODECS)


def _torch(spec: BackendSpec) -> Codec:
    from .torch_codec import TorchCodec

    return TorchCodec(spec)


def _mlx(spec: BackendSpec) -> Codec:
    from .mlx_codec import MlxCodec

    return MlxCodec(spec)


def _candle(spec: BackendSpec) -> Codec:
    from .candle_codec import CandleCodec

    return CandleCodec(spec)


REGISTRY: Registry[Codec] = Registry("codec", ENTRY_POINT_GROUP, {"torch": _torch, "mlx": _mlx, "candle": _candle},
                                     fix="name one of them, or load a plugin with --plugin FILE.py")
BUILTIN_CODECS = tuple(REGISTRY.builtins)


def register_codec(name: str, factory: CodecFactory) -> None:
    """Register `factory(spec) -> Codec` under `name` (the first part of a codec spec)."""
    REGISTRY.register(name, factory)


def unregister_codec(name: str) -> None:
    """Undo `register_codec(name, ...)`: a plugin's name disappears, a built-in name gets its built-in codec back."""
    REGISTRY.unregister(name)


def registered_codecs() -> list[str]:
    return REGISTRY.names()


def create_codec(spec: BackendSpec | str) -> Codec:
    """A codec instance for `spec`; unknown names raise with the list of known ones."""
    return REGISTRY.create(parse_codec_spec(spec) if isinstance(spec, str) else spec)


def require_codec(codec: Codec) -> Codec:
    """Raise `BackendUnavailable` (exit 3) with the reason and the install line when `codec` cannot run here."""
    reason = codec.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"Codec {codec.label} is unavailable: {reason}")
    return codec


def wrap_codec(spec: BackendSpec | str, on_activation: ActivationHook) -> CodecFactory:
    """A factory for `spec` whose activations pass through `on_activation(point, frames, x) -> x`
    (points: `HOOK_POINTS`; `x` frame-major over `frames`): fault injection in tests, probes in plugins.

    The factory registered for `spec` now is the one wrapped, so a plugin may re-register a
    built-in name around itself (`register_codec("mlx", wrap_codec("mlx", ...))`). The requested
    spec's device and dtype are kept (`flip:bf16` runs the wrapped codec in bf16)."""
    return REGISTRY.wrap(parse_codec_spec(spec) if isinstance(spec, str) else spec, on_activation=on_activation)


# --------------------------------------------------------------------------- which weights


def resolve_codec(name: str | None) -> CodecRef:
    """`tiny` (bundled, PyTorch-only), a Mimi .safetensors file, a directory (model.safetensors +
    config.json, a `codec/` folder, or upstream's Mimi file), or `hf://owner/repo[/file]` (downloaded
    now, because the user asked)."""
    if name in (None, "", "tiny"):
        return tiny_codec()
    if name.startswith("hf://"):
        return _codec_from_hub(name)
    found = _resolve_local(Path(name).expanduser(), name)
    codec_info(CodecRef(found.weights))  # a Mimi checkpoint at all? (before its config is read)
    config = found.config
    return CodecRef(found.weights, _read_codec_config(config) if isinstance(config, Path) else config)


def _resolve_local(path: Path, name: str) -> CodecRef:
    """The weights, and the config as a path still to read (or None for the released config)."""
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            cfg = path / "config.json"
            return CodecRef(path / "model.safetensors", cfg if cfg.is_file() else None)
        found = _local_codec(path)
        if found is None:
            raise XBackendError(f"No Mimi checkpoint in {path}",
                                asked=f"looked for model.safetensors, codec/model.safetensors and {MIMI_NAME}",
                                fix="pass the Mimi .safetensors file itself")
        return found
    if path.is_file():
        cfg = path.parent / "config.json"
        return CodecRef(path, cfg if cfg.is_file() and path.name == "model.safetensors" else None)
    raise XBackendError(f"Codec {name!r} not found",
                        asked="a codec is `tiny` (bundled), a Mimi .safetensors file, a directory holding one, "
                              "or hf://owner/repo", fix="check the path")


def _read_codec_config(path: Path) -> dict:
    from ..store.files import load_json

    data = load_json(path, "Codec config", "pass the config.json that belongs to the codec", expect=None, follow=True)
    if not isinstance(data, dict) or not {"seanet", "quantizer", "transformer"} <= set(data):
        raise XBackendError(f"Codec config {path} is not a Mimi config",
                            asked="expected moshi's mimi_config keys seanet, quantizer, transformer",
                            fix="remove it to use the released Mimi config, or pass the right one")
    return data


def _codec_from_hub(name: str) -> CodecRef:
    repo, filename = hub_parts(name)
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        if filename is None:
            files = list_repo_files(repo)
            filename = MIMI_NAME if MIMI_NAME in files else next(
                (f for f in files if f.startswith("tokenizer") and f.endswith(".safetensors")), None)
            if filename is None:
                raise XBackendError(f"Repository {repo} has no Mimi checkpoint", asked=f"files: {', '.join(files[:12])}")
        return CodecRef(Path(hf_hub_download(repo, filename)), None)
    except XBackendError:
        raise
    except Exception as exc:
        raise hub_error(name, exc, "--codec") from None


def codec_digest(ref: CodecRef) -> str:
    return weights_digest(ref.weights, ref.config)


def describe_codec(ref: CodecRef) -> dict:
    return {"weights": str(ref.weights), "digest": codec_digest(ref), "config": "released" if ref.config is None else "custom"}


# --------------------------------------------------------------------------- in-process use


def load_codec(spec: BackendSpec | str, ref: CodecRef, n_codebooks: int) -> Codec:
    """Create, check and load one codec in this process (prompt encoding, audio decoding)."""
    codec = require_codec(create_codec(spec))
    info = check_codebooks(ref, n_codebooks)
    codec.check(ref, info)
    codec.load(ref, n_codebooks)
    return codec


@functools.lru_cache(maxsize=4)
def _shared(spec: str, weights: str, config: str, n_codebooks: int) -> Codec:
    """One loaded codec per process and setting: a command encodes the prompt, then decodes every backend."""
    return load_codec(spec, CodecRef(Path(weights), json.loads(config)), n_codebooks)


def shared_codec(spec: str, ref: CodecRef, n_codebooks: int) -> Codec:
    return _shared(spec, str(ref.weights), json.dumps(ref.config, sort_keys=True), n_codebooks)


def encode_prompt(ref: CodecRef, audio: np.ndarray, n_codebooks: int, spec: str = REFERENCE_CODEC) -> np.ndarray:
    """24 kHz mono audio to codes `[n_codebooks, frames]` (int64), by default with the reference codec,
    frame by frame as upstream's servers feed Moshi: frame t's codes depend on the audio up to t only."""
    return shared_codec(spec, ref, n_codebooks).encode_steps(audio)


def decode_codes(ref: CodecRef, codes: np.ndarray, spec: str = REFERENCE_CODEC) -> np.ndarray:
    """Codes `[n_codebooks, frames]` to 24 kHz mono float32 audio."""
    return shared_codec(spec, ref, codes.shape[0]).decode(codes)


__all__ = ["Codec", "CodecRef", "FRAME_SIZE", "HOOK_POINTS", "SAMPLE_RATE", "BUILTIN_CODECS", "REFERENCE_CODEC",
           "create_codec", "register_codec", "unregister_codec", "registered_codecs", "wrap_codec", "resolve_codec",
           "load_codec", "encode_prompt", "decode_codes", "parse_codec_spec", "parse_codec_specs", "require_codec"]
