"""`codec`: the same audio through every Mimi implementation, compared code by code and sample by sample.

Garbled audio can come from the codec as well as from the LM (moshi#85). Each codec runs in a
worker process of its own (a crash or NaN is that codec's failure) and, on the same padded
24 kHz audio: encodes it in one call and frame by frame (as a live app does), decodes the
reference's one-shot codes both ways, and decodes its own codes (the round trip). The parent then
compares every codec against the reference (the first in `--codecs`) and gives one verdict each.

Verdicts (the first rule that holds; the others that hold are secondary findings):

| verdict | rule |
| --- | --- |
| `FAILED` | the codec crashed, timed out, or gave NaN/Inf audio or out-of-range codes |
| `MISMATCH` | decoding the same codes gives audio far beyond what numeric drift explains: more than 100x the tier's tolerance in some 80 ms frame; `first_divergence` is the first frame above the tolerance |
| `CODE_DIVERGENCE` | some code differs (frame, codebook) in one call or frame by frame; within tolerance when the share of differing codes and the decoded audio are |
| `NUMERIC_DRIFT` | every code equal; decoded audio not bitwise equal (within tolerance or not: the figures say) |
| `IDENTICAL` | every code equal, decoded audio bitwise equal, both ways |

Tolerances (`CODEC_TOLERANCES`, per tier, the looser of the two codecs' tiers) bound what a healthy
implementation of the same weights shows: `audio`, the largest per-frame max |Δ| relative to the
reference's RMS; `codes`, the share of codes allowed to differ (near-ties of the nearest-centroid
search flip under drift). Their derivation is in the README ("The codec stage").
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from . import (BUILTIN_CODECS, create_codec, describe_codec, parse_codec_specs, require_codec,
                     resolve_codec)
from .base import FRAME_SIZE, SAMPLE_RATE, check_codebooks, pad_to_frames
from ..store.rundir import distinct_dirs, safe_name, unique_labels
from ..errors import XBackendError
from ..store.claim import claim
from ..store.files import dir_in, remove_file, write_json, write_npy, write_wav
from ..capture.worker import run_worker

SCHEMA = "xbackend.codec/1"
EventFn = Callable[[dict], None]
MISMATCH_FACTOR = 100.0
# Per tier: `audio` max per-frame |Δ| / reference RMS, `codes` share of codes allowed to differ.
# Measured on this machine (README, "The codec stage"): fp32 implementations of the same weights
# (PyTorch, candle, PyTorch fp64) stay within 7.3e-7 x RMS with every code equal; fp16/bf16 decode
# within 2.6e-3..2.9e-2 x RMS while 43-96% of their codes differ (nearest-codeword search on rounded
# latents), so at those tiers codes are reported but only the audio is held to a bound.
CODEC_TOLERANCES = {
    "fp64": {"audio": 1e-5, "codes": 0.005},
    "fp32": {"audio": 1e-5, "codes": 0.005},
    "fp16": {"audio": 2e-2, "codes": 1.0},
    "bf16": {"audio": 1e-1, "codes": 1.0},
}
VERDICTS = ("FAILED", "MISMATCH", "CODE_DIVERGENCE", "NUMERIC_DRIFT", "IDENTICAL")
PATHS = ("one-shot", "streaming")
FILES = {"encode": "codes.npy", "encode_steps": "codes_stream.npy", "decode": "decoded.npy",
         "decode_steps": "decoded_stream.npy", "roundtrip": "roundtrip.npy"}


@dataclass(frozen=True)
class CodecRequest:
    codecs: tuple[str, ...]
    codec: str | None = None  # weights: tiny, a path, hf://
    prompt: str | None = None
    codebooks: int = 8
    timeout: float = 600.0
    plugins: tuple[str, ...] = ()


def codec_tolerance(tier_a: str, tier_b: str) -> dict:
    """The looser of the two tiers' tolerances."""
    for tier in (tier_a, tier_b):
        if tier not in CODEC_TOLERANCES:
            raise XBackendError(f"No codec tolerance for tier {tier!r}", asked=f"known tiers are {', '.join(CODEC_TOLERANCES)}")
    a, b = CODEC_TOLERANCES[tier_a], CODEC_TOLERANCES[tier_b]
    return {k: max(a[k], b[k]) for k in a}


# --------------------------------------------------------------------------- pure comparisons


