"""Model references: the bundled `tiny`, a local checkpoint, or `hf://owner/repo`.

Resolving a model reads only JSON and safetensors headers; weights are loaded by backends.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import XBackendError
from ..streams import stream_names

REFERENCE = Path(__file__).resolve().parents[2] / "reference"
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
        return stream_names(self.dep_q)

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


MAX_HEADER_BYTES = 100 << 20
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def require_safetensors(path: Path, what: str = "checkpoint") -> None:
    """Only safetensors are ever loaded: any other file could be a pickle that torch.load would run."""
    if Path(path).suffix.lower() != ".safetensors":
        raise XBackendError(f"Refusing {what} {path}: only .safetensors files are loaded",
                            asked="other formats (.bin, .pt, .ckpt) are pickles, which can run code when loaded",
                            fix="convert it to safetensors (safetensors.torch.save_file) and pass that file")
    import os
    import stat

    from ..store.files import kind_of_mode

    try:
        mode = os.stat(path).st_mode  # a link the user gave (a Hugging Face cache) is theirs to follow
    except FileNotFoundError:
        return  # said where it is looked for
    except OSError as exc:
        raise XBackendError(f"Cannot read {what} {path} ({exc.strerror})", fix="pass a readable .safetensors file") from None
    if not stat.S_ISREG(mode):
        raise XBackendError(f"{what} {path} is not a regular file (it is {kind_of_mode(mode)})",
                            fix="pass a .safetensors file")


def safetensors_header(path: Path, what: str = "checkpoint") -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes), checked against the file's size
    (a truncated or forged file is bad input, caught before any library reads it)."""
    path = Path(path)
    require_safetensors(path, what)

    def bad(why: str) -> XBackendError:
        return XBackendError(f"Cannot read {what} {path}: {why}",
                             fix="pass a complete .safetensors file in moshi's layout (download or convert it again)")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"its header claims {n} bytes, but the file has {size}: not a safetensors file, or truncated")
            from ..store.files import parse_json

            header = parse_json(f.read(n), f"the header of {path}", "", expect=None)
    except XBackendError:
        raise
    except (OSError, ValueError, struct.error, RecursionError) as exc:
        raise bad(f"not a safetensors file ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, t in header.items():
        try:
            dtype, shape, (start, stop) = t["dtype"], t["shape"], t["data_offsets"]
            count = 1
            for d in shape:
                if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                    raise ValueError
                count *= d
            ok = (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop
                  and stop - start == count * SAFETENSORS_DTYPES[dtype])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry in the header") from None
        if not ok:
            raise bad(f"tensor {name!r} ({dtype} {shape}) does not match its byte range {t['data_offsets']}")
        if stop > data:
            raise bad(f"tensor {name!r} ends at byte {stop} of the data, but the file holds {data}: it is truncated")
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
    from ..store.files import load_json

    data = load_json(path, "Model config", "pass the config.json holding the LMModel arguments", expect=None,
                     follow=True)
    if not isinstance(data, dict) or "dep_q" not in data or "delays" not in data:
        raise XBackendError(f"Model config {path} is not a Moshi LM config",
                            asked="expected the LMModel keyword arguments (dim, n_q, dep_q, card, "
                            "text_card, delays, ...), as in moshi's configs/moshi_7b_202409.json")
    for key in ("moshi_name", "mimi_name"):
        if key in data:
            if not isinstance(data[key], str):
                raise XBackendError(f"Model config {path} has {key} {data[key]!r}, not a file name")
            require_safetensors(Path(data[key]), f"{key} {data[key]!r} of {path}")
    check_config({k: v for k, v in data.items() if k not in NON_LM_KEYS}, str(path))
    return data


# Integer LMModel arguments every backend reads, with their smallest sane value.
_CONFIG_INTS = {"dim": 1, "text_card": 1, "n_q": 1, "dep_q": 0, "card": 1, "num_heads": 1, "num_layers": 1}
_CONFIG_MAX = 1 << 20


def check_config(config: dict, source: str) -> None:
    """The LMModel arguments xbackend relies on are present, integers in range, and consistent."""
    def bad(key: str, want: str) -> XBackendError:
        return XBackendError(f"Model config {source} has {key} = {json.dumps(config.get(key), default=str)[:60]}, "
                             f"expected {want}",
                             fix="pass the config.json that belongs to the checkpoint (LMModel's keyword arguments)")

    for key, lo in _CONFIG_INTS.items():
        value = config.get(key)
        if key not in config:
            raise XBackendError(f"Model config {source} lacks {key!r}",
                                asked=f"xbackend needs {', '.join(_CONFIG_INTS)} and delays",
                                fix="pass the config.json that belongs to the checkpoint")
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= _CONFIG_MAX:
            raise bad(key, f"an integer from {lo} to {_CONFIG_MAX}")
    if config["dep_q"] > config["n_q"]:
        raise bad("dep_q", f"at most n_q ({config['n_q']})")
    if config.get("text_card_out") is not None and (
            not isinstance(config["text_card_out"], int) or isinstance(config["text_card_out"], bool)
            or not 1 <= config["text_card_out"] <= _CONFIG_MAX):
        raise bad("text_card_out", f"an integer from 1 to {_CONFIG_MAX}")
    delays = config.get("delays")
    if (not isinstance(delays, list) or len(delays) != config["n_q"] + 1
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1024 for d in delays)):
        raise bad("delays", f"a list of n_q + 1 = {config['n_q'] + 1} integers from 0 to 1024")
    for key, example in MOSHI_7B_CONFIG.items():  # the other arguments: of the type upstream's 7B config gives
        if key in _CONFIG_INTS or key == "delays" or key not in config or config[key] is None:
            continue
        value = config[key]
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(example), (int, float))
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise bad(key, f"a {'number' if float in kinds else kinds[0].__name__}, as in moshi's 7B config")
    pad = config.get("existing_text_padding_id")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < config["text_card"]):
        raise bad("existing_text_padding_id", f"an integer below text_card ({config['text_card']})")


