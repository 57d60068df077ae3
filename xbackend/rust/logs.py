"""What a Rust Moshi app logged, read into token traces (`xbackend import`).

Three formats, all from kyutai-labs/moshi `rust/`:

- a **moshi-backend session**: `{log_dir}/{instance}-{secs}-{us}.json` (the `SessionSummary` of
  `moshi-backend/src/stream_both.rs`: seeds, sampling settings, `last_step_idx`, `transcript`,
  model files and the flattened `lm_config`) and the `.safetensors` beside it with `text` i64 `[T]`
  and `audio` i64 `[T, generated + input codebooks]` (moshi-core's `State::text_tokens(false)` and
  `audio_tokens(false)`, -1 where nothing was generated);
- a **MIMI_VERBOSE=1** log (moshi-core `lm.rs`): per step `text_ids [..]`, `audio_ids  [..] [..] ..`
  (the model's inputs), then `sampled {token} logits {slice}:` per depformer slice;
- a log with **per-step token lines** written by the app itself (`Step 12 text token: 345`,
  `Step 12 audio tokens: [..]`, behind any prefix), with configurable patterns.

The trace's tokens are per *sampling step*, as xbackend's traces are. moshi-core
(`lm_generate_multistream.rs`, `State::step_`) samples at step s the text token (stored in
`text_tokens[s]`) and one token per depformer slice; slice 0 is stored in `audio_tokens[s][0]`,
slice c >= 1 in `audio_tokens[s - acoustic_delay][c]` (`saturating_sub`: the slices sampled before
step `acoustic_delay` all land in row 0, the last write wins, so they are unknown, -1 here). So a
session's `audio[r, c]` (c >= 1) was sampled at step r + acoustic_delay. The user codes passed at
step s are stored in `audio_tokens[s][generated + c]`; the model reads them one step late
(codebook 0 at s+1, the others at s + acoustic_delay + 1).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..samplers.candle import ALGORITHM, IDENTITY, RNG
from ..errors import XBackendError
from ..capture.prompt import codes_digest
from ..samplers import DEFAULT_SEED, RUST_CLI_SETTINGS, SamplingSettings
from ..streams import TEXT_PADDING_ID, stream_names
from ..store.trace import Trace, TraceWriter, load_trace

FORMATS = ("session", "verbose", "lines")
RUST_CLI_SEED = DEFAULT_SEED  # xbackend's default is the Rust CLI's
MAX_LOG_BYTES = 2 * 1024**3
# moshi-core's Config::v0_1(), which moshi-backend uses when its config has no lm_config
V0_1 = {"generated_audio_codebooks": 8, "input_audio_codebooks": 8, "audio_vocab_size": 2049, "acoustic_delay": 2,
        "text_pad_token": 3, "text_eop_token": 0, "text_start_token": 32000}
DEFAULT_TEXT_PATTERN = r"[Ss]tep\s+(?P<step>\d+)\s+text\s+token\s*[:=]\s*(?P<token>-?\d+)"
DEFAULT_AUDIO_PATTERN = r"[Ss]tep\s+(?P<step>\d+)\s+audio\s+tokens\s*[:=]\s*\[(?P<tokens>[^\]]*)\]"
AUDIO_LAYOUTS = ("auto", "frame", "sampled")


@dataclass(frozen=True)
class RustRun:
    """One run of a Rust Moshi app, as far as its log tells: tokens per sampling step, -1 where unknown."""

    format: str
    source: str
    tokens: np.ndarray  # [steps, 1 + generated] int64, per sampling step
    user_codes: np.ndarray | None  # [steps, input codebooks]: the codes passed at each step, -1 unknown
    config: dict  # moshi-core lm_generate_multistream::Config fields
    settings: SamplingSettings
    text_seed: int
    audio_seed: int
    pad_mult: float | None = None
    repetition_penalty: tuple[int, float] | None = None
    transcript: str | None = None
    model_file: str | None = None
    settings_from: str = "the session file"
    notes: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def dep_q(self) -> int:
        return int(self.tokens.shape[1]) - 1

    @property
    def streams(self) -> list[str]:
        return stream_names(self.dep_q)

    @property
    def vocab(self) -> list[int]:
        return [int(self.config["text_start_token"])] + [int(self.config["audio_vocab_size"]) - 1] * self.dep_q

    @property
    def delays(self) -> list[int]:
        d = int(self.config["acoustic_delay"])
        return [0, 0] + [d] * (self.dep_q - 1)

    @property
    def seed(self):
        return self.text_seed if self.text_seed == self.audio_seed else {"text": self.text_seed, "audio": self.audio_seed}


def _bad(path, what: str, fix: str | None = None) -> XBackendError:
    return XBackendError(f"Cannot import {path}: {what}",
                         fix=fix or "pass a moshi-backend session (.json with its .safetensors beside it), "
                                    "a MIMI_VERBOSE=1 log or a log with per-step token lines")


def _regular_file(path: Path, what: str, follow: bool = False) -> None:
    from ..store.files import regular_file

    try:
        regular_file(path, f"the {what}", follow=follow)
    except XBackendError as exc:
        raise _bad(path, str(exc).split(" Fix:")[0].rstrip(".").replace(f" {path}", "", 1)) from None


# --- moshi-backend sessions ----------------------------------------------------------------------


def _int(data: dict, key: str, path, lo: int = 0, hi: int = 2**64 - 1, default=None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(path, f"field {key!r} is {value!r}, expected an integer in {lo} .. {hi}")
    return value


def _float(data: dict, key: str, path, positive: bool = True) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise _bad(path, f"field {key!r} is {value!r}, expected a {'positive ' if positive else ''}finite number")
    return float(value)


def _rust_config(data: dict, path) -> dict:
    """The flattened lm_config, or Config::v0_1() when the session has none (moshi-backend's fallback)."""
    present = [k for k in V0_1 if k in data]
    if present and len(present) != len(V0_1):
        missing = [k for k in V0_1 if k not in data]
        raise _bad(path, f"lm_config is partial: {', '.join(missing)} missing")
    if not present:
        return dict(V0_1)
    cfg = {k: _int(data, k, path, 0, 2**32 - 1) for k in V0_1}
    if not 1 <= cfg["generated_audio_codebooks"] <= 64 or cfg["input_audio_codebooks"] > 64:
        raise _bad(path, f"lm_config has {cfg['generated_audio_codebooks']} generated and "
                         f"{cfg['input_audio_codebooks']} input codebooks")
    if cfg["audio_vocab_size"] < 2 or cfg["text_start_token"] < 1:
        raise _bad(path, "lm_config has an empty vocabulary")
    if max(cfg["audio_vocab_size"], cfg["text_start_token"] + 1) > MAX_LOG_VOCAB or cfg["acoustic_delay"] > MAX_DELAY:
        raise _bad(path, f"lm_config has a vocabulary beyond {MAX_LOG_VOCAB} or an acoustic delay beyond {MAX_DELAY}")
    return cfg


def read_session(path: str | Path) -> RustRun:
    """A moshi-backend session: the `.json` summary and the `.safetensors` beside it."""
    path = Path(path).expanduser()
    from ..store.files import load_json

    data = load_json(path, "Session file", "pass the .json a moshi-backend session wrote", limit=16 << 20)
    missing = [k for k in ("text_seed", "audio_seed", "text_topk", "audio_topk", "text_temperature",
                           "audio_temperature", "last_step_idx") if k not in data]
    if missing:
        raise _bad(path, f"not a moshi-backend session: {', '.join(missing)} missing")
    cfg = _rust_config(data, path)
    settings = SamplingSettings(temp_text=_float(data, "text_temperature", path),
                                top_k_text=_int(data, "text_topk", path, 1),
                                temp_audio=_float(data, "audio_temperature", path),
                                top_k_audio=_int(data, "audio_topk", path, 1))
    text_seed, audio_seed = _int(data, "text_seed", path), _int(data, "audio_seed", path)
    last = _int(data, "last_step_idx", path, 0, 10**7)
    pad_mult = data.get("pad_mult")
    if pad_mult is not None:
        pad_mult = _float(data, "pad_mult", path, positive=False)
        if abs(pad_mult) > 1e6:
            raise _bad(path, f"field 'pad_mult' is {pad_mult!r}, beyond the 1e6 a padding multiplier can mean")
    rep = data.get("repetition_penalty")
    if rep is not None:
        if not (isinstance(rep, list) and len(rep) == 2 and isinstance(rep[0], int) and not isinstance(rep[0], bool)
                and 0 <= rep[0] <= 2**20 and isinstance(rep[1], (int, float)) and math.isfinite(rep[1])
                and 0 < rep[1] <= 100):
            raise _bad(path, f"field 'repetition_penalty' is {rep!r}, expected null or [context, penalty]")
        rep = (int(rep[0]), float(rep[1]))
    transcript = data.get("transcript")
    if transcript is not None and not isinstance(transcript, str):
        raise _bad(path, f"field 'transcript' is {type(transcript).__name__}, expected a string")
    model_file = data.get("lm_model_file") if isinstance(data.get("lm_model_file"), str) else None
    text, audio = _session_tensors(path.with_suffix(".safetensors"), cfg, last)
    tokens, user = session_to_steps(text, audio, cfg)
    _check_range(path, tokens, user, cfg)
    return RustRun("session", str(path), tokens, user, cfg, settings, text_seed, audio_seed, pad_mult, rep,
                   transcript, model_file, extra={"user_feedback": data.get("user_feedback")})


def _session_tensors(st: Path, cfg: dict, last: int) -> tuple[np.ndarray, np.ndarray]:
    _regular_file(st, "session's .safetensors (expected beside the .json)")
    from ..capture.models import safetensors_header

    try:
        header = safetensors_header(st)
    except (XBackendError, AttributeError):
        raise _bad(st, "not a safetensors file (its header does not read)") from None
    if not isinstance(header, dict):
        raise _bad(st, "its safetensors header is not a table of tensors")
    n_cb = cfg["generated_audio_codebooks"] + cfg["input_audio_codebooks"]
    expect = {"text": [last], "audio": [last, n_cb]}
    for name, shape in expect.items():
        entry = header.get(name)
        if not isinstance(entry, dict):
            raise _bad(st, f"no tensor {name!r} (has {', '.join(sorted(header)) or 'none'})")
        if entry.get("dtype") != "I64":
            raise _bad(st, f"tensor {name!r} is {entry.get('dtype')}, expected I64")
        if entry.get("shape") != shape:
            raise _bad(st, f"tensor {name!r} has shape {entry.get('shape')}, expected {shape} "
                           f"(last_step_idx {last}, {n_cb} codebooks in lm_config)",
                       fix="pass the .json and .safetensors of the same session, both complete")
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(st))
    except Exception as exc:  # a corrupt file: safetensors raises its own types
        raise _bad(st, f"cannot read the tensors ({type(exc).__name__}: {str(exc)[:200]})") from None
    return np.asarray(tensors["text"], dtype=np.int64), np.asarray(tensors["audio"], dtype=np.int64)


