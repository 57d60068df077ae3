"""Step traces (docs/design.md, Trace format): one directory per run, loadable with numpy alone, written step by step.

Layout of a trace directory:

- `meta.json`: everything needed to read and to judge the run (streams, vocab sizes, dtypes,
  settings, env fingerprint, status); rewritten atomically at the start and at the end.
- `logits-<stream>.bin`: raw little-endian rows `[steps, vocab]`, float32: the logits as upstream
  hands them to its sampler (moshi casts them to float32 there, fp64 runs included).
- `tokens.bin` int32 `[steps, streams]`, `margins.bin` float32 `[steps, streams]`,
  `inputs.bin` int32 `[steps, user_streams]` (the user codes passed at that step).
- `digests.txt`: one line per step, the sha256 of that step's logits (all streams).

A token trace (`"has_logits": false`, e.g. a Rust app's session brought in by `xbackend import`)
has no `logits-*.bin`; each digest line is then the sha256 of that step's tokens.

A step is complete once its digest line is written (it is written last), so a run killed at
step N keeps steps 0..N-1 and the loader says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import XBackendError

SCHEMA = "xbackend.trace/1"
META = "meta.json"
DIGESTS = "digests.txt"


class TruncatedTraceWarning(UserWarning):
    """A trace ended before its run finished; the complete steps are still loaded."""


def step_digest(logits: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for row in logits:
        h.update(np.ascontiguousarray(row).tobytes())
    return h.hexdigest()[:32]


def token_digest(tokens) -> str:
    """The digest of a token trace's step: its tokens, as int32."""
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).reshape(-1).tobytes()).hexdigest()[:32]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class TraceWriter:
    """Appends one step at a time; every step is flushed before the next one starts."""

    def __init__(self, path: Path, meta: dict, streams: list[str], vocab: list[int],
                 n_inputs: int, logits_dtype: str = "float32", has_logits: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        ours = {META, DIGESTS, "tokens.bin", "margins.bin", "inputs.bin", *(f"logits-{s}.bin" for s in streams)}
        for old in self.path.glob("*"):
            if old.name in ours or (old.name.startswith("logits-") and old.suffix == ".bin"):
                old.unlink()  # a previous trace here: only its own files go
        self.streams, self.vocab, self.dtype = streams, vocab, np.dtype(logits_dtype)
        self.meta = dict(meta, schema=SCHEMA, streams=streams, vocab=vocab, n_inputs=n_inputs,
                         logits_dtype=self.dtype.name, status="running", steps=0, error=None)
        if not has_logits:
            self.meta["has_logits"] = False
        write_json_atomic(self.path / META, self.meta)
        self._logits = [open(self.path / f"logits-{s}.bin", "ab") for s in streams] if has_logits else []
        self._tokens = open(self.path / "tokens.bin", "ab")
        self._margins = open(self.path / "margins.bin", "ab")
        self._inputs = open(self.path / "inputs.bin", "ab")
        self._digests = open(self.path / DIGESTS, "a")
        self.steps = 0

    def write_step(self, logits: list[np.ndarray] | None, tokens: list[int], margins: list[float],
                   inputs: np.ndarray) -> str:
        """Append one step; `logits` is None in a token trace."""
        rows = [np.asarray(x, dtype=self.dtype).reshape(-1) for x in logits] if self._logits else []
        for f, row in zip(self._logits, rows):
            f.write(row.tobytes())
            f.flush()
        for f, values, dtype in ((self._tokens, tokens, np.int32), (self._margins, margins, np.float32),
                                 (self._inputs, inputs, np.int32)):
            f.write(np.asarray(values, dtype=dtype).reshape(-1).tobytes())
            f.flush()
        digest = step_digest(rows) if self._logits else token_digest(tokens)
        self._digests.write(digest + "\n")
        self._digests.flush()
        self.steps += 1
        return digest

    def close(self, status: str = "complete", error: str | None = None, **extra) -> None:
        for f in [*self._logits, self._tokens, self._margins, self._inputs, self._digests]:
            f.close()
        self.meta.update(extra, status=status, steps=self.steps, error=error)
        write_json_atomic(self.path / META, self.meta)


@dataclass
class Trace:
    """A loaded trace. Arrays are memory-mapped; `steps` counts complete steps only."""

    path: Path
    meta: dict
    steps: int
    digests: list[str]

    @property
    def streams(self) -> list[str]:
        return list(self.meta["streams"])

    @property
    def vocab(self) -> dict[str, int]:
        return dict(zip(self.meta["streams"], self.meta["vocab"]))

    @property
    def has_logits(self) -> bool:
        """False for a token trace (an imported run): tokens only, digests of tokens."""
        return self.meta.get("has_logits", True) is not False

    def logits(self, stream: str) -> np.ndarray:
        """Logits of one stream, `[steps, vocab]` (memory-mapped, read-only)."""
        if not self.has_logits:
            raise XBackendError(f"Trace {self.path} is a token trace: it has no logits",
                                asked=f"logits of {stream}", fix="use a trace captured by xbackend for logits")
        if stream not in self.meta["streams"]:
            raise XBackendError(f"Trace {self.path} has no stream {stream!r}",
                                asked=f"streams are {', '.join(self.streams)}")
        return self._rows(f"logits-{stream}.bin", self.meta["logits_dtype"], self.vocab[stream])

    @cached_property
    def tokens(self) -> np.ndarray:
        """Sampled tokens, `[steps, n_streams]` int32."""
        return np.array(self._rows("tokens.bin", "int32", len(self.streams)))

    @cached_property
    def margins(self) -> np.ndarray:
        return np.array(self._rows("margins.bin", "float32", len(self.streams)))

    @cached_property
    def inputs(self) -> np.ndarray:
        """User codes passed to the model at each step, `[steps, n_inputs]`."""
        return np.array(self._rows("inputs.bin", "int32", int(self.meta["n_inputs"])))

    def _rows(self, name: str, dtype: str, width: int) -> np.ndarray:
        if self.steps == 0 or width == 0:
            return np.zeros((self.steps, width), dtype=dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r", shape=(self.steps, width))

    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"

    def text(self, tokenizer: str | os.PathLike | None = None) -> str:
        """The run's text stream as words, decoded by its model's SentencePiece tokenizer (or the
        given one); '' when there is none. See `xbackend.words`."""
        from .words import trace_text

        return trace_text(self, tokenizer)


def _bad_trace(path: Path, why: str) -> XBackendError:
    return XBackendError(f"Cannot load trace {path}: {why}",
                         fix="pass a directory written by `xbackend capture` or `xbackend compare`")


def load_trace(path: str | os.PathLike) -> Trace:
    """Load a trace directory; a truncated trace loads up to its last complete step, with a warning."""
    path = Path(path)
    if not (path / META).is_file():
        raise _bad_trace(path, f"no {META} there")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise _bad_trace(path, f"{META} is not valid JSON ({exc})") from None
    if meta.get("schema") != SCHEMA:
        raise _bad_trace(path, f"schema is {meta.get('schema')!r}, expected {SCHEMA!r}")
    digests_file = path / DIGESTS
    lines = digests_file.read_text().splitlines() if digests_file.is_file() else []
    digests = [d for d in lines if len(d) == 32]
    steps = len(digests)
    itemsize = np.dtype(meta["logits_dtype"]).itemsize
    sizes = [(f"logits-{s}.bin", v * itemsize) for s, v in zip(meta["streams"], meta["vocab"])
             if meta.get("has_logits", True) is not False]
    sizes += [("tokens.bin", 4 * len(meta["streams"])), ("margins.bin", 4 * len(meta["streams"])),
              ("inputs.bin", 4 * int(meta["n_inputs"]))]
    for name, row in sizes:
        f = path / name
        if not f.is_file():
            raise _bad_trace(path, f"{name} is missing")
        if row:
            steps = min(steps, f.stat().st_size // row)
    expected = meta.get("steps") if meta.get("status") == "complete" else meta.get("steps_requested")
    if meta.get("status") != "complete" or (expected is not None and steps < expected):
        warnings.warn(
            f"trace {path} is incomplete (run {meta.get('status')}"
            + (f": {meta['error']}" if meta.get("error") else "")
            + f"); loaded its {steps} complete steps" + (f" of {expected}" if expected else ""),
            TruncatedTraceWarning, stacklevel=2)
    return Trace(path=path, meta=meta, steps=steps, digests=digests[:steps])