def check_weights_fit(config: dict, header: dict, weights: Path) -> None:
    """The embedding tables of a PyTorch-layout checkpoint must have the config's sizes (else every
    backend would fail to load it, far later, blamed on the backend)."""
    want = {"text_emb.weight": [config["text_card"] + 1, config["dim"]]}
    want.update({f"emb.{i}.weight": [config["card"] + 1, config["dim"]] for i in range(config["n_q"])})
    for key, shape in want.items():
        entry = header.get(key)
        if entry is None or list(entry["shape"]) != shape:
            got = "absent" if entry is None else str(entry["shape"])
            raise XBackendError(f"Checkpoint {weights} does not fit its config: {key} is {got}, the config "
                                f"(dim {config['dim']}, text_card {config['text_card']}, card {config['card']}, "
                                f"n_q {config['n_q']}) needs {shape}",
                                fix="pass the config.json that belongs to these weights")


def _local(name: str, weights: Path, config_path: Path, source: str, codec: CodecRef | None) -> ModelRef:
    raw = _read_raw_config(config_path)
    config = {k: v for k, v in raw.items() if k not in NON_LM_KEYS}
    return checked_model(name, config, weights, source, codec, _local_tokenizer(weights.parent, raw))


def weights_digest(weights: Path, config: dict | None) -> str:
    """The one digest of a checkpoint (model or codec): its file digest and its config, as recorded everywhere."""
    return hashlib.sha256((file_digest(weights) + json.dumps(config, sort_keys=True)).encode()).hexdigest()[:16]


def checked_model(name: str, config: dict, weights: Path, source: str, codec: CodecRef | None,
                  tokenizer: Path | None) -> ModelRef:
    """A model reference once its weights are checked against its config, wherever they came from (a local
    directory or file, or the hub): the layout detected, the embedding tables sized, the codec a safetensors."""
    layout, quant = detect_layout(weights)
    if layout != "mlx":
        check_weights_fit(config, safetensors_header(weights), weights)
    if codec is not None:
        safetensors_header(codec.weights, "codec")
    return ModelRef(name=name, config=config, weights=weights, digest=weights_digest(weights, config), source=source,
                    layout=layout, quant=quant, codec=codec, tokenizer=tokenizer)


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


