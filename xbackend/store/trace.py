"""Step traces (docs/design.md, Trace format): one directory per run, loadable with numpy alone, written step by step.

Layout of a trace directory:

- `meta.json`: everything needed to read and to judge the run (streams, vocab sizes, dtypes,
  settings, env fingerprint, status); rewritten atomically at the start and at the end.
- `logits-<stream>.bin`: raw little-endian rows `[steps, vocab]` in the stored dtype
  `logits_dtype`: `float32` (the logits as upstream hands them to its sampler; moshi casts them
  to float32 there, fp64 runs included), or, losslessly, the 2-byte dtype a bf16/fp16 model
  computed them in: `float16`, or `bfloat16` stored as the upper 16 bits of the float32 value
  (`uint16` on disk: numpy has no bfloat16). Loading always gives float32 (float64 for `float64`).
- `tokens.bin` int32 `[steps, streams]`, `margins.bin` float32 `[steps, streams]`,
  `inputs.bin` int32 `[steps, user_streams]` (the user codes passed at that step).
- `digests.txt`: one line per step, the sha256 of that step's logits as logical values
  (float32 bytes; float64 for float64 traces), all streams: a bf16 trace and its float32 copy
  have equal digests. A token-only trace (`has_logits: false`, e.g. imported from an app's
  logs) has no logits files and digests that step's int32 tokens instead.

A token trace (`"has_logits": false`, e.g. a Rust app's session brought in by `xbackend import`)
has no `logits-*.bin`; each digest line is then the sha256 of that step's tokens.

A step is complete once its digest line is written (it is written last), so a run killed at
step N keeps steps 0..N-1 and the loader says so.

Traces arrive in bundles attached to public issues, so `load_trace` trusts nothing: every
meta.json field is type- and range-checked, file sizes must fit the streams, no file may be a
symbolic link, tokens must lie in their vocabularies, and every step's digest is recomputed from
the data (`verify=False` skips only that last part, for a trace this process just wrote).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import XBackendError
from .files import dir_in, open_stream, parse_json, read_bytes, replaceable, write_json

SCHEMA = "xbackend.trace/1"
META = "meta.json"
DIGESTS = "digests.txt"
# Stored dtype name -> on-disk numpy dtype (little-endian). bfloat16 is the upper half of a float32.
LOGITS_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "float16": np.dtype("<f2"),
                 "bfloat16": np.dtype("<u2")}
COMPACT = {"bf16": "bfloat16", "fp16": "float16"}  # backend dtype -> lossless 2-byte storage
STATUSES = ("running", "complete", "failed", "interrupted")
MAX_STREAMS = 64
MAX_VOCAB = 1 << 20
MAX_INPUTS = 256
MAX_META_BYTES = 16 << 20
MAX_DIGESTS_BYTES = 33 * 1_000_000  # ten times validate.MAX_STEPS
STREAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_DIGEST_LINE = re.compile(rb"[0-9a-f]{32}")
_VERIFY_BLOCK_BYTES = 8 << 20


class TruncatedTraceWarning(UserWarning):
    """A trace ended before its run finished; the complete steps are still loaded."""


# --------------------------------------------------------------------------- dtypes and digests


def logical_dtype(stored: str) -> np.dtype:
    """The dtype logits have once loaded (and are digested in): float64 for float64 traces, else float32."""
    return np.dtype("<f8") if stored == "float64" else np.dtype("<f4")


def decode_logits(raw: np.ndarray, stored: str) -> np.ndarray:
    """On-disk rows to their logical values (exact: every stored dtype widens losslessly)."""
    if stored == "bfloat16":
        return (np.asarray(raw, dtype="<u2").astype("<u4") << np.uint32(16)).view("<f4")
    if stored == "float16":
        return np.asarray(raw).astype("<f4")
    return np.asarray(raw)


def encode_logits(row: np.ndarray, stored: str) -> np.ndarray | None:
    """A logical row in the stored dtype, or None when that would change a value (bit for bit)."""
    if stored == "bfloat16":
        bits = np.ascontiguousarray(row, dtype="<f4").view("<u4")
        return None if np.any(bits & np.uint32(0xFFFF)) else (bits >> np.uint32(16)).astype("<u2")
    if stored == "float16":
        x = np.ascontiguousarray(row, dtype="<f4")
        half = x.astype("<f2")
        return half if np.array_equal(half.astype("<f4").view("<u4"), x.view("<u4")) else None
    return np.ascontiguousarray(row, dtype=LOGITS_DTYPES[stored])


def round_logits(values: np.ndarray, stored: str) -> np.ndarray:
    """Logical values rounded (to nearest even) to what `stored` holds: what a bf16/fp16 model's logits are."""
    x = np.ascontiguousarray(values, dtype=logical_dtype(stored))
    if stored == "bfloat16":
        bits = x.view("<u4").astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype("<u4").view("<f4")
    if stored == "float16":
        return x.astype("<f2").astype("<f4")
    return x


