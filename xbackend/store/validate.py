"""Checks of what a user asks for, run by the CLI and the public API before any worker starts.

A bad number must be the user's error (exit 2, saying what was given and what is allowed), never a
backend failure found minutes later inside a worker. Each rule lives here once.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields

from ..env import COMPILE_CHOICES
from ..errors import XBackendError

MAX_STEPS = 100_000  # 80 ms each: 2 h 13 min, far beyond Moshi's 3000-step context; bounds prompt padding memory
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_REPEATS = 100
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def integer(name: str, value, lo: int, hi: int, why: str = "") -> int:
    """`value` as an int in [lo, hi], else a one-line error naming the option, the value and the range."""
    if not _is_int(value) or not lo <= value <= hi:
        raise XBackendError(f"{name} must be an integer from {lo} to {hi}{why}, got {value!r}",
                            fix=f"pass {name} {min(max(lo, 1), hi)} or another value in range")
    return value


def number(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """A finite float in [lo, hi] (or (lo, hi] with `lo_open`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise XBackendError(f"{name} must be a finite number in {interval}, got {value!r}",
                            fix=f"pass {name} with a value in {interval}")
    return float(value)


def steps(value) -> int:
    return integer("--steps", value, 1, MAX_STEPS, f" (80 ms each; {MAX_STEPS} steps is "
                   f"{MAX_STEPS * 0.08 / 3600:.1f} hours, beyond what a trace or the prompt padding should take)")


def seed(value) -> int:
    return integer("--seed", value, 0, MAX_SEED)


def timeout(value) -> float:
    return number("--timeout", value, 1.0, MAX_TIMEOUT)


def compile_choice(value) -> str:
    """--compile: auto, on or off; `on` cannot keep a promise NO_TORCH_COMPILE already broke (moshi reads it at import)."""
    if value not in COMPILE_CHOICES:
        raise XBackendError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {value!r}",
                            fix="pass --compile auto (what the library does as it ships), on or off")
    if value == "on" and os.environ.get("NO_TORCH_COMPILE"):
        raise XBackendError("--compile on, but NO_TORCH_COMPILE is set: moshi leaves its functions uncompiled",
                            asked=f"NO_TORCH_COMPILE={os.environ['NO_TORCH_COMPILE']!r}",
                            fix="unset NO_TORCH_COMPILE, or pass --compile auto (which respects it) or off")
    return value


def repeats(value, name: str = "--repeats", lo: int = 1) -> int:
    return integer(name, value, lo, MAX_REPEATS)


