"""`xbackend sessions DIR`: many runs of the same input, side by side ("1 in 10 runs is garbage").

Reads every moshi-backend session (`*.json` with its `.safetensors`) and every token trace
directory in DIR, groups the runs by their exact token sequence, says where each group first
parts from the most common one, lists each run's transcript and which runs share a seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import XBackendError
from .logs import read_session
from ..store.trace import META, load_trace

SCHEMA = "xbackend.sessions/1"


@dataclass(frozen=True)
class _Run:
    name: str
    tokens: np.ndarray
    streams: list[str]
    text_seed: object
    audio_seed: object
    settings: dict
    transcript: str | None


def _from_trace(path: Path) -> _Run:
    t = load_trace(path)
    sampler = t.meta.get("sampler") or {}
    seed = t.meta.get("seed")
    return _Run(path.name, np.asarray(t.tokens), t.streams, sampler.get("text_seed", seed),
                sampler.get("audio_seed", seed), dict(t.meta.get("settings") or {}),
                (t.meta.get("imported") or {}).get("transcript"))


def _from_session(path: Path) -> _Run:
    r = read_session(path)
    return _Run(path.name, r.tokens, r.streams, r.text_seed, r.audio_seed, dict(r.settings.__dict__), r.transcript)


def _first_parting(a: np.ndarray, b: np.ndarray, streams: list[str]) -> dict | None:
    n = min(a.shape[0], b.shape[0])
    if a.shape[1] != b.shape[1]:
        return {"step": 0, "stream": None, "why": "different numbers of streams"}
    diff = a[:n] != b[:n]
    if diff.any():
        step, col = divmod(int(np.argmax(diff.reshape(-1))), diff.shape[1])
        return {"step": step, "stream": streams[col]}
    if a.shape[0] != b.shape[0]:
        return {"step": n, "stream": None, "why": f"same tokens through step {n - 1}, then one run ends"}
    return None


def survey(directory: str | Path) -> dict:
    """The sessions in `directory`, grouped by token sequence; unreadable ones are listed with the reason."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise XBackendError(f"{directory} is not a directory",
                            fix="pass the log_dir of moshi-backend (its .json and .safetensors files)")
    runs: list[_Run] = []
    unreadable = []
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            continue
        try:
            if entry.is_dir() and (entry / META).is_file():
                runs.append(_from_trace(entry))
            elif entry.is_file() and entry.suffix.lower() == ".json":
                runs.append(_from_session(entry))
        except XBackendError as exc:
            unreadable.append({"name": entry.name, "error": str(exc)})
    if not runs:
        raise XBackendError(f"No readable session in {directory}"
                            + (f" ({len(unreadable)} unreadable: {unreadable[0]['error']})" if unreadable else ""),
                            fix="pass moshi-backend's log_dir, or a folder of traces from xbackend import")
    groups: dict[str, list[_Run]] = {}
    for r in runs:
        key = hashlib.sha256(repr(r.tokens.shape).encode() + np.ascontiguousarray(r.tokens).tobytes()).hexdigest()
        groups.setdefault(key, []).append(r)
    ordered = sorted(groups.values(), key=lambda g: -len(g))  # stable: the earliest file wins ties
    ref = ordered[0][0]
    group_of = {r.name: i for i, g in enumerate(ordered) for r in g}
    seeds: dict[tuple, list[str]] = {}
    for r in runs:
        seeds.setdefault((str(r.text_seed), str(r.audio_seed)), []).append(r.name)
    settings = {repr(sorted(r.settings.items())) for r in runs}
    return {
        "schema": SCHEMA, "directory": str(directory), "sessions": len(runs),
        "distinct_sequences": len(ordered),
        "groups": [{"group": i, "sessions": [r.name for r in g], "count": len(g), "steps": int(g[0].tokens.shape[0]),
                    "first_parting_from_group_0": None if i == 0 else _first_parting(ref.tokens, g[0].tokens, ref.streams)}
                   for i, g in enumerate(ordered)],
        "runs": [{"name": r.name, "group": group_of[r.name], "steps": int(r.tokens.shape[0]), "text_seed": r.text_seed,
                  "audio_seed": r.audio_seed, "transcript": r.transcript, "settings": r.settings} for r in runs],
        "shared_seeds": [{"text_seed": k[0], "audio_seed": k[1], "sessions": v} for k, v in seeds.items() if len(v) > 1],
        "same_settings": len(settings) == 1,
        "unreadable": unreadable,
    }
