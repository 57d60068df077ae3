"""Model references: the bundled `tiny`, a local checkpoint, or `hf://owner/repo`.

Resolving a model reads only JSON and safetensors headers; weights are loaded by backends.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import XBackendError

REFERENCE = Path(__file__).resolve().parent.parent / "reference"
TINY = REFERENCE / "models" / "tiny"
TINY_CODEC = REFERENCE / "codecs" / "tiny"

# Upstream's Moshi 7B config (moshi/models/loaders.py `_lm_kwargs`), used for hf:// repos that
# ship no config.json and for the random-weight 7B-shaped benchmark model.
MOSHI_7B_CONFIG = {
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8,
    "card": 2048, "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True,
    "layer_scale": None, "context": 3000, "max_period": 10000, "gating": "silu",
    "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": 1024,
    "depformer_dim_feedforward": 4224, "depformer_num_heads": 16, "depformer_num_layers": 6,
    "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 8,
    "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}
# Keys of a repository config.json that are not LMModel arguments.
NON_LM_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name",
               "model_type", "lm_gen_config", "tts_config", "stt_config", "model_id")
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
# The text tokenizer Kyutai's repositories ship (config.json `tokenizer_name`), then the bundled model's.
TEXT_TOKENIZER_NAMES = ("tokenizer_spm_32k_3.model", "tokenizer.model")
FULL_HASH_LIMIT = 256 << 20


@dataclass(frozen=True)
class CodecRef:
    """A Mimi-family codec: its config (None means upstream's default) and weights."""

    weights: Path
    config: dict | None = None


@dataclass(frozen=True)
class ModelRef:
    """Where a model's weights and config are, and what its streams look like."""

    name: str
    config: dict
    weights: Path
    digest: str
    source: str  # bundled | local | hf
    layout: str  # published (in_proj_weight) | per_step (in_projs.N) | mlx (moshi_mlx native)
    quant: str | None = None  # bit width of an MLX-native quantized checkpoint
    codec: CodecRef | None = field(default=None, compare=False)
    tokenizer: Path | None = field(default=None, compare=False)  # SentencePiece model of the text stream

    @property
    def dep_q(self) -> int:
        return int(self.config["dep_q"])

    @property
    def n_user(self) -> int:
        """Codebooks of the user's audio fed to the model (0 for models without them)."""
        return int(self.config["n_q"]) - self.dep_q

    @property
    def streams(self) -> list[str]:
        return ["text"] + [f"audio{i}" for i in range(self.dep_q)]

    @property
    def vocab(self) -> list[int]:
        return [int(self.config.get("text_card_out") or self.config["text_card"])] + [int(self.config["card"])] * self.dep_q

    @property
    def delays(self) -> list[int]:
        """Delays of the generated streams (text first)."""
        return [int(d) for d in self.config["delays"][: 1 + self.dep_q]]

    @property
    def user_delays(self) -> list[int]:
        return [int(d) for d in self.config["delays"][1 + self.dep_q:]]

    def describe(self) -> dict:
        out = {"name": self.name, "digest": self.digest, "source": self.source, "layout": self.layout,
               "quant": self.quant, "weights": str(self.weights), "config": self.config}
        if self.tokenizer is not None:
            out["tokenizer"] = {"name": self.tokenizer.name, "path": str(self.tokenizer),
                                "digest": file_digest(self.tokenizer)}
        return out


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes) without reading the data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise XBackendError(f"Cannot read checkpoint {path}: not a safetensors file ({exc})",
                            fix="pass a .safetensors checkpoint in moshi's layout") from None
    header.pop("__metadata__", None)
    return header