def output_file(path, flag: str) -> None:
    """A file a command will write at the end: its folder must exist now, so hours of work are not lost to a typo."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise XBackendError(f"{flag} {path} is a directory", fix=f"pass a file path to {flag}")
    if not path.parent.is_dir():
        raise XBackendError(f"{flag} {path}: folder {path.parent} does not exist",
                            fix="create the folder first, or pass a path in an existing one")


def disk_space(out, needed: int, what: str) -> None:
    """Refuse a run whose traces cannot fit on the disk of `out` (found now, not after hours of work)."""
    import shutil
    from pathlib import Path

    where = Path(out).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return
    free = usage.free
    if usage.total == 0:  # a pseudo file system (/proc): writing there fails on its own, with its own message
        return
    if needed > free:
        raise XBackendError(f"{what} need about {needed / 1e9:.1f} GB, but {where} has {free / 1e9:.1f} GB free",
                            fix="pass fewer --steps (or --repeats), or an --out on a larger disk")


def settings(value) -> None:
    """Temperatures finite and non-negative (0 is greedy); top-k from 0 (no cut) up to 2**20 (a top-k wider
    than the vocabulary is no cut, for upstream's samplers as for xbackend's)."""
    from ..samplers import SamplingSettings

    if not isinstance(value, SamplingSettings):
        raise XBackendError(f"Sampling settings must be a SamplingSettings, got {type(value).__name__}")
    for f in fields(value):
        x = getattr(value, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name.startswith("top_k"):
            integer(flag, x, 0, 1 << 20, " (0: no top-k cut)")
        elif f.name.startswith("temp"):
            number(flag, x, 0.0, MAX_TEMPERATURE)
        elif x is not None and isinstance(x, (int, float)) and not isinstance(x, bool):
            number(flag, x, 0.0, MAX_TEMPERATURE)


# --------------------------------------------------------------------------- report.json (untrusted)


class _Shape:
    """Checks a JSON value against what `report` reads from it; the first mismatch names its place."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, value, want: str):
        shown = repr(value)
        raise XBackendError(f"{self.source}: {where} is {shown[:60]}{'...' if len(shown) > 60 else ''}, expected {want}",
                            fix="regenerate the run directory with `xbackend compare`")

    def obj(self, where: str, x, none: bool = False) -> bool:
        if x is None and none:
            return False
        if not isinstance(x, dict):
            self.fail(where, x, "an object")
        return True

    def lst(self, where: str, x, none: bool = False) -> list:
        if x is None and none:
            return []
        if not isinstance(x, list):
            self.fail(where, x, "a list")
        return x

    def text(self, where: str, x, none: bool = True) -> None:
        if not (isinstance(x, str) or (none and x is None)):
            self.fail(where, x, "a string")

    def num(self, where: str, x) -> None:
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            self.fail(where, x, "a number or null")

    def int(self, where: str, x, none: bool = True) -> None:
        if x is None and none:
            return
        if not _is_int(x) or x < 0 or x > 2**40:
            self.fail(where, x, "a non-negative integer")

    def boolean(self, where: str, x) -> None:
        if x is not None and not isinstance(x, bool):
            self.fail(where, x, "true, false or null")

    def place(self, where: str, x) -> None:
        if self.obj(where, x, none=True):
            self.int(f"{where}.step", x.get("step"), none=False)
            if "stream" not in x:
                self.fail(where, x, "an object with step and stream")
            self.text(f"{where}.stream", x.get("stream"))


