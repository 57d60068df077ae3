"""Words: a run's text stream decoded with the model's own SentencePiece tokenizer.

Decoding follows upstream's servers: every text token except the end-of-padding id 0 and the
padding id (`existing_text_padding_id`, 3 in Kyutai's models) becomes its piece, with
SentencePiece's word marker `▁` read as a space. A trace records which tokenizer its model had
(name, path, digest); the file is used only where its digest still matches, so a trace that
travelled (a bundle, another machine) shows no words rather than wrong ones. Where two runs part,
the text is marked with `MARK` at the step of their first differing token (any stream: from that
step on, their inputs differ).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

import numpy as np

from ..capture.models import TINY, file_digest
from ..streams import text_padding_id
from ..store.trace import Trace

MARK = "⟦"
END_OF_PADDING_ID = 0
MAX_TOKENIZER_BYTES = 64 << 20  # Kyutai's 32k model is 0.55 MB; anything this big is not a tokenizer
BUNDLED = TINY / "tokenizer.model"


class TextTokenizer:
    """A SentencePiece model, read from a file (protobuf: no code runs)."""

    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        self.digest = file_digest(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
        self.size = int(self._sp.get_piece_size())

    def piece(self, token: int) -> str:
        """The text of one token as upstream prints it (`▁` as a space); an id beyond the model is `�`."""
        if not 0 <= token < self.size:
            return "\ufffd"
        return self._sp.id_to_piece(int(token)).replace("\u2581", " ")


@functools.lru_cache(maxsize=16)
def _open(path: str, digest: str | None) -> TextTokenizer | None:
    file = Path(path)
    try:
        if not file.is_file() or file.stat().st_size > MAX_TOKENIZER_BYTES:
            return None
        tokenizer = TextTokenizer(file)
    except (ImportError, OSError, RuntimeError):  # sentencepiece missing, unreadable, not a model
        return None
    return tokenizer if digest is None or tokenizer.digest == digest else None


def tokenizer_for(meta: Mapping, explicit: str | Path | None = None, known: Path | None = None) -> TextTokenizer | None:
    """The tokenizer a trace's model had: the bundled one, or `known` (the tokenizer of the model the
    user named on the command line), whichever has the digest the trace records; `explicit` (the
    user's file) is taken as it is. The path a trace records is never opened: a trace is untrusted,
    and its path could name any file (a FIFO, /proc/kmsg)."""
    if explicit is not None:
        return _open(str(explicit), None)
    model = meta.get("model") if isinstance(meta.get("model"), Mapping) else {}
    recorded = model.get("tokenizer") if isinstance(model.get("tokenizer"), Mapping) else {}
    digest = recorded.get("digest")
    if isinstance(digest, str) and digest:
        for candidate in ([str(known)] if known is not None else []) + [str(BUNDLED)]:
            found = _open(candidate, digest)
            if found is not None:
                return found
        return None
    if model.get("name") == "tiny" and model.get("source") == "bundled":  # traces from before tokenizers
        from ..capture.models import resolve_model

        if model.get("digest") == resolve_model("tiny").digest:
            return _open(str(BUNDLED), None)
    return None


def skipped_ids(meta: Mapping) -> frozenset[int]:
    """Token ids that are not words: end of padding and the model's padding id."""
    return frozenset({END_OF_PADDING_ID, text_padding_id(meta)})


def pieces(trace: Trace, tokenizer: TextTokenizer | None = None) -> list[str] | None:
    """Each step's text ('' for padding), or None when the trace has no text stream or no tokenizer."""
    tokenizer = tokenizer or tokenizer_for(trace.meta)
    if tokenizer is None or "text" not in trace.streams:
        return None
    skip = skipped_ids(trace.meta)
    column = np.asarray(trace.tokens[:, trace.streams.index("text")])
    return ["" if int(t) in skip else tokenizer.piece(int(t)) for t in column]


def join(step_pieces: list[str], mark_at: int | None = None) -> str:
    """The words of a run, `MARK` placed before step `mark_at` (if any)."""
    if mark_at is None:
        return "".join(step_pieces).strip()
    before, after = "".join(step_pieces[:mark_at]).strip(), "".join(step_pieces[mark_at:]).strip()
    return f"{before} {MARK}{after}".strip() if before else f"{MARK}{after}"


def trace_text(trace: Trace, tokenizer: str | Path | None = None) -> str:
    """A run's decoded text; '' when there is no tokenizer (or no text stream)."""
    found = tokenizer_for(trace.meta, tokenizer)
    step_pieces = pieces(trace, found) if found is not None else None
    return "" if step_pieces is None else join(step_pieces)


def first_difference(a: Trace, b: Trace) -> tuple[int, str] | None:
    """First (step, stream) whose tokens differ over the common steps; a shorter run parts at its end."""
    n = min(a.steps, b.steps)
    if a.streams == b.streams and n:
        mismatch = np.asarray(a.tokens[:n]) != np.asarray(b.tokens[:n])
        if mismatch.any():
            step, col = divmod(int(np.argmax(mismatch.reshape(-1))), mismatch.shape[1])
            return step, a.streams[col]
    return None if a.steps == b.steps else (n, None)


def no_words_reason() -> str:
    """Why a run shows no words, in the terms of the fix."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return "sentencepiece is not installed (pip install sentencepiece)"
    return "no text tokenizer for this model"


def run_words(runs: Mapping[str, Mapping[str, Trace | None]], reference: str, known: Path | None = None) -> dict:
    """Words of every run of a compare, each marked where it parts from the run it is compared with.

    `runs` maps backend label -> run name (`native-0`, `portable`, `forced`, ...) -> trace. A
    native or forced run is held against the reference's `native-0` (the reference's own repeats
    too), a portable run against the reference's `portable`; the reference's first runs of each are
    the yardsticks and carry no mark.
    """
    ref = runs.get(reference, {})
    rows, tokenizer = [], None
    for label, named in runs.items():
        for name, trace in named.items():
            if trace is None:
                continue
            found = tokenizer_for(trace.meta, known=known)
            tokenizer = tokenizer or found
            against_name = "portable" if name == "portable" else "native-0"
            yardstick = ref.get(against_name)
            if label == reference and name == against_name:
                yardstick = None
            step_pieces = pieces(trace, found) if found is not None else None
            part = first_difference(yardstick, trace) if yardstick is not None else None
            rows.append({
                "backend": label, "run": name, "steps": trace.steps,
                "against": f"{reference}/{against_name}" if yardstick is not None else None,
                "first_divergence": None if part is None else {"step": part[0], "stream": part[1]},
                "text": "" if step_pieces is None else join(step_pieces),
                "marked": "" if step_pieces is None else join(step_pieces, None if part is None else part[0]),
            })
    first = next((t for named in runs.values() for t in named.values() if t is not None), None)
    return {"tokenizer": None if tokenizer is None else {"name": tokenizer.path.name, "digest": tokenizer.digest},
            "mark": MARK, "skipped_ids": sorted(skipped_ids(first.meta)) if first is not None else [], "runs": rows}


def shorten(text: str, width: int = 110) -> str:
    """At most `width` characters for a terminal line, keeping the mark and what follows it in view."""
    if len(text) <= width:
        return text
    at = text.find(MARK)
    if at < 0 or at < width - 30:
        return text[:width - 1] + "…"
    start = max(0, at - width // 3)
    return "…" + text[start:start + width - 2] + "…"


def audio_digest(samples: np.ndarray) -> str:
    """sha256 of decoded audio (float32 samples): equal digests are bitwise-equal audio."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(samples, dtype=np.float32).tobytes()).hexdigest()[:16]


__all__ = ["MARK", "TextTokenizer", "audio_digest", "first_difference", "join", "no_words_reason", "pieces",
           "run_words", "shorten", "skipped_ids", "tokenizer_for", "trace_text"]