def compare_codes(ref: np.ndarray, other: np.ndarray) -> dict:
    """Per codebook: agreement ratio and first differing frame; overall: share differing and first (frame, codebook)."""
    frames = min(ref.shape[1], other.shape[1])
    k = min(ref.shape[0], other.shape[0])
    diff = ref[:k, :frames] != other[:k, :frames]
    per = [{"codebook": i, "agreement": float(1.0 - diff[i].mean()) if frames else 1.0,
            "first_frame": int(np.argmax(diff[i])) if diff[i].any() else None} for i in range(k)]
    first = None
    if diff.any():
        frame = int(np.flatnonzero(diff.any(axis=0))[0])
        first = {"frame": frame, "codebook": int(np.flatnonzero(diff[:, frame])[0])}
    return {"frames": frames, "identical": not diff.any() and ref.shape == other.shape,
            "disagreement": float(diff.mean()) if diff.size else 0.0, "first": first, "codebooks": per}


def snr_db(ref: np.ndarray, other: np.ndarray) -> float | None:
    """10 log10(Σ ref² / Σ (other − ref)²); None when undefined: equal arrays (infinite) or a silent reference."""
    noise = float(np.sum((other.astype(np.float64) - ref.astype(np.float64)) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0.0 or signal == 0.0:
        return None
    return 10.0 * math.log10(signal / noise)


def frame_errors(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per 80 ms frame: max |Δ| relative to the reference's RMS over the whole utterance."""
    n = min(ref.shape[0], other.shape[0]) // FRAME_SIZE * FRAME_SIZE
    delta = np.abs(other[:n].astype(np.float64) - ref[:n].astype(np.float64)).reshape(-1, FRAME_SIZE).max(axis=1)
    scale = float(np.sqrt(np.mean(ref[:n].astype(np.float64) ** 2))) if n else 0.0
    return delta / max(scale, 1e-12)


def compare_audio(ref: np.ndarray, other: np.ndarray, tol: float) -> dict:
    """max |Δ|, SNR (dB) and the first frame whose error exceeds `tol` (and `MISMATCH_FACTOR` x `tol`)."""
    err = frame_errors(ref, other)
    n = err.shape[0] * FRAME_SIZE
    delta = np.abs(other[:n].astype(np.float64) - ref[:n].astype(np.float64))
    above = np.flatnonzero(err > tol)
    far = np.flatnonzero(err > MISMATCH_FACTOR * tol)
    return {"identical": bool(np.array_equal(ref, other)), "max_abs": float(delta.max()) if n else 0.0,
            "max_rel": float(err.max()) if err.size else 0.0, "snr_db": snr_db(ref[:n], other[:n]),
            "first_frame_above_tolerance": int(above[0]) if above.size else None,
            "first_frame_far_above": int(far[0]) if far.size else None,
            "frames_above_tolerance": int(above.size), "tolerance": tol}


def verdict(label: str, ref_label: str, codes: dict[str, dict], audio: dict[str, dict], tol: dict,
            failure: str | None = None) -> dict:
    """One codec's verdict against the reference from its per-path code and audio comparisons."""
    holds: list[tuple[str, dict | None]] = []
    if failure:
        holds.append(("FAILED", None))
    else:
        far_audio = [(p, a) for p, a in audio.items() if a["first_frame_far_above"] is not None]
        if far_audio:
            p, a = min(far_audio, key=lambda x: x[1]["first_frame_above_tolerance"])
            holds.append(("MISMATCH", {"frame": a["first_frame_above_tolerance"], "codebook": None, "path": p,
                                       "what": "audio"}))
        diverged = [(p, c) for p, c in codes.items() if c["first"] is not None]
        if diverged:
            p, c = min(diverged, key=lambda x: (x[1]["first"]["frame"], x[1]["first"]["codebook"]))
            holds.append(("CODE_DIVERGENCE", {**c["first"], "path": p, "what": "codes"}))
        else:
            drifted = [(p, a) for p, a in audio.items() if not a["identical"]]
            if drifted:
                above = [(p, a) for p, a in drifted if a["first_frame_above_tolerance"] is not None]
                if above:
                    p, a = min(above, key=lambda x: x[1]["first_frame_above_tolerance"])
                    at = {"frame": a["first_frame_above_tolerance"], "codebook": None, "path": p, "what": "audio"}
                else:
                    at = None
                holds.append(("NUMERIC_DRIFT", at))
            else:
                holds.append(("IDENTICAL", None))
    within = failure is None and all(c["disagreement"] <= tol["codes"] for c in codes.values()) and all(
        a["first_frame_above_tolerance"] is None for a in audio.values())
    name, at = holds[0]
    v = {"codec": label, "vs": ref_label, "verdict": name, "first_divergence": at,
         "secondary": [{"verdict": n, "at": a} for n, a in holds[1:]],
         "figures": {"codes": codes, "audio": audio, "tolerance": tol, "within_tolerance": within, "error": failure}}
    if not within and failure is None and name in ("CODE_DIVERGENCE", "NUMERIC_DRIFT"):
        v["secondary"].append({"verdict": "BEYOND_TOLERANCE", "at": at})
    return v


def _fmt_snr(a: dict) -> str:
    if a["snr_db"] is not None:
        return f"{a['snr_db']:.1f} dB"
    return "∞: bitwise equal" if a["identical"] else "undefined: silent reference"


def explain(v: dict, known_issues: list[str]) -> str:
    """A paragraph with the numbers behind the verdict (only measured ones)."""
    f, name = v["figures"], v["verdict"]
    if name == "FAILED":
        return f"{v['codec']} failed: {f['error']}"
    parts = []
    for path in PATHS:
        c, a = f["codes"].get(path), f["audio"].get(path)
        if c is None or a is None:
            continue
        codes = ("codes identical" if c["first"] is None else
                 f"{(1 - c['disagreement']):.1%} of codes agree, first difference at frame {c['first']['frame']}, "
                 f"codebook {c['first']['codebook']}")
        audio = (f"decoding the reference's codes gives max |Δ| {a['max_abs']:.3g} (SNR {_fmt_snr(a)}, "
                 f"worst frame {a['max_rel']:.3g} x the reference RMS")
        audio += (")" if a["first_frame_above_tolerance"] is None else
                  f", above the tolerance {a['tolerance']:g} from frame {a['first_frame_above_tolerance']})")
        parts.append(f"{path}: {codes}; {audio}")
    text = f"{v['codec']} against {v['vs']}: " + "; ".join(parts) + "."
    if name == "MISMATCH":
        text += (f" That is more than {MISMATCH_FACTOR:g}x what numeric drift of this tier explains "
                 f"(tolerance: audio {f['tolerance']['audio']:g}, codes {f['tolerance']['codes']:.1%}): a different "
                 "computation, not rounding.")
    elif name == "CODE_DIVERGENCE":
        text += (f" Within tolerance ({f['tolerance']['codes']:.1%} of codes may differ at this tier: the nearest-codeword "
                 "search flips where rounding moves the latent)." if f["within_tolerance"] else " Beyond tolerance.")
    elif name == "NUMERIC_DRIFT":
        text += " Within tolerance." if f["within_tolerance"] else " Beyond tolerance."
    if known_issues and not f["within_tolerance"]:
        text += " Known upstream issue of this implementation that fits: " + "; ".join(known_issues) + "."
    return text


def streaming_consistency(label: str, tier: str, codes: np.ndarray | None, codes_stream: np.ndarray | None,
                          decoded: np.ndarray | None, decoded_stream: np.ndarray | None) -> dict | None:
    """One codec against itself: frame-by-frame encode/decode against one call."""
    if codes is None or codes_stream is None or decoded is None or decoded_stream is None:
        return None
    tol = CODEC_TOLERANCES[tier]
    c, a = compare_codes(codes, codes_stream), compare_audio(decoded, decoded_stream, tol["audio"])
    return {"codec": label, "codes": {k: c[k] for k in ("identical", "disagreement", "first")},
            "audio": {k: a[k] for k in ("identical", "max_abs", "snr_db", "first_frame_above_tolerance")},
            "within_tolerance": c["disagreement"] <= tol["codes"] and a["first_frame_above_tolerance"] is None}


# --------------------------------------------------------------------------- running


def _runs(label: str, d: Path, audio_file: Path, ref_codes: Path | None) -> list[dict]:
    """The runs of one codec's worker: encode both ways, decode the reference's codes both ways, round trip."""
    codes = d / FILES["encode"]
    decode_src = ref_codes or codes
    runs = [("encode", "encode", audio_file), ("encode_steps", "encode_steps", audio_file),
            ("decode", "decode", decode_src), ("decode_steps", "decode_steps", decode_src)]
    if ref_codes is not None:
        runs.append(("roundtrip", "decode", codes))
    return [{"name": f"{label}/{key}", "key": key, "op": op, "input": str(src), "out": str(d / FILES[key])}
            for key, op, src in runs]


def _load(path: Path) -> np.ndarray | None:
    return np.load(path, allow_pickle=False) if path.is_file() else None


def read_prompt_audio(path: str | None) -> tuple[np.ndarray, str]:
    """The prompt as 24 kHz mono float32, through the same loader every command uses."""
    from ..capture.prompt import CODES_SUFFIXES, DEFAULT_PROMPT, read_audio

    from ..store.files import regular_file

    file = Path(path).expanduser() if path else DEFAULT_PROMPT
    regular_file(file, "Prompt", "pass a WAV/FLAC file with --prompt", follow=True)
    if file.suffix.lower() in CODES_SUFFIXES:
        raise XBackendError(f"The codec stage needs audio, and {file.name} is a codes file",
                            fix="pass a WAV/FLAC file with --prompt")
    return read_audio(file), str(file)


def run_codec_stage(req: CodecRequest, out: str | Path, on_event: EventFn | None = None, force: bool = False) -> dict:
    """Run every codec in its own worker and write `report.json`, the arrays and WAVs to `out`."""
    from ..backends import load_plugin

    started = time.perf_counter()
    out = Path(out)
    specs = parse_codec_specs(",".join(req.codecs))
    from ..store import validate

    validate.timeout(req.timeout)
    for plugin in req.plugins:
        load_plugin(plugin)
    ref = resolve_codec(req.codec)
    info = check_codebooks(ref, req.codebooks)
    codecs = [create_codec(s) for s in specs]
    for codec in codecs:  # everything a user can fix is said before minutes of work
        require_codec(codec)
        codec.check(ref, info)
    audio, source = read_prompt_audio(req.prompt)
    padded = pad_to_frames(audio)
    with claim(out, "codec", force=force) as claimed:
        return _run(req, out, on_event, specs, codecs, ref, source, audio, padded, claimed.owned, started)


def _run(req: CodecRequest, out: Path, on_event, specs, codecs, ref, source, audio, padded, owned: bool,
         started: float) -> dict:
    audio_file = out / "input.npy"
    write_npy(audio_file, padded, root=out)
    labels = distinct_dirs(unique_labels([str(s) for s in specs]), "codecs")
    dir_in(out / "jobs", root=out)
    results: dict[str, dict] = {}
    ref_codes: Path | None = None
    for i, (label, spec, codec) in enumerate(zip(labels, specs, codecs)):
        d = dir_in(out / "codecs" / safe_name(label), root=out)
        for stale in d.glob("*.npy") if owned else ():  # a reused --out must not mix arrays of an earlier run
            remove_file(stale, root=out)
        job = {"plugins": [str(p) for p in req.plugins], "spec": str(spec), "label": label,
               "weights": str(ref.weights), "config": ref.config, "n_codebooks": req.codebooks,
               "meta": str(d / "meta.json"), "runs": _runs(label, d, audio_file, None if i == 0 else ref_codes)}
        if i > 0 and ref_codes is None:
            results[label] = {"status": "skipped", "error": f"the reference {labels[0]} gave no codes", "dir": d,
                              "tier": spec.dtype}
            continue
        outcomes = run_worker(job, out / "jobs" / f"{safe_name(label)}.json", req.timeout, on_event,
                              module="xbackend.codecs.worker")
        failed = [o for o in outcomes if o.status != "ok"]
        results[label] = {"status": "failed" if failed else "ok", "error": failed[0].error if failed else None,
                          "dir": d, "tier": spec.dtype}
        if i == 0 and (d / FILES["encode"]).is_file():
            ref_codes = d / FILES["encode"]
    report = build_report(req, ref, source, audio, padded, labels, results, out)
    report["timing"]["wall_s"] = round(time.perf_counter() - started, 3)
    write_json(out / "report.json", report)
    return report


def _meta(d: Path) -> dict:

    from ..store.files import load_json

    try:
        return load_json(d / "meta.json", "codec meta.json", "")
    except XBackendError:
        return {}


def _wav(path: Path, audio: np.ndarray) -> str:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    write_wav(path, audio / peak * 0.9 if peak > 1.0 else audio, SAMPLE_RATE, root=path.parent.parent)
    return str(path.relative_to(path.parent.parent))


def build_report(req: CodecRequest, ref, source: str, audio: np.ndarray, padded: np.ndarray,
                 labels: list[str], results: dict[str, dict], out: Path) -> dict:
    seconds = padded.shape[0] / SAMPLE_RATE
    arrays = {label: {key: _load(r["dir"] / name) for key, name in FILES.items()} for label, r in results.items()}
    metas = {label: _meta(r["dir"]) for label, r in results.items()}
    ref_label = labels[0]
    ra = arrays[ref_label]
    codecs, verdicts, consistency, timing, wavs = [], [], [], {}, {"input": _wav(out / "audio" / "input.wav", padded)}
    for label in labels:
        r, a, m = results[label], arrays[label], metas[label]
        codecs.append({"name": label, "spec": label.split("#")[0], "status": r["status"], "error": r["error"],
                       "library": (m.get("env") or {}).get("library"), "env": m.get("env"),
                       "known_issues": m.get("known_issues", []), "hook_points": m.get("hook_points", []),
                       "files": {k: str((r["dir"] / n).relative_to(out)) for k, n in FILES.items() if a[k] is not None}})
        own = a["decode"] if label == ref_label else a["roundtrip"]
        codecs[-1]["roundtrip_snr_db"] = snr_db(padded, own) if own is not None else None
        runs = m.get("runs", {})
        timing[label] = {"load_s": m.get("load_s"), **{k: {"seconds": v["seconds"],
                                                           "seconds_per_audio_second": round(v["seconds"] / seconds, 4)}
                                                       for k, v in runs.items()}}
        if a["decode"] is not None:
            wavs[f"{label}/decoded"] = _wav(out / "audio" / f"{safe_name(label)}.decoded.wav", a["decode"])
        if own is not None and label != ref_label:
            wavs[f"{label}/roundtrip"] = _wav(out / "audio" / f"{safe_name(label)}.roundtrip.wav", own)
        c = streaming_consistency(label, r["tier"], a["encode"], a["encode_steps"], a["decode"], a["decode_steps"])
        if c:
            consistency.append(c)
    not_diagnosed = []
    for label in labels[1:]:
        r, a = results[label], arrays[label]
        if r["status"] == "skipped" or results[ref_label]["status"] != "ok":
            not_diagnosed.append({"codec": label, "reason": r["error"] if r["status"] == "skipped" else
                                  f"the reference {ref_label} failed: {results[ref_label]['error']}"})
            continue
        tol = codec_tolerance(results[ref_label]["tier"], r["tier"])
        code_cmp, audio_cmp = {}, {}
        for path, ck, ak in (("one-shot", "encode", "decode"), ("streaming", "encode_steps", "decode_steps")):
            if a[ck] is not None:
                code_cmp[path] = compare_codes(ra[ck], a[ck])
            if a[ak] is not None:
                audio_cmp[path] = compare_audio(ra[ak], a[ak], tol["audio"])
        v = verdict(label, ref_label, code_cmp, audio_cmp, tol, r["error"] if r["status"] != "ok" else None)
        v["explanation"] = explain(v, metas[label].get("known_issues", []))
        verdicts.append(v)
    if results[ref_label]["status"] != "ok":
        v = verdict(ref_label, ref_label, {}, {}, codec_tolerance(results[ref_label]["tier"], results[ref_label]["tier"]),
                    results[ref_label]["error"])
        v["explanation"] = explain(v, [])
        verdicts.insert(0, v)
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(x) for x in ["xbackend", *sys.argv[1:]]) if sys.argv else None,
        "request": {"codecs": list(req.codecs), "codec": req.codec or "tiny", "codebooks": req.codebooks,
                    "prompt": {"source": source, "seconds": round(audio.shape[0] / SAMPLE_RATE, 3),
                               "frames": padded.shape[0] // FRAME_SIZE},
                    "timeout": req.timeout, "plugins": list(req.plugins)},
        "weights": describe_codec(ref),
        "reference": ref_label,
        "codecs": codecs,
        "verdicts": verdicts,
        "not_diagnosed": not_diagnosed,
        "streaming_consistency": consistency,
        "audio": wavs,
        "timing": {"audio_seconds": round(seconds, 3), "codecs": timing},
        "tolerances": {"table": CODEC_TOLERANCES, "mismatch_factor": MISMATCH_FACTOR},
    }


def exit_code(report: dict) -> int:
    """3 a codec failed or was skipped, 1 a difference beyond tolerance (or an inconsistent reference), else 0."""
    from ..results import exit_code as policy

    ref = next((c for c in report["streaming_consistency"] if c["codec"] == report["reference"]), None)
    attention = (ref is not None and not ref["within_tolerance"]) or any(
        v["verdict"] not in ("IDENTICAL", "NUMERIC_DRIFT", "CODE_DIVERGENCE") or not v["figures"]["within_tolerance"]
        for v in report["verdicts"])
    return policy(backend_failed=any(c["status"] != "ok" for c in report["codecs"]), attention=attention)


__all__ = ["CodecRequest", "run_codec_stage", "exit_code", "compare_codes", "compare_audio", "verdict",
           "CODEC_TOLERANCES", "BUILTIN_CODECS"]