def step_digest(logits: list[np.ndarray]) -> str:
    """sha256 of one step's logits (logical values, stream order), 32 hex digits."""
    h = hashlib.sha256()
    for row in logits:
        h.update(np.ascontiguousarray(row).tobytes())
    return h.hexdigest()[:32]


def token_digest(tokens) -> str:
    """sha256 of one step's tokens as int32: the digest of a token-only trace."""
    return hashlib.sha256(np.asarray(tokens, dtype="<i4").reshape(-1).tobytes()).hexdigest()[:32]


class TraceWriter:
    """Appends one step at a time; every step is flushed before the next one starts.

    `logits_dtype` is the stored dtype; a 2-byte one is checked row by row, and the first row it
    cannot hold exactly turns the whole trace into float32 (recorded in meta.json), so storage
    never changes a value. `has_logits=False` writes a token-only trace."""

    def __init__(self, path: Path, meta: dict, streams: list[str], vocab: list[int],
                 n_inputs: int, logits_dtype: str = "float32", has_logits: bool = True):
        if logits_dtype not in LOGITS_DTYPES:
            raise XBackendError(f"Unknown logits dtype {logits_dtype!r}", asked=f"stored dtypes are {', '.join(LOGITS_DTYPES)}")
        self.path = dir_in(Path(path))
        self.streams, self.vocab, self.has_logits = list(streams), [int(v) for v in vocab], has_logits
        self.stored = logits_dtype
        self.logical = logical_dtype(logits_dtype)
        # each file is new (an old one is replaced, never truncated: a hard link keeps its content)
        for name in [*(self._logits_path(s).name for s in streams if has_logits), "tokens.bin", "margins.bin",
                     "inputs.bin", DIGESTS, META]:
            replaceable(self.path / name)
        self._logits = [open_stream(self._logits_path(s)) for s in streams] if has_logits else []
        self._tokens = open_stream(self.path / "tokens.bin")
        self._margins = open_stream(self.path / "margins.bin")
        self._inputs = open_stream(self.path / "inputs.bin")
        self._digests = open_stream(self.path / DIGESTS)
        self.meta = dict(meta, schema=SCHEMA, streams=self.streams, vocab=self.vocab, n_inputs=n_inputs,
                         logits_dtype=self.stored if has_logits else None, has_logits=has_logits,
                         status="running", steps=0, error=None)
        write_json(self.path / META, self.meta)  # after the truncation: old steps never pass for new ones
        self.steps = 0

    def _logits_path(self, stream: str) -> Path:
        return self.path / f"logits-{stream}.bin"

    def _widen(self, stream: str) -> None:
        """Rewrite the steps so far as float32 and go on in float32 (a row was not exactly `stored`)."""
        asked = self.stored
        for f in self._logits:
            f.close()
        self._logits = []
        for s in self.streams:
            raw = np.fromfile(self._logits_path(s), dtype=LOGITS_DTYPES[asked])
            self._logits.append(open_stream(self._logits_path(s)))
            self._logits[-1].write(decode_logits(raw, asked).astype("<f4").tobytes())
        self.stored, self.logical = "float32", np.dtype("<f4")
        self.meta.update(logits_dtype="float32",
                         logits_dtype_note=f"asked {asked}; step {self.steps}, stream {stream} was not exactly "
                                           f"{asked}, so every step is stored as float32")
        write_json(self.path / META, self.meta)

    def write_step(self, logits: list[np.ndarray] | None, tokens: list[int], margins: list[float],
                   inputs: np.ndarray) -> str:
        if self.has_logits:
            rows = [np.asarray(x, dtype=self.logical).reshape(-1) for x in logits]
            encoded = [encode_logits(r, self.stored) for r in rows]
            bad = next((s for s, e in zip(self.streams, encoded) if e is None), None)
            if bad is not None:
                self._widen(bad)
                encoded = [encode_logits(r, self.stored) for r in rows]
            for f, data in zip(self._logits, encoded):
                f.write(data.tobytes())
                f.flush()
            digest = step_digest(rows)
        else:
            digest = token_digest(tokens)
        for f, values, dtype in ((self._tokens, tokens, "<i4"), (self._margins, margins, "<f4"),
                                 (self._inputs, inputs, "<i4")):
            f.write(np.asarray(values, dtype=dtype).reshape(-1).tobytes())
            f.flush()
        self._digests.write(digest.encode() + b"\n")
        self._digests.flush()
        self.steps += 1
        return digest

    def close(self, status: str = "complete", error: str | None = None, **extra) -> None:
        for f in [*self._logits, self._tokens, self._margins, self._inputs, self._digests]:
            f.close()
        self.meta.update(extra, status=status, steps=self.steps, error=error)
        write_json(self.path / META, self.meta)