def file_digest(path: Path) -> str:
    """sha256 of the file; for very large files, of its header and size (cheap and still exact
    about layout, dtypes and shapes)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 20))
            h.update(str(size).encode())
    return h.hexdigest()[:16]


def detect_layout(path: Path) -> tuple[str, str | None]:
    keys = safetensors_header(path).keys()
    if any(k.startswith("depformer.slices.") or k.startswith("audio_embs.") for k in keys):
        quant = None
        if any(k.endswith(".scales") for k in keys):
            quant = "q4" if ".q4." in path.name else "q8"
        return "mlx", quant
    if any(".in_projs." in k for k in keys):
        return "per_step", None
    return "published", None


_PER_STEP = re.compile(r"^(.*\.self_attn)\.(in_projs|out_projs)\.(\d+)\.weight$")
_PUBLISHED = {"in_projs": "in_proj_weight", "out_projs": "out_proj.weight"}


def to_published_layout(state: dict, concatenate: Callable = np.concatenate) -> dict:
    """Rewrite per-step attention weights into the layout of Kyutai's released checkpoints.

    Newer moshi state dicts keep one Linear per depformer step (`self_attn.in_projs.N.weight`,
    `out_projs.N.weight`; the main transformer has N = 0 only); released files hold them
    concatenated along dim 0 in step order as `in_proj_weight` / `out_proj.weight`, the only form
    moshi_mlx's `Lm.load_pytorch_weights` reads. Other tensors pass through unchanged.
    `concatenate` lets a caller join its own array type (bfloat16 has no numpy dtype).
    """
    out: dict = {}
    grouped: dict[str, dict[int, object]] = {}
    for key, value in state.items():
        match = _PER_STEP.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, kind, index = match.groups()
        grouped.setdefault(f"{prefix}.{_PUBLISHED[kind]}", {})[int(index)] = value
    for key, parts in grouped.items():
        if sorted(parts) != list(range(len(parts))):
            raise XBackendError(f"Checkpoint has per-step weights for {key} with steps {sorted(parts)}",
                                asked="per-step attention weights must be numbered 0..N-1 without gaps",
                                fix="pass a complete checkpoint")
        if key in out:
            raise XBackendError(f"Checkpoint holds both {key} and its per-step parts",
                                fix="keep one layout per checkpoint")
        out[key] = concatenate([parts[i] for i in range(len(parts))], axis=0)
    return out


def _read_raw_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise XBackendError(f"Model config {path} does not exist",
                            fix="pass the config.json holding the LMModel arguments") from None
    except ValueError as exc:
        raise XBackendError(f"Model config {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "dep_q" not in data or "delays" not in data:
        raise XBackendError(f"Model config {path} is not a Moshi LM config",
                            asked="expected the LMModel keyword arguments (dim, n_q, dep_q, card, "
                            "text_card, delays, ...), as in moshi's configs/moshi_7b_202409.json")
    return data


def _local(name: str, weights: Path, config_path: Path, source: str, codec: CodecRef | None) -> ModelRef:
    raw = _read_raw_config(config_path)
    config = {k: v for k, v in raw.items() if k not in NON_LM_KEYS}
    layout, quant = detect_layout(weights)
    digest = hashlib.sha256((file_digest(weights) + json.dumps(config, sort_keys=True)).encode()).hexdigest()[:16]
    return ModelRef(name=name, config=config, weights=weights, digest=digest, source=source,
                    layout=layout, quant=quant, codec=codec, tokenizer=_local_tokenizer(weights.parent, raw))


def _local_tokenizer(directory: Path, raw: dict) -> Path | None:
    """The text tokenizer beside a checkpoint: the file config.json names, else a known name.

    A name is a plain file name in the checkpoint's directory: a path elsewhere is not followed."""
    named = raw.get("tokenizer_name")
    names = [named] if isinstance(named, str) and named == Path(named).name and named not in ("", ".", "..") else []
    for candidate in names + list(TEXT_TOKENIZER_NAMES):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def _pick_weights(directory: Path) -> Path:
    for candidate in ("model.safetensors", "model.q8.safetensors", "model.q4.safetensors"):
        if (directory / candidate).is_file():
            return directory / candidate
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise XBackendError(f"No checkpoint found in {directory}",
                        asked=f"found {', '.join(p.name for p in found) or 'no .safetensors file'}",
                        fix="put the weights in model.safetensors beside config.json")


def tiny_codec() -> CodecRef:
    """The bundled Mimi-family codec (reference/codecs/tiny)."""
    return CodecRef(TINY_CODEC / "model.safetensors", json.loads((TINY_CODEC / "config.json").read_text()))