def report_json(source: str, report) -> dict:
    """Every field of a run directory's report.json that `report` and `check` read, type-checked."""
    s = _Shape(source)
    s.obj("report.json", report)
    names = []
    for i, b in enumerate(s.lst("backends", report.get("backends"))):
        s.obj(f"backends[{i}]", b)
        s.text(f"backends[{i}].name", b.get("name"), none=False)
        if b.get("status") not in ("ok", "failed", "unavailable"):
            s.fail(f"backends[{i}].status", b.get("status"), "ok, failed or unavailable")
        s.text(f"backends[{i}].error", b.get("error"))
        s.obj(f"backends[{i}].env", b.get("env"), none=True)
        names.append(b["name"])
    if not names:
        s.fail("backends", report.get("backends"), "at least one backend")
    if report.get("reference") not in names:
        s.fail("reference", report.get("reference"), f"one of the backends ({', '.join(map(str, names))})")
    for i, v in enumerate(s.lst("verdicts", report.get("verdicts"), none=True)):
        s.obj(f"verdicts[{i}]", v)
        for key in ("backend", "vs", "verdict"):
            s.text(f"verdicts[{i}].{key}", v.get(key), none=False)
        s.text(f"verdicts[{i}].explanation", v.get("explanation"))
        s.place(f"verdicts[{i}].first_divergence", v.get("first_divergence"))
        if s.obj(f"verdicts[{i}].figures", v.get("figures"), none=True):
            f = v["figures"]
            for key in ("forced_max_abs", "tolerance", "delta_at_divergence", "margin_at_divergence"):
                s.num(f"verdicts[{i}].figures.{key}", f.get(key))
            for key in ("portable_divergence", "native_divergence", "onset"):
                s.place(f"verdicts[{i}].figures.{key}", f.get(key))
            for j, spike in enumerate(s.lst(f"verdicts[{i}].figures.spikes", f.get("spikes"), none=True)):
                s.obj(f"verdicts[{i}].figures.spikes[{j}]", spike)
                s.place(f"verdicts[{i}].figures.spikes[{j}]", spike)
            s.boolean(f"verdicts[{i}].figures.within_tolerance", f.get("within_tolerance"))
        for j, sec in enumerate(s.lst(f"verdicts[{i}].secondary", v.get("secondary"), none=True)):
            s.obj(f"verdicts[{i}].secondary[{j}]", sec)
            s.text(f"verdicts[{i}].secondary[{j}].verdict", sec.get("verdict"), none=False)
    if s.obj("locate", report.get("locate"), none=True):
        for label, entry in report["locate"].items():
            s.obj(f"locate.{label}", entry)
            s.text(f"locate.{label}.sentence", entry.get("sentence"))
            s.text(f"locate.{label}.error", entry.get("error"))
    if s.obj("context", report.get("context"), none=True):
        c = report["context"]
        for key in ("length", "steps", "steps_to_cross"):
            s.int(f"context.{key}", c.get(key))
        s.boolean("context.crossed", c.get("crossed"))
        s.text("context.note", c.get("note"))
    req = report.get("request")
    s.obj("request", req)
    s.lst("request.backends", req.get("backends"))
    for i, b in enumerate(req["backends"]):
        s.text(f"request.backends[{i}]", b, none=False)
    for key in ("model", "alignment"):
        s.text(f"request.{key}", req.get(key), none=False)
    for key in ("arbiter", "codec", "sampler"):
        s.text(f"request.{key}", req.get(key))
    for key in ("model_digest", "model_config", "compile"):
        s.text(f"request.{key}", req.get(key))
    for key in ("seed", "steps", "repeats"):
        s.int(f"request.{key}", req.get(key), none=False)
    if s.obj("request.settings", req.get("settings"), none=True):
        for key, value in req["settings"].items():
            s.num(f"request.settings.{key}", value)
    for i, p in enumerate(s.lst("request.plugins", req.get("plugins"), none=True)):
        s.text(f"request.plugins[{i}]", p, none=False)
    if s.obj("request.prompt", req.get("prompt"), none=True):
        s.text("request.prompt.source", req["prompt"].get("source"))
        s.text("request.prompt.digest", req["prompt"].get("digest"))
    for i, r in enumerate(s.lst("repeatability", report.get("repeatability"), none=True)):
        s.obj(f"repeatability[{i}]", r)
        s.text(f"repeatability[{i}].backend", r.get("backend"), none=False)
        s.int(f"repeatability[{i}].runs", r.get("runs"), none=False)
        s.num(f"repeatability[{i}].run_to_run_drift", r.get("run_to_run_drift"))
        for key in ("first_logits_difference", "first_token_difference"):
            s.place(f"repeatability[{i}].{key}", r.get(key))
    if s.obj("arbiter", report.get("arbiter"), none=True):
        a = report["arbiter"]
        for key in ("spec", "status", "error", "trace"):
            s.text(f"arbiter.{key}", a.get(key))
        for j, d in enumerate(s.lst("arbiter.backends", a.get("backends"), none=True)):
            s.obj(f"arbiter.backends[{j}]", d)
            s.text(f"arbiter.backends[{j}].backend", d.get("backend"), none=False)
            for key in ("max_abs", "median_abs"):
                s.num(f"arbiter.backends[{j}].{key}", d.get(key))
            s.int(f"arbiter.backends[{j}].steps", d.get("steps"))
    if s.obj("reference_repeatability", report.get("reference_repeatability"), none=True):
        r = report["reference_repeatability"]
        s.int("reference_repeatability.runs", r.get("runs"))
        s.boolean("reference_repeatability.logits_identical", r.get("logits_identical"))
        s.boolean("reference_repeatability.tokens_identical", r.get("tokens_identical"))
        s.int("reference_repeatability.first_nondeterministic_step", r.get("first_nondeterministic_step"))
    for i, d in enumerate(s.lst("drift", report.get("drift"), none=True)):
        s.obj(f"drift[{i}]", d)
        s.text(f"drift[{i}].backend", d.get("backend"), none=False)
        s.text(f"drift[{i}].mode", d.get("mode"), none=False)
        if s.obj(f"drift[{i}].streams", d.get("streams"), none=True):
            for stream, stats in d["streams"].items():
                s.obj(f"drift[{i}].streams.{stream}", stats)
                for name in ("max_abs", "kl"):
                    if s.obj(f"drift[{i}].streams.{stream}.{name}", stats.get(name), none=True):
                        for key, value in stats[name].items():
                            s.num(f"drift[{i}].streams.{stream}.{name}.{key}", value)
    for i, f in enumerate(s.lst("failures", report.get("failures"), none=True)):
        s.obj(f"failures[{i}]", f)
        s.text(f"failures[{i}].run", f.get("run"), none=False)
        s.text(f"failures[{i}].status", f.get("status"), none=False)
        s.text(f"failures[{i}].error", f.get("error"))
        s.place(f"failures[{i}].failed_at", f.get("failed_at"))
        s.int(f"failures[{i}].steps", f.get("steps"))
    if s.obj("traces", report.get("traces"), none=True):
        for label, rel in report["traces"].items():
            s.text(f"traces.{label}", rel, none=False)
    for key in ("created", "command"):
        s.text(key, report.get(key))
    return report