# --------------------------------------------------------------------------- the loaded trace


@dataclass
class Trace:
    """A loaded, validated trace. Arrays are read-only; `steps` counts complete steps only."""

    path: Path
    meta: dict
    steps: int
    digests: list[str]
    _decoded: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def streams(self) -> list[str]:
        return list(self.meta["streams"])

    @property
    def vocab(self) -> dict[str, int]:
        return dict(zip(self.meta["streams"], self.meta["vocab"]))

    @property
    def has_logits(self) -> bool:
        return self.meta.get("has_logits", True) is not False

    @property
    def logits_dtype(self) -> str:
        """The stored dtype (`float32`, `float64`, `float16` or `bfloat16`)."""
        return self.meta.get("logits_dtype") or "float32"

    @property
    def logits_itemsize(self) -> int:
        """Bytes one stored logit takes on disk (0 for a token-only trace)."""
        return LOGITS_DTYPES[self.logits_dtype].itemsize if self.has_logits else 0

    def logits_raw(self, stream: str) -> np.ndarray:
        """One stream's rows as stored on disk, `[steps, vocab]` (memory-mapped)."""
        self._check_stream(stream)
        return self._rows(f"logits-{stream}.bin", LOGITS_DTYPES[self.logits_dtype], self.vocab[stream])

    def logits(self, stream: str) -> np.ndarray:
        """Logits of one stream, `[steps, vocab]`, float32 (float64 for float64 traces), read-only."""
        raw = self.logits_raw(stream)
        if self.logits_dtype in ("float32", "float64"):
            return raw
        if stream not in self._decoded:
            values = decode_logits(raw, self.logits_dtype)
            values.flags.writeable = False
            self._decoded[stream] = values
        return self._decoded[stream]

    def _check_stream(self, stream: str) -> None:
        if stream not in self.meta["streams"]:
            raise XBackendError(f"Trace {self.path} has no stream {stream!r}",
                                asked=f"streams are {', '.join(self.streams)}")
        if not self.has_logits:
            raise XBackendError(f"Trace {self.path} holds tokens only (has_logits is false), no logits of {stream}",
                                fix="compare its tokens, or replay it on a backend to get logits")

    @cached_property
    def tokens(self) -> np.ndarray:
        """Sampled tokens, `[steps, n_streams]` int32."""
        return np.array(self._rows("tokens.bin", "<i4", len(self.streams)))

    @cached_property
    def margins(self) -> np.ndarray:
        return np.array(self._rows("margins.bin", "<f4", len(self.streams)))

    @cached_property
    def inputs(self) -> np.ndarray:
        """User codes passed to the model at each step, `[steps, n_inputs]`."""
        return np.array(self._rows("inputs.bin", "<i4", int(self.meta["n_inputs"])))

    def _rows(self, name: str, dtype, width: int) -> np.ndarray:
        if self.steps == 0 or width == 0:
            return np.zeros((self.steps, width), dtype=dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r", shape=(self.steps, width))

    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"


def _bad_trace(path: Path, why: str) -> XBackendError:
    return XBackendError(f"Cannot load trace {path}: {why}",
                         fix="pass a directory written by `xbackend capture` or `xbackend compare`")


# --------------------------------------------------------------------------- meta.json schema


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _short(x) -> str:
    text = json.dumps(x, default=str) if not isinstance(x, str) else repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Type and range checks of meta.json fields; the first failure names the field and its value."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    def fail(self, key: str, value, want: str):
        raise _bad_trace(self.path, f"meta.json field {key!r} is {_short(value)}, expected {want}")

    def int(self, key: str, value, lo: int, hi: int, none: bool = False) -> None:
        if value is None and none:
            return
        if not _is_int(value) or not lo <= value <= hi:
            self.fail(key, value, f"an integer in [{lo}, {hi}]" + (" or null" if none else ""))

    def number(self, key: str, value, none: bool = True) -> None:
        if value is None and none:
            return
        if not _is_number(value) or value < 0:
            self.fail(key, value, "a finite non-negative number" + (" or null" if none else ""))

    def str(self, key: str, value, none: bool = True) -> None:
        if not (isinstance(value, str) or (value is None and none)):
            self.fail(key, value, "a string" + (" or null" if none else ""))

    def dict(self, key: str, value, none: bool = True) -> bool:
        if value is None and none:
            return False
        if not isinstance(value, dict):
            self.fail(key, value, "an object" + (" or null" if none else ""))
        return True


def validate_meta(path: Path, meta) -> dict:
    """Check every field a reader of the trace relies on; returns `meta` (raises `XBackendError`)."""
    from ..samplers import MODES, SamplingSettings
    from ..spec import DTYPES, QUANTS

    if not isinstance(meta, dict):
        raise _bad_trace(path, f"meta.json holds {type(meta).__name__}, not an object")
    if meta.get("schema") != SCHEMA:
        raise _bad_trace(path, f"schema is {_short(meta.get('schema'))}, expected {SCHEMA!r}")
    c = _Checker(path, meta)
    for key in ("streams", "vocab", "n_inputs", "status", "steps"):
        if key not in meta:
            raise _bad_trace(path, f"meta.json lacks the field {key!r}")
    streams, vocab = meta["streams"], meta["vocab"]
    if (not isinstance(streams, list) or not 1 <= len(streams) <= MAX_STREAMS
            or not all(isinstance(s, str) and STREAM_NAME.fullmatch(s) for s in streams)
            or len(set(streams)) != len(streams)):
        c.fail("streams", streams, f"1 to {MAX_STREAMS} distinct names of letters, digits and _")
    if not isinstance(vocab, list) or len(vocab) != len(streams) or not all(
            _is_int(v) and 1 <= v <= MAX_VOCAB for v in vocab):
        c.fail("vocab", vocab, f"{len(streams)} integers in [1, {MAX_VOCAB}], one per stream")
    c.int("n_inputs", meta["n_inputs"], 0, MAX_INPUTS)
    if meta["status"] not in STATUSES:
        c.fail("status", meta["status"], f"one of {', '.join(STATUSES)}")
    c.int("steps", meta["steps"], 0, 2**40)
    has_logits = meta.get("has_logits", True)
    if not isinstance(has_logits, bool):
        c.fail("has_logits", has_logits, "true or false")
    dtype = meta.get("logits_dtype")
    if not (isinstance(dtype, str) and dtype in LOGITS_DTYPES) and (has_logits or dtype is not None):
        c.fail("logits_dtype", dtype, f"one of {', '.join(LOGITS_DTYPES)}" + ("" if has_logits else " or null"))
    c.str("error", meta.get("error"))
    c.int("steps_requested", meta.get("steps_requested"), 1, 2**40, none=True)
    c.int("seed", meta.get("seed"), 0, 2**64 - 1, none=True)
    c.int("run_index", meta.get("run_index"), 0, 2**31, none=True)
    for key in ("load_s", "elapsed_s", "ms_per_step"):
        c.number(key, meta.get(key))
    for key in ("backend", "library", "created"):
        c.str(key, meta.get(key))
    for key in ("env", "effective"):
        c.dict(key, meta.get(key))
    settings = meta.get("settings")
    if c.dict("settings", settings):
        kinds = {f.name: f.type for f in fields(SamplingSettings)}
        for key, value in settings.items():
            if key not in kinds:
                c.fail(f"settings.{key}", value, f"one of the settings {', '.join(kinds)}")
            if "int" in str(kinds[key]):
                c.int(f"settings.{key}", value, 0, MAX_VOCAB)
            elif value is not None or "None" not in str(kinds[key]):
                c.number(f"settings.{key}", value, none=False)
    sampler = meta.get("sampler")
    if c.dict("sampler", sampler):
        if sampler.get("mode") not in MODES:
            c.fail("sampler.mode", sampler.get("mode"), f"one of {', '.join(MODES)}")
        for key in ("seed", "text_seed", "audio_seed"):
            c.int(f"sampler.{key}", sampler.get(key), 0, 2**64 - 1, none=True)
        c.str("sampler.forced_from", sampler.get("forced_from"))
        c.int("sampler.pad_token", sampler.get("pad_token"), 0, MAX_VOCAB, none=True)
        pad_mult = sampler.get("pad_mult")
        if pad_mult is not None and not (_is_number(pad_mult) and math.isfinite(pad_mult) and abs(pad_mult) <= 1e6):
            c.fail("sampler.pad_mult", pad_mult, "null or a finite number of magnitude at most 1e6")
        rep = sampler.get("repetition_penalty")
        if rep is not None and not (isinstance(rep, list) and len(rep) == 2 and _is_int(rep[0])
                                    and 0 <= rep[0] <= 2**20 and _is_number(rep[1]) and 0 < rep[1] <= 100):
            c.fail("sampler.repetition_penalty", rep, "null or [context (0 to 2**20 tokens), penalty in (0, 100]]")
    spec = meta.get("spec")
    if c.dict("spec", spec):
        c.str("spec.name", spec.get("name"))
        c.str("spec.device", spec.get("device"))
        if spec.get("dtype") not in (None, *DTYPES):
            c.fail("spec.dtype", spec.get("dtype"), f"one of {', '.join(DTYPES)}")
        if spec.get("quant") not in (None, *QUANTS):
            c.fail("spec.quant", spec.get("quant"), f"null or one of {', '.join(QUANTS)}")
    model = meta.get("model")
    if c.dict("model", model):
        for key in ("name", "digest", "source", "layout", "weights"):
            c.str(f"model.{key}", model.get(key))
        config = model.get("config")
        if c.dict("model.config", config):
            c.int("model.config.existing_text_padding_id", config.get("existing_text_padding_id"), 0, MAX_VOCAB,
                  none=True)
    prompt = meta.get("prompt")
    if c.dict("prompt", prompt):
        c.str("prompt.digest", prompt.get("digest"))
        c.str("prompt.source", prompt.get("source"))
    alignment = meta.get("alignment")
    if c.dict("alignment", alignment):
        c.str("alignment.mode", alignment.get("mode"))
    delays = meta.get("delays")
    if delays is not None and (not isinstance(delays, list) or not all(_is_int(d) and 0 <= d <= 1024 for d in delays)):
        c.fail("delays", delays, "a list of integers in [0, 1024]")
    failed_at = meta.get("failed_at")
    if c.dict("failed_at", failed_at):
        c.int("failed_at.step", failed_at.get("step"), 0, 2**40)
        if failed_at.get("stream") not in (None, *streams):
            c.fail("failed_at.stream", failed_at.get("stream"), f"null or one of {', '.join(streams)}")
    trimmed = meta.get("trimmed_from")
    if c.dict("trimmed_from", trimmed):
        for key in ("start", "steps", "original_steps"):
            c.int(f"trimmed_from.{key}", trimmed.get(key), 0, 2**40)
    return meta


def _regular_file(path: Path, file: Path, required: bool = True) -> int | None:
    """Size of a regular file inside the trace; a link, a directory or a device is refused."""
    try:
        st = os.lstat(file)
    except FileNotFoundError:
        if required:
            raise _bad_trace(path, f"{file.name} is missing") from None
        return None
    except OSError as exc:
        raise _bad_trace(path, f"cannot read {file.name} ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise _bad_trace(path, f"{file.name} is a symbolic link; traces are read without following links")
    if not stat.S_ISREG(st.st_mode):
        raise _bad_trace(path, f"{file.name} is not a regular file")
    return st.st_size


def _read_digests(path: Path) -> list[str]:
    """Complete digest lines; a torn last line (no newline yet) is a step still being written."""
    size = _regular_file(path, path / DIGESTS, required=False)
    if size is None:
        return []
    if size > MAX_DIGESTS_BYTES:
        raise _bad_trace(path, f"{DIGESTS} is {size} bytes, more than {MAX_DIGESTS_BYTES} (33 bytes a step)")
    lines = read_bytes(path / DIGESTS, DIGESTS, limit=MAX_DIGESTS_BYTES).split(b"\n")[:-1]
    for i, line in enumerate(lines):
        if not _DIGEST_LINE.fullmatch(line):
            raise _bad_trace(path, f"{DIGESTS} line {i + 1} is {line[:40]!r}, not 32 hex digits")
    return [line.decode("ascii") for line in lines]


DIGEST_LINE_BYTES = 33  # a step's line of digests.txt: 32 hex digits and a newline


def file_sizes(meta: dict) -> list[tuple[str, int]]:
    """(file, bytes per step) of every data file a trace with this meta.json holds."""
    n = len(meta["streams"])
    out = []
    if meta.get("has_logits", True):
        size = LOGITS_DTYPES[meta["logits_dtype"]].itemsize
        out += [(f"logits-{s}.bin", int(v) * size) for s, v in zip(meta["streams"], meta["vocab"])]
    return out + [("tokens.bin", 4 * n), ("margins.bin", 4 * n), ("inputs.bin", 4 * int(meta["n_inputs"]))]


def step_bytes(meta: dict) -> int:
    """The one rule of a step's size on disk: its data files (`file_sizes`) and its line of digests."""
    return sum(size for _, size in file_sizes(meta)) + DIGEST_LINE_BYTES


def verify_digests(trace: Trace) -> None:
    """Recompute every step's digest from the data; a mismatch names the first bad step."""
    if trace.steps == 0:
        return
    if not trace.has_logits:
        tokens = trace.tokens
        for step in range(trace.steps):
            if token_digest(tokens[step]) != trace.digests[step]:
                raise _bad_trace(trace.path, f"step {step}'s tokens do not match its digest in {DIGESTS} "
                                 "(the file was changed or damaged)")
        return
    raw = {s: trace.logits_raw(s) for s in trace.streams}
    row = sum(trace.meta["vocab"]) * 4
    block = max(1, _VERIFY_BLOCK_BYTES // row)
    for s0 in range(0, trace.steps, block):
        s1 = min(s0 + block, trace.steps)
        values = [decode_logits(np.asarray(raw[s][s0:s1]), trace.logits_dtype) for s in trace.streams]
        for i in range(s1 - s0):
            if step_digest([v[i] for v in values]) != trace.digests[s0 + i]:
                bad = [s for s, v in zip(trace.streams, values) if not np.isfinite(v[i]).all()]
                raise _bad_trace(trace.path, f"step {s0 + i}'s logits do not match its digest in {DIGESTS} "
                                 "(a logits file was changed or damaged)"
                                 + (f"; non-finite values in {', '.join(bad)}" if bad else ""))


def _check_tokens(trace: Trace) -> None:
    if trace.steps == 0:
        return
    tokens, vocab = trace.tokens, np.asarray(trace.meta["vocab"])
    low = -1 if not trace.has_logits else 0  # a token-only import may mark a token it never logged as -1
    bad = (tokens < low) | (tokens >= vocab)
    if bad.any():
        step, col = map(int, np.argwhere(bad)[0])
        raise _bad_trace(trace.path, f"tokens.bin holds token {int(tokens[step, col])} at step {step}, stream "
                         f"{trace.streams[col]}, outside its vocabulary of {int(vocab[col])}")


def load_trace(path: str | os.PathLike, *, verify: bool = True) -> Trace:
    """Load and validate a trace directory; a truncated trace loads up to its last complete step, with a warning.

    `verify=False` skips recomputing the digests (only for a trace this process has just written)."""
    path = Path(path)
    if not path.is_dir():
        raise _bad_trace(path, "no such directory" if not path.exists() else "not a directory")
    size = _regular_file(path, path / META, required=False)
    if size is None:
        raise _bad_trace(path, f"no {META} there")
    if size > MAX_META_BYTES:
        raise _bad_trace(path, f"{META} is {size} bytes, more than the {MAX_META_BYTES >> 20} MB a trace's metadata takes")
    try:
        meta = parse_json(read_bytes(path / META, META, limit=MAX_META_BYTES), META, "", expect=None)
    except XBackendError as exc:
        raise _bad_trace(path, str(exc).removesuffix(".")) from None
    meta = validate_meta(path, meta)
    digests = _read_digests(path)
    steps = len(digests)
    for name, row in file_sizes(meta):
        bytes_ = _regular_file(path, path / name)
        if row:
            steps = min(steps, bytes_ // row)
    complete = meta["status"] == "complete"
    if complete and steps > meta["steps"]:
        raise _bad_trace(path, f"meta.json says the run completed {meta['steps']} steps, but its files hold {steps}")
    expected = meta["steps"] if complete else meta.get("steps_requested")
    if not complete or (expected is not None and steps < expected):
        warnings.warn(
            f"trace {path} is incomplete (run {meta['status']}"
            + (f": {meta['error']}" if meta.get("error") else "")
            + f"); loaded its {steps} complete steps" + (f" of {expected}" if expected else ""),
            TruncatedTraceWarning, stacklevel=2)
    trace = Trace(path=path, meta=meta, steps=steps, digests=digests[:steps])
    _check_tokens(trace)
    if verify:
        verify_digests(trace)
    return trace