def resolve_model(name: str = "tiny", config: str | None = None) -> ModelRef:
    """Turn what the user typed (`tiny`, a directory, a file, `hf://owner/repo`) into a ModelRef."""
    if name == "tiny":
        return _local("tiny", TINY / "model.safetensors", TINY / "config.json", "bundled", tiny_codec())
    if name.startswith("hf://"):
        return _from_hub(name, config)
    path = Path(name).expanduser()
    if path.is_dir():
        cfg = Path(config) if config else path / "config.json"
        codec = _local_codec(path)
        return _local(name, _pick_weights(path), cfg, "local", codec)
    if path.is_file():
        if not config:
            sibling = path.parent / "config.json"
            if not sibling.is_file():
                raise XBackendError(f"No config for checkpoint {path}",
                                    fix="pass --model-config FILE (the LMModel arguments as JSON)")
            config = str(sibling)
        return _local(name, path, Path(config), "local", _local_codec(path.parent))
    raise XBackendError(f"Model {name!r} not found",
                        asked="a model is `tiny` (bundled), a checkpoint directory (config.json + "
                        "model.safetensors), a .safetensors file with --model-config, or hf://owner/repo",
                        fix="check the path")


def _local_codec(directory: Path) -> CodecRef | None:
    """A codec beside a local checkpoint: a `codec/` folder or upstream's Mimi file."""
    if (directory / "codec" / "model.safetensors").is_file():
        cfg = directory / "codec" / "config.json"
        return CodecRef(directory / "codec" / "model.safetensors",
                        json.loads(cfg.read_text()) if cfg.is_file() else None)
    if (directory / MIMI_NAME).is_file():
        return CodecRef(directory / MIMI_NAME, None)
    return None


def hub_parts(name: str) -> tuple[str, str | None]:
    """`hf://owner/repo[/file]` as (owner/repo, file or None)."""
    parts = name.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise XBackendError(f"Cannot read hub reference {name!r}", fix="write hf://owner/repo, e.g. hf://kyutai/moshiko-pytorch-bf16")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def hub_error(name: str, exc: Exception, option: str) -> XBackendError:
    """What a failed hub download tells the user (huggingface_hub raises many types: offline, 404, auth)."""
    return XBackendError(
        f"Cannot fetch {name} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
        asked="hf:// references are downloaded when asked for, which needs network access",
        fix=f"connect to the network (or set HF_TOKEN for gated repos), or download the files and pass their local "
            f"path with {option}")


def _from_hub(name: str, config: str | None) -> ModelRef:
    """Download (only now, because the user asked) a PyTorch or MLX Moshi repo from the hub."""
    repo, filename = hub_parts(name)
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
        files = list_repo_files(repo)
        cfg_path = Path(config) if config else None
        if cfg_path is None and "config.json" in files:
            cfg_path = Path(hf_hub_download(repo, "config.json"))
        raw = json.loads(cfg_path.read_text()) if cfg_path else dict(MOSHI_7B_CONFIG)
        weights_name = filename or raw.get("moshi_name") or next(
            (f for f in ("model.safetensors", "model.q8.safetensors", "model.q4.safetensors") if f in files), None)
        if weights_name is None:
            raise XBackendError(f"Repository {repo} has no Moshi checkpoint", asked=f"files: {', '.join(files[:12])}")
        weights = Path(hf_hub_download(repo, weights_name))
        mimi_name = raw.get("mimi_name", MIMI_NAME)
        codec = CodecRef(Path(hf_hub_download(repo, mimi_name)), None) if mimi_name in files else None
        tokenizer_name = next((n for n in [raw.get("tokenizer_name"), *TEXT_TOKENIZER_NAMES] if n in files), None)
        tokenizer = Path(hf_hub_download(repo, tokenizer_name)) if tokenizer_name else None
    except XBackendError:
        raise
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, auth
        raise hub_error(name, exc, "--model") from None
    config_dict = {k: v for k, v in raw.items() if k not in NON_LM_KEYS}
    layout, quant = detect_layout(weights)
    digest = hashlib.sha256((file_digest(weights) + json.dumps(config_dict, sort_keys=True)).encode()).hexdigest()[:16]
    return ModelRef(name=name, config=config_dict, weights=weights, digest=digest, source="hf",
                    layout=layout, quant=quant, codec=codec, tokenizer=tokenizer)
