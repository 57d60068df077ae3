"""`xbackend replay`: was it candle's sampler, or the app's logits?

A Rust Moshi app's run comes in as a token trace (`xbackend import`). Replay teacher-forces a
Python backend along the app's tokens, with the app's user codes, and at every decision replays
candle's TopK sampler with the app's seeds and settings on this backend's logits. candle's RNG
does not depend on the logits (decision i of a processor uses word i), so the uniform number
behind every app token is known exactly; the app's token can differ from candle's pick on these
logits only if the app's probabilities put that number in another interval, i.e. its logits
differed. Verdicts:

- `CONSISTENT`: every known app token is what candle's sampler picks on this backend's logits:
  the app's differences from other runs come from its seed or settings, not from its logits;
- `LOGITS_DIFFER`: at the first inconsistency the draw lies further from the nearest boundary
  than float rounding can move it: the app's logits differed from this backend's there
  (numerics on the app's device, or a semantic difference such as the acoustic delay);
- `WITHIN_ROUNDING`: the first inconsistency lies within a few float32 ulps of a boundary, where
  another libm's `expf` or a GPU softmax can flip the draw: no evidence of different logits.

Where the app's log does not hold a token (a session loses the delayed codebooks of the steps
before its acoustic delay), the forced run takes candle's pick on this backend's logits, which is
what a consistent app sampled; a first inconsistency whose context holds such a token says so.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..samplers.candle import FRAGILE_ULPS, CandleSampler, CandleStreams, rng_word_index, select_nth_unstable_desc
from ..errors import XBackendError
from ..capture.models import resolve_model
from ..samplers import Sampler, SamplingSettings
from ..streams import text_padding_id
from ..results import count, plain
from ..store.files import clean, write_json, write_npy, write_text
from ..store.trace import Trace, load_trace

SCHEMA = "xbackend.replay/1"
VERDICTS = ("CONSISTENT", "LOGITS_DIFFER", "WITHIN_ROUNDING")
MAX_LISTED = 20


@dataclass(frozen=True)
class ReplayRequest:
    trace: str
    backend: str = "cpu"
    model: str = "tiny"
    model_config: str | None = None
    prompt: str | None = None  # user codes when the trace has none (a token-line log)
    steps: int | None = None
    compile: str = "auto"  # --compile of the forced run


def _candle_setup(trace: Trace) -> tuple[SamplingSettings, int, int, float | None, int, tuple | None]:
    """Settings, seeds, pad_mult, pad token and repetition penalty of the run the trace recorded."""
    sampler = trace.meta.get("sampler") or {}
    if sampler.get("mode") != "candle":
        raise XBackendError(f"Trace {trace.path} was not sampled by candle (sampler {sampler.get('mode')!r})",
                            fix="replay an imported Rust run (xbackend import) or a capture with --sampler candle")
    try:
        settings = SamplingSettings(**{k: trace.meta["settings"][k] for k in SamplingSettings.__dataclass_fields__})
    except (KeyError, TypeError):
        raise XBackendError(f"Trace {trace.path} records no complete sampling settings",
                            fix="import the run again with xbackend import") from None
    seed = trace.meta.get("seed")
    text_seed = sampler.get("text_seed", seed if isinstance(seed, int) else None)
    audio_seed = sampler.get("audio_seed", seed if isinstance(seed, int) else None)
    for name, value in (("text_seed", text_seed), ("audio_seed", audio_seed)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
            raise XBackendError(f"Trace {trace.path} has no valid {name} ({value!r})",
                                fix="import the run again, giving --seed if the log has none")
    rep = sampler.get("repetition_penalty")
    rep = tuple(rep) if rep and float(rep[1]) != 1.0 else None
    pad_token = int(sampler.get("pad_token", text_padding_id(trace.meta)))
    return settings, text_seed, audio_seed, sampler.get("pad_mult"), pad_token, rep


def repetition_penalty(logits: np.ndarray, history: np.ndarray, context: int, penalty: float,
                       skip: set[int]) -> np.ndarray:
    """moshi-core `State::apply_repetition_penalty` on the text logits (f32), over the text tokens
    of the previous steps, newest first, pad/eop/start tokens skipped, `context` tokens counted."""
    out = np.asarray(logits, dtype=np.float32).copy()
    seen: set[int] = set()
    counted = 0
    p = np.float32(penalty)
    for token in history[::-1].tolist():
        if token in skip or token < 0:
            continue
        if counted >= context:
            break
        counted += 1
        if token in seen:
            continue
        seen.add(token)
        if 0 <= token < out.size:
            out[token] = out[token] / p if out[token] >= 0 else out[token] * p
    return out


def recorded_prompt(app: Trace) -> str | None:
    """The prompt an xbackend capture recorded, only if it can be trusted: the bundled prompt, or a file
    inside the trace directory. A path named by a trace is never followed out of it."""
    from ..store.claim import inside
    from ..capture.prompt import DEFAULT_PROMPT

    source = (app.meta.get("prompt") or {}).get("source")
    if source is None:
        return None
    if source == str(DEFAULT_PROMPT):
        return source
    if isinstance(source, str) and not Path(source).is_absolute() and ".." not in Path(source).parts:
        return str(inside(app.path, source, "the trace's prompt source"))
    raise XBackendError(f"Trace {app.path} names its prompt as {clean(source)[:120]!r}, outside the trace directory",
                        asked="paths named inside a trace are not followed",
                        fix="pass --prompt with the audio or codes file the capture was given")


def replay(req: ReplayRequest, out: str | Path, progress: Callable[[int, int], None] | None = None,
           force: bool = False) -> dict:
    """Teacher-force `req.backend` along the trace's tokens and replay candle's sampler on its logits."""
    from ..store.claim import claim

    app = load_trace(req.trace)  # everything the trace says is checked before --out is touched
    setup = _candle_setup(app)
    if "imported" not in app.meta:  # an xbackend capture: its inputs.bin follows its backend's convention; replay its prompt
        req = ReplayRequest(**{**req.__dict__, "prompt": req.prompt or recorded_prompt(app)})
    with claim(out, "replay", force=force):
        return _replay(req, app, setup, Path(out), progress)


def _replay(req: ReplayRequest, app: Trace, setup: tuple, out: Path,
            progress: Callable[[int, int], None] | None) -> dict:
    from ..capture.run import CaptureRequest, capture, forced_plan

    settings, text_seed, audio_seed, pad_mult, pad_token, rep = setup
    imported = "imported" in app.meta
    model = resolve_model(req.model, req.model_config)
    if app.streams != model.streams or list(app.meta["vocab"]) != list(model.vocab):
        raise XBackendError(f"Trace {app.path} does not fit model {model.name}",
                            asked=f"the trace has streams {len(app.streams)} with vocabularies {app.meta['vocab']}, "
                                  f"the model {len(model.streams)} with {model.vocab}",
                            fix=("import the log again with the app's --text-vocab, --audio-vocab and --acoustic-delay "
                                 "(a token-line log records none of them), or pass --model with the checkpoint it ran"
                                 if (app.meta.get("imported") or {}).get("format") == "lines"
                                 else "pass --model with the checkpoint the Rust app ran"))
    steps = app.steps if req.steps is None else min(req.steps, app.steps)
    if steps < 1:
        raise XBackendError(f"Trace {app.path} has no step to replay")
    n_inputs = int(app.meta.get("n_inputs", 0)) if imported else 0
    if n_inputs:
        if n_inputs != model.n_user:
            raise XBackendError(f"Trace {app.path} has {n_inputs} user codebooks, model {model.name} takes {model.n_user}",
                                fix="pass --model with the checkpoint the Rust app ran")
        codes = np.asarray(app.inputs[:steps], dtype=np.int64).T.copy()
        codes[codes < 0] = 0  # unknown codes are never read by the model (they come after its last step)
        prompt = out / "user_codes.npy"
        write_npy(prompt, codes, root=out)
        user_from = "the app's user codes"
    elif model.n_user:
        if not req.prompt:
            raise XBackendError(f"Trace {app.path} has no user codes (its log did not record them)",
                                fix="pass --prompt with the audio or codes file the app was given")
        prompt, user_from = Path(req.prompt), f"--prompt {req.prompt}"
    else:
        prompt, user_from = None, "none (the model takes no user audio)"
    forced_dir = out / "forced"
    creq = CaptureRequest(backend=req.backend, model=req.model, model_config=req.model_config,
                          prompt=str(prompt) if prompt else None, seed=text_seed if text_seed < 2**63 else 0,
                          steps=steps, sampler=f"forced:{app.path}", settings=settings, compile=req.compile)
    tokens, _ = forced_plan(str(app.path), model, steps)
    fill = CandleStreams(text_seed, audio_seed, settings, dep_q=model.dep_q, pad_token=pad_token, pad_mult=pad_mult)
    sampler = Sampler("forced", creq.seed, settings, forced_tokens=tokens, forced_from=str(app.path), fill=fill)
    forced = capture(creq, forced_dir, progress=progress, sampler=sampler)
    result = check_decisions(app, forced, settings, text_seed, audio_seed, pad_mult, pad_token, rep, steps)
    delays = app.meta.get("delays")
    notes = list((app.meta.get("imported") or {}).get("notes") or [])
    if delays is not None and list(delays) != list(model.delays):
        notes.append(f"acoustic delays differ: the app's {list(delays)} vs model {model.name}'s {model.delays}: "
                     "a semantic difference that changes what every delayed codebook sees")
    result.update(
        schema=SCHEMA, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in ["xbackend", *sys.argv[1:]]) if sys.argv else None,
        trace=str(app.path), backend=req.backend, model=model.name, model_digest=model.digest,
        forced_trace=str(forced_dir), user_codes=user_from,
        app={"format": (app.meta.get("imported") or {}).get("format"), "source": (app.meta.get("imported") or {}).get("source"),
             "text_seed": text_seed, "audio_seed": audio_seed, "settings": settings.__dict__, "pad_mult": pad_mult,
             "repetition_penalty": list(rep) if rep else None, "delays": delays,
             "transcript": (app.meta.get("imported") or {}).get("transcript")},
        env=forced.meta.get("env"), notes=notes)
    result["explanation"] = explain(result)
    write_json(out / "replay.json", result)
    write_text(out / "report.md", report_md(result), root=out)
    return result


def check_decisions(app: Trace, forced: Trace, settings: SamplingSettings, text_seed: int, audio_seed: int,
                    pad_mult: float | None, pad_token: int, rep: tuple | None, steps: int) -> dict:
    """Candle's decision on every (step, stream) of the forced run against the app's token."""
    dep_q = len(app.streams) - 1
    rust = app.meta.get("rust") or {}
    text = CandleSampler(text_seed, settings.top_k_text, settings.temp_text, pad_mult, pad_token)
    audio = CandleSampler(audio_seed, settings.top_k_audio, settings.temp_audio)
    skip = {pad_token, int(rust.get("text_eop_token", 0)), int(rust.get("text_start_token", app.vocab["text"]))}
    logits = {s: forced.logits(s) for s in app.streams}
    tokens = app.tokens
    model_delays = [int(x) for x in (forced.meta.get("delays") or [0] * len(app.streams))]
    # moshi-core feeds the pad token to depformer slices 2.. before its acoustic delay; only a log known
    # to come from moshi-core (a session, MIMI_VERBOSE) is held to that
    moshi_core = (app.meta.get("imported") or {}).get("format") in ("session", "verbose")
    rust_delay = int(rust.get("acoustic_delay", 0)) if moshi_core else 0
    found, fragile = [], []
    checked = unknown = incomparable = 0
    first_step = None
    filled: list[tuple[int, int]] = []  # (step, stream index) of app tokens the log does not hold
    for step in range(min(steps, forced.steps)):
        for k, stream in enumerate(app.streams):
            want = int(tokens[step, k])
            row = np.asarray(logits[stream][step])
            if k == 0 and rep is not None:
                row = repetition_penalty(row, forced.tokens[:step, 0], int(rep[0]), float(rep[1]), skip)
            sampler, index = text if k == 0 else audio, rng_word_index(step, k, dep_q)
            if want < 0:  # the forced run took candle's pick here: what a consistent app sampled
                unknown += 1
                filled.append((step, k))
                continue
            if k >= 3 and step < rust_delay:
                incomparable += 1
                continue
            d = sampler.decide(row, index)
            checked += 1
            if d.token == want:
                if d.fragile:
                    fragile.append({"step": step, "stream": stream, **d.to_dict()})
                continue
            if first_step is None:
                first_step = step
            if len(found) < MAX_LISTED:
                prs = sampler.probabilities(row)
                top = select_nth_unstable_desc(prs, sampler.top_k)[:sampler.top_k] if sampler.top_k < prs.size \
                    else np.arange(prs.size)
                found.append({"step": step, "stream": stream, "app_token": want, "candle_token": d.token,
                              "margin": _num(d.margin), "margin_ulps": _num(d.margin_ulps),
                              "logit_margin": _num(d.logit_margin), "draw": d.draw, "rng_index": index,
                              "app_token_rank": int((prs > prs[want]).sum()) + 1,
                              "app_token_probability": float(prs[want]),
                              "app_token_in_top_k": bool(np.isin(want, top)),
                              "candle_token_probability": d.probability})
            else:
                found.append(None)
    inconsistencies = [f for f in found if f is not None]
    first = inconsistencies[0] if inconsistencies else None
    last = min(steps, forced.steps) - 1
    if first is not None:  # filled tokens the decision depends on: earlier slices of its step, or read by the model since
        fs, fk = first["step"], app.streams.index(first["stream"])
        used = [(s_, k_) for s_, k_ in filled if (s_ == fs and k_ < fk) or (s_ < fs and s_ >= model_delays[k_])]
        if used:
            first["context_filled"] = {"step": used[0][0], "stream": app.streams[used[0][1]], "count": len(used)}
    if first is None:
        verdict = "CONSISTENT"
    elif first["margin_ulps"] is not None and first["margin_ulps"] <= FRAGILE_ULPS:
        verdict = "WITHIN_ROUNDING"
    else:
        verdict = "LOGITS_DIFFER"
    return {"verdict": verdict, "first_inconsistency": first,
            "consistent_through": first_step - 1 if first_step is not None else last,
            "unknown_filled": [{"step": s_, "stream": app.streams[k_]} for s_, k_ in filled[:MAX_LISTED]],
            "steps": min(steps, forced.steps), "decisions_checked": checked, "decisions_unknown": unknown,
            "decisions_not_comparable": incomparable,
            "skipped_rule": ("an app token the log does not hold is not checked: the forced run takes candle's pick "
                             "on its logits there (what a consistent app sampled), so later decisions are checked "
                             "under that assumption; nor are audio2.. of a moshi-core log before its acoustic delay, "
                             "where moshi-core feeds the pad token to the next depformer slice (ForcedAudioTokens) "
                             "and moshi's Python LMGen does not"),
            "inconsistencies": len(found), "inconsistencies_listed": inconsistencies,
            "fragile_decisions": fragile[:MAX_LISTED], "fragile_count": len(fragile),
            "fragile_rule": f"a consistent decision whose draw lies within {FRAGILE_ULPS:g} float32 ulps of a boundary"}


def _num(x: float):
    return x if x is not None and math.isfinite(x) else None


def explain(r: dict) -> str:
    f = r["first_inconsistency"]
    who = f"{r['backend']} ({r['model']})"
    if f is None:
        return (f"Every known token of the app ({count(r['decisions_checked'], 'decision')} over "
                f"{count(r['steps'], 'step')}) is what "
                f"candle's sampler picks on {who}'s logits with the app's seeds ({r['app']['text_seed']} text, "
                f"{r['app']['audio_seed']} audio) and settings: consistent through step {r['consistent_through']}. "
                "The app's differences from other runs come from its seed or settings, not from its logits.")
    where = f"step {f['step']}, {f['stream']}"
    head = (f"At {where} the app took token {f['app_token']} (rank {f['app_token_rank']}, p={f['app_token_probability']:.3g} "
            f"on {who}'s logits{'' if f['app_token_in_top_k'] else ', outside the top-k'}) where candle's sampler, "
            f"with the same RNG word, picks {f['candle_token']}; the draw lies {f['margin']:.3g} "
            f"({f['margin_ulps']:.3g} float32 ulps) from the nearest boundary. ")
    if f.get("context_filled"):
        c = f["context_filled"]
        head += (f"Its context holds app tokens the log does not have, filled with candle's pick (the first: "
                 f"step {c['step']}, {c['stream']}); if the app took another token there, the difference began there. ")
    if r["verdict"] == "WITHIN_ROUNDING":
        return head + ("That is within the softmax's rounding: another libm's expf or a GPU softmax can flip it, "
                       "so this alone is no evidence that the app's logits differed.")
    tail = ("The app's logits differed from this backend's there: numerics on the app's device, "
            "or a semantic difference")
    delays = r["app"].get("delays")
    notes = " ".join(n for n in r.get("notes", []) if n.startswith("acoustic delays differ"))
    return head + tail + (f" ({notes})." if notes else f" (e.g. the acoustic delay; the app's delays are {delays}).")


def report_md(r: dict) -> str:
    f = r["first_inconsistency"]
    where = "none" if f is None else f"step {f['step']}, {f['stream']}"
    lines = [f"# xbackend replay: {r['verdict']}", "", r["explanation"], "",
             "| figure | value |", "| --- | --- |",
             f"| app run | {r['app']['format']}: `{r['app']['source']}` |",
             f"| replayed on | `{r['backend']}`, model `{r['model']}` ({r['model_digest']}) |",
             f"| seeds | text {r['app']['text_seed']}, audio {r['app']['audio_seed']} |",
             f"| settings | {plain(r['app']['settings'])}, pad_mult {plain(r['app']['pad_mult'])}, "
             f"repetition penalty {plain(r['app']['repetition_penalty'])} |",
             f"| user codes | {r['user_codes']} |",
             f"| steps | {r['steps']} ({r['decisions_checked']} decisions checked; not checked: {r['decisions_unknown']} "
             f"app tokens the log does not hold (filled with candle's pick), "
             f"{r['decisions_not_comparable']} before the app's acoustic delay) |",
             f"| first inconsistency | {where} |",
             f"| consistent through step | {r['consistent_through']} |",
             f"| inconsistent decisions | {r['inconsistencies']} |",
             f"| consistent decisions within {FRAGILE_ULPS:g} ulps of a boundary | {r['fragile_count']} |", ""]
    if r["inconsistencies_listed"]:
        lines += ["## Inconsistent decisions (first 20)", "",
                  "| step | stream | app token | candle's pick | margin | ulps | app token rank | p(app token) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in r["inconsistencies_listed"]:
            lines.append(f"| {x['step']} | {x['stream']} | {x['app_token']} | {x['candle_token']} | {x['margin']:.3g} | "
                         f"{x['margin_ulps']:.3g} | {x['app_token_rank']} | {x['app_token_probability']:.3g} |")
        lines.append("")
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    summary = (f"Replaying candle's TopK sampler (bit-exact: StdRng ChaCha12, WeightedIndex over Rust's "
               f"select_nth_unstable order) with the app's seeds on `{r['backend']}` logits, teacher-forced on the "
               f"app's tokens: {r['verdict']}. " + r["explanation"])
    lines += ["## Summary for an upstream issue", "", "```", summary, "```", "",
              "## Reproduce", "", "```", r.get("command") or f"xbackend replay {r['trace']} --backend {r['backend']}",
              "```", "", "<details><summary>Environment</summary>", "", "```",
              "\n".join(f"{k}: {v}" for k, v in (r.get("env") or {}).items()), "```", "</details>", ""]
    return "\n".join(lines)