def session_to_steps(text: np.ndarray, audio: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Session rows to sampling steps: text[s] and audio[s, 0] were sampled at step s, audio[r, c >= 1]
    at step r + acoustic_delay (rows are frames, not steps); user codes audio[s, generated:] were
    passed at step s."""
    steps, gen, d = text.shape[0], cfg["generated_audio_codebooks"], cfg["acoustic_delay"]
    tokens = np.full((steps, 1 + gen), -1, dtype=np.int64)
    tokens[:, 0] = text
    tokens[:, 1] = audio[:, 0]
    if steps > d:
        tokens[d:, 2:] = audio[:steps - d, 1:gen]
    return tokens, audio[:, gen:].copy()


def _check_range(path, tokens: np.ndarray, user: np.ndarray | None, cfg: dict) -> None:
    text_v, audio_v = cfg["text_start_token"], cfg["audio_vocab_size"]
    checks = [("text", tokens[:, 0], text_v), ("audio", tokens[:, 1:], audio_v)]
    if user is not None:
        checks.append(("user audio", user, audio_v))
    for what, values, limit in checks:
        bad = (values < -1) | (values >= limit)
        if bad.any():
            step = int(np.argwhere(bad)[0][0])
            raise _bad(path, f"{what} token {int(values[bad][0])} at step {step} is outside 0 .. {limit - 1}",
                       fix=f"pass --text-vocab and --audio-vocab with the app's vocabularies (now {text_v} and "
                           f"{audio_v - 1}) if this is a token-line log; else the log is not this app's")


# --- MIMI_VERBOSE logs ----------------------------------------------------------------------------

_TEXT_IDS = re.compile(r"text_ids\s+(\[[^\]]*\]|none)")
_AUDIO_IDS = re.compile(r"audio_ids\s+((?:\s*(?:\[[^\]]*\]|none))*)")
_SAMPLED = re.compile(r"sampled\s+(\d+)\s+logits\s+(\d+)\s*:")
_LIST = re.compile(r"\[([^\]]*)\]|none")


def _read_lines(path: Path) -> list[str]:
    _regular_file(path, "log")
    if path.stat().st_size > MAX_LOG_BYTES:
        raise _bad(path, f"the log is {path.stat().st_size} bytes (at most {MAX_LOG_BYTES})")
    from ..store.files import read_bytes

    return read_bytes(path, "Log", limit=MAX_LOG_BYTES).decode("utf-8", "replace").splitlines()


_DECIMAL = re.compile(r"-?[0-9]{1,12}")
MAX_DELAY = 100
MAX_LOG_VOCAB = 1 << 20


def _count(text, path, lineno: int, what: str, lo: int = -1, hi: int = MAX_LOG_VOCAB) -> int:
    """One number of a log line: decimal, at most 12 digits, in [lo, hi]."""
    text = str(text).strip()
    if not _DECIMAL.fullmatch(text) or not lo <= int(text) <= hi:
        raise _bad(path, f"line {lineno}: {what} {text[:40]!r} is not an integer from {lo} to {hi}",
                   fix="pass the app's own log (or a --text-pattern/--audio-pattern whose groups capture integers)")
    return int(text)


def _step(text, path, lineno: int) -> int:
    from ..store.validate import MAX_STEPS

    return _count(text, path, lineno, "step", 0, MAX_STEPS - 1)


def _ints(text: str, path, lineno: int) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) > 64:
        raise _bad(path, f"line {lineno}: {len(parts)} audio tokens, more than the 64 codebooks a model has")
    return [_count(p, path, lineno, "audio token") for p in parts]


def is_verbose_log(lines: list[str]) -> bool:
    return any(_TEXT_IDS.search(x) for x in lines[:2000]) and any(_SAMPLED.search(x) for x in lines[:20000])


def read_verbose(path: str | Path, settings: SamplingSettings = RUST_CLI_SETTINGS, text_seed: int = RUST_CLI_SEED,
                 audio_seed: int = RUST_CLI_SEED, acoustic_delay: int | None = None,
                 allow_partial: bool = False) -> RustRun:
    """A MIMI_VERBOSE=1 log: audio tokens from the `sampled` lines, text tokens from the next step's
    `text_ids` (moshi feeds the sampled text token back as the next input), user codes from `audio_ids`."""
    path = Path(path).expanduser()
    lines = _read_lines(path)
    steps: list[dict] = []
    for lineno, line in enumerate(lines, 1):
        if m := _TEXT_IDS.search(line):
            ids = None if m.group(1) == "none" else _ints(m.group(1)[1:-1], path, lineno)
            steps.append({"text_ids": ids, "audio_ids": None, "sampled": [], "line": lineno})
        elif m := _AUDIO_IDS.search(line):
            if not steps or steps[-1]["audio_ids"] is not None:
                raise _bad(path, f"line {lineno}: audio_ids without a text_ids line before it")
            steps[-1]["audio_ids"] = [None if x.group(0) == "none" else _ints(x.group(1), path, lineno)
                                      for x in _LIST.finditer(m.group(1))]
        elif m := _SAMPLED.search(line):
            if not steps:
                raise _bad(path, f"line {lineno}: a sampled line before any step (text_ids line)")
            steps[-1]["sampled"].append((_count(m.group(1), path, lineno, "sampled token", 0),
                                         _count(m.group(2), path, lineno, "logits slice", 0, 64), lineno))
    if not steps:
        raise _bad(path, "no MIMI_VERBOSE step (no text_ids line)")
    dep_q = max(len(s["sampled"]) for s in steps)
    if dep_q == 0:
        raise _bad(path, "no `sampled ... logits` line: the log has no depformer output")
    n_audio = len(steps[0]["audio_ids"] or [])
    found = len(steps)
    complete = 0
    for i, s in enumerate(steps):
        why = None
        if s["audio_ids"] is None or len(s["audio_ids"]) != n_audio or any(a is None or len(a) != 1 for a in s["audio_ids"]):
            why = f"its audio_ids line is missing or has another shape than step 0's ({n_audio} codebooks of batch 1)"
        elif s["text_ids"] is None or len(s["text_ids"]) != 1:
            why = "its text_ids is not one token"
        elif [c for _, c, _ in s["sampled"]] != list(range(dep_q)):
            why = f"it has {len(s['sampled'])} sampled lines, expected slices 0 .. {dep_q - 1} in order"
        if why:
            if allow_partial and i == len(steps) - 1 and i > 0:
                break
            raise _bad(path, f"step {i} (line {s['line']}) is incomplete: {why}",
                       fix=("pass --allow-partial to import the complete steps before it"
                            if i == len(steps) - 1 and i > 0 else "pass the whole, unedited MIMI_VERBOSE=1 output"))
        complete = i + 1
    steps = steps[:complete]
    n = len(steps)
    gen = dep_q
    n_user = n_audio - gen
    if n_user < 0:
        raise _bad(path, f"{n_audio} audio_ids per step but {gen} depformer slices")
    audio_ids = np.array([[a[0] for a in s["audio_ids"]] for s in steps], dtype=np.int64)
    pad = int(audio_ids[0, 0])  # step 0 feeds the audio pad token (audio_vocab_size - 1) to every codebook
    start = int(steps[0]["text_ids"][0])  # and the text start token (text_out_vocab_size)
    if acoustic_delay is None:
        early = audio_ids[:, 1] == pad if gen > 1 else np.zeros(n, dtype=bool)
        lead = int(np.argmin(early)) if not early.all() else n
        acoustic_delay = max(lead - 1, 0) if gen > 1 and lead < n else 2
    cfg = {"generated_audio_codebooks": gen, "input_audio_codebooks": n_user, "audio_vocab_size": pad + 1,
           "acoustic_delay": int(acoustic_delay), "text_pad_token": TEXT_PADDING_ID, "text_eop_token": 0, "text_start_token": start}
    tokens = np.full((n, 1 + gen), -1, dtype=np.int64)
    for i, s in enumerate(steps):
        tokens[i, 1:] = [t for t, _, _ in s["sampled"]]
        if i + 1 < n:
            tokens[i, 0] = steps[i + 1]["text_ids"][0]
    user = np.full((n, n_user), -1, dtype=np.int64)
    d = int(acoustic_delay)
    if n_user:
        user[:n - 1, 0] = audio_ids[1:, gen]  # codebook 0 is read one step late
        if n > d + 1:
            user[:n - d - 1, 1:] = audio_ids[d + 1:, gen + 1:]  # the others acoustic_delay + 1 steps late
    _check_range(path, tokens, user, cfg)
    notes = ["the text token of the last step is unknown (MIMI_VERBOSE prints it as the next step's input)"]
    if complete < found:
        notes.append(f"{n} complete steps imported; the log ends inside step {n}")
    return RustRun("verbose", str(path), tokens, user, cfg, settings, text_seed, audio_seed,
                   settings_from="options (defaults of the Rust CLI, moshi-cli gen)", notes=tuple(notes))


# --- per-step token lines --------------------------------------------------------------------------


def _pattern(text: str, groups: tuple[str, ...], option: str) -> re.Pattern:
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise XBackendError(f"{option} {text!r} is not a valid regular expression ({exc})") from None
    missing = [g for g in groups if g not in pattern.groupindex]
    if missing:
        raise XBackendError(f"{option} {text!r} has no named group {', '.join(missing)}",
                            fix=f"name the groups, e.g. {DEFAULT_TEXT_PATTERN if 'token' in groups else DEFAULT_AUDIO_PATTERN}")
    return pattern


LINES_DEFAULTS = {"text_vocab": 32000, "audio_vocab": 2048, "acoustic_delay": 2}  # Moshi-7B's, as moshi-cli runs it


def read_lines_log(path: str | Path, settings: SamplingSettings = RUST_CLI_SETTINGS, text_seed: int = RUST_CLI_SEED,
                   audio_seed: int = RUST_CLI_SEED, acoustic_delay: int = LINES_DEFAULTS["acoustic_delay"],
                   text_pattern: str = DEFAULT_TEXT_PATTERN, audio_pattern: str = DEFAULT_AUDIO_PATTERN,
                   audio_layout: str = "auto", text_vocab: int = LINES_DEFAULTS["text_vocab"],
                   audio_vocab: int = LINES_DEFAULTS["audio_vocab"],
                   allow_partial: bool = False) -> RustRun:
    """An app's own per-step token lines. `audio_layout`: `frame` when the app logs what
    moshi-core's `State::last_audio_tokens()` returns after step s (codebook 0 sampled at step
    s - acoustic_delay, the others at step s; nothing while it is None), `sampled` when it logs the
    depformer's output of step s; `auto`: `frame` unless the log has audio lines for steps before the
    acoustic delay, which `last_audio_tokens()` never returns."""
    path = Path(path).expanduser()
    audio_layout_asked = audio_layout
    if audio_layout not in AUDIO_LAYOUTS:
        raise XBackendError(f"Unknown audio layout {audio_layout!r}", asked=f"available are {', '.join(AUDIO_LAYOUTS)}")
    from ..store import validate

    validate.integer("--acoustic-delay", acoustic_delay, 0, MAX_DELAY)
    validate.integer("--text-vocab", text_vocab, 1, MAX_LOG_VOCAB)
    validate.integer("--audio-vocab", audio_vocab, 1, MAX_LOG_VOCAB)
    tp = _pattern(text_pattern, ("step", "token"), "--text-pattern")
    ap = _pattern(audio_pattern, ("step", "tokens"), "--audio-pattern")
    lines = _read_lines(path)
    texts: dict[int, int] = {}
    audios: dict[int, list[int]] = {}
    for lineno, line in enumerate(lines, 1):
        if m := tp.search(line):
            step, token = _step(m.group("step"), path, lineno), _count(m.group("token"), path, lineno, "token")
            if step in texts:
                raise _bad(path, f"line {lineno}: a second text token for step {step}")
            texts[step] = token
        elif m := ap.search(line):
            step = _step(m.group("step"), path, lineno)
            if step in audios:
                raise _bad(path, f"line {lineno}: a second audio line for step {step}")
            audios[step] = _ints(m.group("tokens"), path, lineno)
    if not texts:
        raise _bad(path, f"no text token line matches {text_pattern!r}",
                   fix="pass --text-pattern (and --audio-pattern) with named groups step and token (tokens)")
    n = max(texts) + 1
    gaps = [s for s in range(n) if s not in texts]
    if gaps:
        raise _bad(path, f"text token lines for steps 0 .. {n - 1} miss step {gaps[0]}"
                         + (f" and {len(gaps) - 1} more" if len(gaps) > 1 else ""),
                   fix="pass the whole log; its step numbers must count from 0")
    widths = {len(v) for v in audios.values()}
    if len(widths) > 1:
        raise _bad(path, f"audio token lines have different lengths: {sorted(widths)}")
    if not audios:
        raise _bad(path, f"no audio token line matches {audio_pattern!r}", fix="pass --audio-pattern")
    gen = widths.pop()
    if audio_layout == "auto":
        audio_layout = "sampled" if any(s < acoustic_delay for s in audios) or not acoustic_delay else "frame"
    tokens = np.full((n, 1 + gen), -1, dtype=np.int64)
    tokens[:, 0] = [texts[s] for s in range(n)]
    d = acoustic_delay
    extra = [s for s in audios if s >= n]
    if extra:
        raise _bad(path, f"an audio line for step {extra[0]} but text lines only up to step {n - 1}")
    for s, row in audios.items():
        if audio_layout == "sampled":
            tokens[s, 1:] = row
        else:  # frame: codebook 0 from step s - d, the others from step s
            if s - d >= 0:
                tokens[s - d, 1] = row[0]
            tokens[s, 2:] = row[1:]
    first_audio = d if audio_layout == "frame" else 0
    missing = [s for s in range(first_audio, n) if s not in audios]
    if missing and not (allow_partial and missing == [n - 1]):
        raise _bad(path, f"no audio token line for step {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                   fix=("pass --allow-partial to import the steps before it" if missing == [n - 1]
                        else "pass the whole log (and --audio-layout sampled if it logs every step's depformer output)"))
    if missing:
        tokens = tokens[:n - 1]
        n -= 1
    cfg = {"generated_audio_codebooks": gen, "input_audio_codebooks": 0, "audio_vocab_size": audio_vocab + 1,
           "acoustic_delay": d, "text_pad_token": TEXT_PADDING_ID, "text_eop_token": 0, "text_start_token": text_vocab}
    _check_range(path, tokens, None, cfg)
    how = "detected" if audio_layout_asked == "auto" else "asked"
    notes = [f"audio lines read as {audio_layout} ({how}; --audio-layout)", "no user codes in this log"]
    if audio_layout == "frame" and d:
        notes.append(f"audio0 of the last {d} steps is unknown (logged in later frames)")
    return RustRun("lines", str(path), tokens, None, cfg, settings, text_seed, audio_seed,
                   settings_from="options (defaults of the Rust CLI, moshi-cli gen)", notes=tuple(notes))


# --- format detection and the token trace -----------------------------------------------------------


def detect_format(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "session"
    _regular_file(path, "log")
    with open(path, "rb") as f:
        head = f.read(4 * 1024**2).decode("utf-8", errors="replace").splitlines()
    return "verbose" if is_verbose_log(head) else "lines"


def write_token_trace(run: RustRun, out: str | Path, backend: str = "rust-app", force: bool = False) -> Trace:
    """Write `run` as a token trace: tokens, user codes where known, settings and seeds; no logits.
    Everything load_trace checks is checked first, so a refused import writes nothing."""
    from ..store.claim import claim

    tokens = np.asarray(run.tokens)
    bad = (tokens < -1) | (tokens >= np.asarray(run.vocab))
    if bad.any():
        step, col = map(int, np.argwhere(bad)[0])
        raise _bad(run.source, f"step {step}'s {run.streams[col]} token is {int(tokens[step, col])}, outside its "
                   f"vocabulary of {run.vocab[col]}", fix="pass --text-vocab/--audio-vocab with the app's vocabularies")
    with claim(out, "trace", force=force):
        return _write_token_trace(run, Path(out), backend)


def _write_token_trace(run: RustRun, out: Path, backend: str) -> Trace:
    n_user = 0 if run.user_codes is None else int(run.user_codes.shape[1])
    user = run.user_codes if run.user_codes is not None else np.zeros((run.steps, 0), dtype=np.int64)
    sampler = {"mode": "candle", "algorithm": ALGORITHM, "rng": RNG, "identity": dict(IDENTITY), "seed": run.text_seed,
               "text_seed": run.text_seed, "audio_seed": run.audio_seed}
    if run.pad_mult is not None:
        sampler.update(pad_mult=run.pad_mult, pad_token=int(run.config["text_pad_token"]))
    if run.repetition_penalty is not None:
        sampler["repetition_penalty"] = list(run.repetition_penalty)
    meta = {
        "backend": backend, "library": "moshi-core (Rust, candle)",
        "model": {"name": run.model_file, "config": {"existing_text_padding_id": int(run.config["text_pad_token"]),
                                                     "text_card": int(run.config["text_start_token"]),
                                                     "card": int(run.config["audio_vocab_size"]) - 1,
                                                     "dep_q": run.dep_q, "n_q": run.dep_q + n_user}},
        "prompt": {"kind": "codes", "digest": codes_digest(user.T) if n_user else None},
        "seed": run.text_seed, "sampler": sampler, "settings": run.settings.__dict__,
        "settings_from": run.settings_from, "delays": run.delays, "rust": dict(run.config),
        "imported": {"format": run.format, "source": run.source, "notes": list(run.notes),
                     "transcript": run.transcript, "unknown_tokens": int((run.tokens < 0).sum())},
        "alignment": {"mode": "aligned", "consumes_late": True},
        "steps_requested": run.steps,
    }
    writer = TraceWriter(Path(out), meta, run.streams, run.vocab, n_user, has_logits=False)
    margins = [math.nan] * len(run.streams)
    for s in range(run.steps):
        writer.write_step(None, run.tokens[s].tolist(), margins, user[s])
    writer.close("complete")
    return load_trace(out)


def read_run(path: str | Path, fmt: str | None = None, **options) -> RustRun:
    """Read any of the three formats (detected unless `fmt` says)."""
    path = Path(path).expanduser()
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise XBackendError(f"Unknown log format {fmt!r}", asked=f"available are {', '.join(FORMATS)}")
    if fmt == "session":
        unused = [k for k, v in options.items() if v is not None]
        if unused:
            raise XBackendError(f"A moshi-backend session carries its own settings; {', '.join(unused)} do not apply",
                                fix="leave those options out for a session file")
        return read_session(path)
    options = {k: v for k, v in options.items() if v is not None}
    for key in ("text_seed", "audio_seed"):
        value = options.get(key)
        if value is not None and not 0 <= value < 2**64:
            raise XBackendError(f"--{key.replace('_', '-')} must be in 0 .. 2**64-1, got {value}")
    if fmt == "verbose":
        allowed = {"settings", "text_seed", "audio_seed", "acoustic_delay", "allow_partial"}
        return read_verbose(path, **{k: v for k, v in options.items() if k in allowed})
    run = read_lines_log(path, **options)
    assumed = [f"--{k.replace('_', '-')} {v}" for k, v in LINES_DEFAULTS.items() if k not in options]
    if assumed:  # a token-line log records none of these: say what was taken for it
        run = dataclasses.replace(run, notes=(*run.notes, f"assumed Moshi-7B's {', '.join(assumed)} (the log does not "
                                                          "say; pass the app's own if they differ)"))
    return run