UPSTREAM_MIMI_QUANTIZER = {"n_q": 32, "bins": 2048}  # moshi.models.loaders._quantizer_kwargs


def codec_shape(codec: CodecRef) -> tuple[int, int]:
    """(codebooks, bins) of a codec, from its config (upstream Mimi's when it has none)."""
    q = UPSTREAM_MIMI_QUANTIZER if codec.config is None else (
        codec.config.get("quantizer") if isinstance(codec.config, dict) else None)
    n_q, bins = (q.get("n_q"), q.get("bins")) if isinstance(q, dict) else (None, None)
    if not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1 << 20 for x in (n_q, bins)):
        raise XBackendError(f"Codec config of {codec.weights} has no valid quantizer n_q and bins",
                            fix="pass the config.json that belongs to the codec")
    return n_q, bins


def codec_for(model: ModelRef, codebooks: int, *, same_bins: bool = True) -> CodecRef:
    """The model's codec, or the bundled tiny one, if it fits: at least `codebooks` codebooks and (with
    `same_bins`, as decoding needs) as many bins as the model's card. Else the audio would be garbage
    (or the codec would crash on codes beyond its codebooks), so say why instead."""
    codec = model.codec or tiny_codec()
    n_q, bins = codec_shape(codec)
    if (same_bins and bins != int(model.config["card"])) or bins > int(model.config["card"]) or n_q < codebooks:
        which = "its own codec" if model.codec else "the bundled tiny codec (the model ships none)"
        raise XBackendError(f"Model {model.name} has no codec that fits it: {which} has {n_q} codebooks of {bins} "
                            f"codes, the model needs {codebooks} of {model.config['card']}",
                            fix="put the model's Mimi checkpoint beside it (codec/model.safetensors + config.json, "
                                f"or {MIMI_NAME}), or pass a codes file as --prompt")
    return codec


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
        config = None
        if cfg.is_file():
            from ..store.files import load_json

            config = load_json(cfg, "Codec config", "pass the config.json that belongs to the codec", expect=None,
                               follow=True)
        return CodecRef(directory / "codec" / "model.safetensors", config)
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
        from ..store.files import load_json

        raw = load_json(cfg_path, "Model config", "pass --model-config", expect=None, follow=True) if cfg_path \
            else dict(MOSHI_7B_CONFIG)
        if not isinstance(raw, dict):
            raise XBackendError(f"Config of {repo} is not a JSON object")
        weights_name = filename or raw.get("moshi_name") or next(
            (f for f in ("model.safetensors", "model.q8.safetensors", "model.q4.safetensors") if f in files), None)
        if weights_name is None:
            raise XBackendError(f"Repository {repo} has no Moshi checkpoint", asked=f"files: {', '.join(files[:12])}")
        require_safetensors(Path(weights_name), f"weights {weights_name!r} of {repo}")
        mimi_name = raw.get("mimi_name", MIMI_NAME)
        require_safetensors(Path(str(mimi_name)), f"codec {mimi_name!r} of {repo}")
        check_config({k: v for k, v in raw.items() if k not in NON_LM_KEYS}, f"{repo}/config.json")
        weights = Path(hf_hub_download(repo, weights_name))
        codec = CodecRef(Path(hf_hub_download(repo, mimi_name)), None) if mimi_name in files else None
        tokenizer_name = next((n for n in [raw.get("tokenizer_name"), *TEXT_TOKENIZER_NAMES] if n in files), None)
        tokenizer = Path(hf_hub_download(repo, tokenizer_name)) if tokenizer_name else None
    except XBackendError:
        raise
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, auth
        raise hub_error(name, exc, "--model") from None
    return checked_model(name, {k: v for k, v in raw.items() if k not in NON_LM_KEYS}, weights, "hf", codec, tokenizer)