def baseline_json(source: str, baseline, setting_names: tuple[str, ...]) -> dict:
    """Every field of baseline.json that `check` reads, type-checked (paths are checked where joined)."""
    s = _Shape(source)
    s.obj("baseline.json", baseline)
    backends = s.lst("backends", baseline.get("backends"))
    if not backends or not all(isinstance(b, str) and b for b in backends):
        s.fail("backends", backends, "a non-empty list of backend specs")
    if baseline.get("reference") not in backends:
        s.fail("reference", baseline.get("reference"), "one of the backends")
    model = baseline.get("model")
    s.obj("model", model)
    s.text("model.name", model.get("name"), none=False)
    s.text("model.digest", model.get("digest"), none=False)
    prompt = baseline.get("prompt")
    s.obj("prompt", prompt)
    s.text("prompt.file", prompt.get("file"), none=False)
    s.text("prompt.digest", prompt.get("digest"))
    s.int("prompt.frames", prompt.get("frames"))
    for key in ("seed", "steps", "repeats"):
        s.int(key, baseline.get(key), none=False)
    s.text("alignment", baseline.get("alignment"), none=False)
    settings = baseline.get("settings")
    s.obj("settings", settings)
    for key, value in settings.items():
        if key not in setting_names:
            s.fail(f"settings.{key}", value, f"one of the settings {', '.join(setting_names)}")
        s.num(f"settings.{key}", value)
    expected = baseline.get("expected")
    s.obj("expected", expected)
    for i, v in enumerate(s.lst("expected.verdicts", expected.get("verdicts"))):
        s.obj(f"expected.verdicts[{i}]", v)
        for key in ("backend", "vs", "verdict"):
            s.text(f"expected.verdicts[{i}].{key}", v.get(key), none=False)
        s.place(f"expected.verdicts[{i}].first_divergence", v.get("first_divergence"))
    for i, r in enumerate(s.lst("expected.repeatability", expected.get("repeatability"))):
        s.obj(f"expected.repeatability[{i}]", r)
        s.text(f"expected.repeatability[{i}].backend", r.get("backend"), none=False)
        for key in ("logits_identical", "tokens_identical"):  # null: one run, nothing to compare
            s.boolean(f"expected.repeatability[{i}].{key}", r.get(key))
    traces = baseline.get("traces")
    s.obj("traces", traces)
    if not traces:
        s.fail("traces", traces, "one entry per backend")
    for label, t in traces.items():
        s.obj(f"traces.{label}", t)
        s.text(f"traces.{label}.dir", t.get("dir"), none=False)
        s.text(f"traces.{label}.tier", t.get("tier"), none=False)
        runs = s.lst(f"traces.{label}.runs", t.get("runs"))
        if "portable" not in runs or not all(isinstance(r, str) and r for r in runs):
            s.fail(f"traces.{label}.runs", runs, "a list of run names including portable")
    return baseline
