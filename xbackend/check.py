"""`check` and `baseline create`: the pre-release gate.

A baseline directory holds `baseline.json` (what was run, on which model and prompt, and the
verdicts it gave) and the traces a later run is held to: every backend's `native-0` and
`portable` runs, and the `forced` runs of the non-reference backends, plus the exact prompt
codes. `check` runs the same backends again with the same settings and compares, per backend:

| check | passes when |
| --- | --- |
| `logits` | every committed run, fresh against committed, has max abs Δlogit <= the tier's tolerance over the steps where both saw the same inputs (up to and including the first token difference's stream) |
| `tokens` | the portable run samples exactly the baseline's tokens (the portable sampler depends only on the logits and on (seed, step, stream)) |
| `verdict` | a non-reference backend gets the verdict it got in the baseline |
| `repeatability` | a backend that was bitwise repeatable in the baseline still is (skipped where it was not) |

The tolerances (`tolerances.CHECK_TOLERANCES`) bound a backend against *its own* baseline on the
same kind of machine, so they are far tighter than the cross-backend ones (`tolerances.py` says why).
A TOML file overrides them: `[tolerances]` then `fp32 = 1e-5` ... (tiers only).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from .analysis import metrics
from .store import validate
from .advisories import LOGITS, NONDETERMINISM, advise, explaining, sentence, verdict_effects
from .compare import CompareRequest, EventFn, run_compare
from .errors import BackendFailed, XBackendError
from .report.markdown import md_table
from .results import CompareReport, Point, Repeatability, Verdict, count, exit_code, where
from .store.rundir import FORCED, NATIVE_0, PORTABLE, PROMPT_CODES, TRACES, RunDir, load_partial, safe_name, unique_labels
from .samplers import SamplingSettings
from .tolerances import CHECK_TOLERANCES, TOLERANCES_EXAMPLE, tier_of, tolerance_table
from .store.claim import claim, inside, overlaps, read_json
from .store.files import clean, write_file, write_json
from .store.trace import Trace, load_trace

BASELINE_SCHEMA = "xbackend.baseline/1"
CHECK_SCHEMA = "xbackend.check/1"
BASELINE_JSON = "baseline.json"

__all__ = ["CHECK_TOLERANCES", "load_tolerances", "create_baseline", "run_check", "junit_xml", "CheckReport"]


# --------------------------------------------------------------------------- baselines



def load_tolerances(path: str | Path, defaults: dict[str, float] = CHECK_TOLERANCES) -> dict[str, float]:
    """`defaults` with the `[tolerances]` table of a TOML file on top (read by the one loader of untrusted files)."""
    from .store.files import load_toml

    data = load_toml(path, "Tolerances file", f"pass a TOML file to --tolerances: {TOLERANCES_EXAMPLE}")
    return tolerance_table(data, Path(path), defaults)


def baseline_runs(label: str, reference: str) -> tuple[str, ...]:
    """The runs a baseline keeps for one backend."""
    return (NATIVE_0, PORTABLE) if label == reference else (NATIVE_0, PORTABLE, FORCED)


def create_baseline(req: CompareRequest, out: str | Path, on_event: EventFn | None = None, *,
                    force: bool = False) -> dict:
    """Run `compare` and keep, in `out`, baseline.json, the prompt codes and the traces `check` needs.

    Only what an earlier baseline in `out` listed is replaced; nothing else there is deleted."""
    out = Path(out)
    req = replace(req, decode_audio=False, arbiter="none")  # a baseline keeps what check holds runs to
    with claim(out, "baseline", force=force):
        previous = _previous_traces(out)
        with kept_on_failure("xbackend-baseline-") as tmp:
            report = run_compare(req, tmp, on_event)
            bad = [b for b in report.backends if b["status"] != "ok"]
            if bad:
                raise BackendFailed(f"Cannot make a baseline: backend {bad[0]['name']} is {bad[0]['status']} "
                                    f"({bad[0]['error']})", asked=f"that run directory is kept in {tmp}",
                                    fix="make the baseline from backends that run on this machine")
            traces = {}
            ref = report.reference
            targets = [(Path(TRACES) / safe_name(b["name"]) / run, b["name"])
                       for b in report.backends for run in baseline_runs(b["name"], ref)]
            for rel, _ in targets:  # refuse before changing anything
                if (out / rel).exists() and rel.as_posix() not in previous:
                    raise XBackendError(f"Baseline trace {out / rel} exists and was not written by an earlier baseline "
                                        "there", fix="choose a new --out directory, or move that folder away")
            for rel, label in targets:
                if rel.as_posix() in previous:
                    shutil.rmtree(out / rel)  # a trace an earlier baseline here wrote: replaced by its new run
                shutil.copytree(Path(tmp) / report.traces[label] / rel.name, out / rel, symlinks=True)
            write_file(out / PROMPT_CODES, (Path(tmp) / PROMPT_CODES).read_bytes())
            for b in report.backends:
                rel = Path(TRACES) / safe_name(b["name"])
                traces[b["name"]] = {"dir": rel.as_posix(), "runs": list(baseline_runs(b["name"], ref)),
                                     "tier": tier_of(load_trace(out / rel / NATIVE_0, verify=False))}
        return _write_baseline(req, report, traces, out)


KEEP = ".keep"


@contextmanager
def kept_on_failure(prefix: str):
    """A temporary run directory, deleted when the block succeeds, kept when it raised or marked itself
    `KEEP` (so that the paths its messages name still exist); an empty one is always deleted."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    except (KeyboardInterrupt, SystemExit):  # the user stopped it: nothing of it is worth keeping
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        if not any(tmp.iterdir()):
            tmp.rmdir()
        raise
    if (tmp / KEEP).exists():
        (tmp / KEEP).unlink()
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _previous_traces(out: Path) -> set[str]:
    """Trace folders (relative) an earlier baseline.json in `out` lists: the only ones a new baseline replaces."""
    try:
        old = load_baseline(out)
    except XBackendError:
        return set()
    return {f"{t['dir']}/{run}" for t in old["traces"].values() for run in t["runs"]}


def _write_baseline(req: CompareRequest, report: CompareReport, traces: dict, out: Path) -> dict:
    from .env import __version__

    r = report.request
    baseline = {
        "schema": BASELINE_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "xbackend_version": __version__,
        "backends": list(req.backends),
        "reference": report.reference,
        "model": {"name": r["model"], "digest": r["model_digest"]},
        "prompt": {"file": PROMPT_CODES, "digest": r["prompt"]["digest"], "source": r["prompt"]["source"],
                   "frames": r["prompt"]["frames"]},
        "seed": req.seed, "steps": req.steps, "repeats": req.repeats, "alignment": req.alignment,
        "settings": req.settings.to_dict(), "plugins": [str(p) for p in req.plugins], "compile": req.compile,
        "expected": {
            "verdicts": [{"backend": v.backend, "vs": v.vs, "verdict": v.verdict,
                          "first_divergence": None if v.first_divergence is None else v.first_divergence.to_dict(),
                          "forced_max_abs": v.figures.get("forced_max_abs")} for v in report.verdicts],
            "repeatability": [{"backend": x.backend, "logits_identical": x.logits_identical,
                               "tokens_identical": x.tokens_identical} for x in report.repeatability],
        },
        "traces": traces,
        "env": {b["name"]: b["env"] for b in report.backends},
    }
    write_json(out / BASELINE_JSON, baseline)
    return baseline


def load_baseline(path: str | Path) -> dict:
    """Read and check a baseline directory (it may come from anyone's repository: trust no field)."""
    path = Path(path)
    file = path / BASELINE_JSON
    if not file.is_file():
        raise XBackendError(f"No {BASELINE_JSON} in {path}",
                            fix="make one with `xbackend baseline create --backends cpu,mlx:cpu --out DIR`")
    baseline = read_json(file, "baseline", fix="recreate it with `xbackend baseline create`")
    if not isinstance(baseline, dict) or baseline.get("schema") != BASELINE_SCHEMA:
        schema = baseline.get("schema") if isinstance(baseline, dict) else None
        raise XBackendError(f"{file} has schema {schema!r}, expected {BASELINE_SCHEMA!r}",
                            fix="recreate it with `xbackend baseline create`")
    validate.baseline_json(str(file), baseline, tuple(f.name for f in fields(SamplingSettings)))
    labels = unique_labels(baseline["backends"])
    for label in baseline["traces"]:
        if label not in labels:
            raise XBackendError(f"{file}: traces.{clean(label)[:60]!r} is not one of the baseline's backends "
                                f"({', '.join(labels)})", fix="recreate it with `xbackend baseline create`")
    for label, t in baseline["traces"].items():
        for run in t["runs"]:
            where = inside(path, f"{t['dir']}/{run}", f"baseline.json's trace path of {label}")
            if not (where / "meta.json").is_file():
                raise XBackendError(f"Baseline {path} lacks the {run} trace of {label} ({where})",
                                    fix="commit the whole baseline directory, or recreate it")
    prompt = inside(path, baseline["prompt"]["file"], "baseline.json's prompt file")
    if not prompt.is_file():
        raise XBackendError(f"Baseline {path} lacks its prompt codes {baseline['prompt']['file']}",
                            fix="commit the whole baseline directory, or recreate it")
    return baseline


def _recreate_hint(baseline: dict, out: Path) -> str:
    return (f"recreate the baseline with `xbackend baseline create --backends {','.join(baseline['backends'])} "
            f"--steps {baseline['steps']} --seed {baseline['seed']} --out {out}`, or check against a baseline "
            "made with what you ask for")


def request_from_baseline(baseline: dict, path: Path, *, model: str | None, seed: int | None, steps: int | None,
                  plugins: tuple[str, ...], timeout: float) -> CompareRequest:
    """The `compare` request that repeats the baseline; a model or setting that differs is bad input."""
    from .capture.models import resolve_model

    named = baseline["model"]["name"]
    if model is None and named != "tiny":  # a path or hf:// name from an untrusted file is never loaded
        raise XBackendError(f"Baseline {path} names its model {clean(named)[:120]!r}; xbackend loads or downloads "
                            "no model a baseline names, only the bundled tiny one",
                            fix=f"pass --model with that checkpoint (its digest must be {baseline['model']['digest']})")
    want = resolve_model(model or named)
    if want.digest != baseline["model"]["digest"]:
        raise XBackendError(
            f"Baseline {path} was made with model {baseline['model']['name']!r} (digest {baseline['model']['digest']}), "
            f"but model {model or baseline['model']['name']!r} has digest {want.digest}",
            fix=_recreate_hint(baseline, path))
    for name, asked in (("seed", seed), ("steps", steps)):
        if asked is not None and asked != baseline[name]:
            raise XBackendError(f"Baseline {path} was made with --{name} {baseline[name]}, not {asked}",
                                fix=f"drop --{name}, or {_recreate_hint(baseline, path)}")
    return CompareRequest(backends=tuple(baseline["backends"]), model=model or baseline["model"]["name"],
                          prompt=str(inside(path, baseline["prompt"]["file"], "baseline.json's prompt file")),
                          seed=baseline["seed"],
                          steps=baseline["steps"], repeats=baseline["repeats"], timeout=timeout,
                          alignment=baseline["alignment"], settings=SamplingSettings.from_dict(baseline["settings"]),
                          plugins=plugins, decode_audio=False, arbiter="none",
                          prompt_frames=baseline["prompt"].get("frames"))


def recorded_run(baseline: dict, base_dir: Path, run_dir: Path) -> CompareReport:
    """The report.json of a run recorded earlier (`compare`, `check --out`), once it is clear that the
    run repeats what the baseline ran: same backends, model, prompt codes, seed, steps, repeats,
    alignment and sampling settings. Checking it runs nothing, so it needs no backend installed."""
    file = run_dir / "report.json"
    if not file.is_file():
        raise XBackendError(f"No report.json in {run_dir}", asked="--run takes a run directory written by "
                            "`xbackend compare` or `xbackend check --out`", fix="pass such a directory, or drop --run")
    from .store.files import load_json

    report = load_json(file, "report.json", "pass a run directory written by `xbackend compare` or `xbackend check --out`")
    try:
        r = report["request"]
        got = {"backends": list(r["backends"]), "model digest": r["model_digest"], "prompt digest": r["prompt"]["digest"],
               "seed": r["seed"], "steps": r["steps"], "repeats": r["repeats"], "alignment": r["alignment"],
               "sampling settings": SamplingSettings.from_dict(r["settings"])}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise XBackendError(f"{file} is not a report of `xbackend compare` ({type(exc).__name__}: {clean(exc)[:120]})",
                            fix="pass a run directory written by `xbackend compare` or `xbackend check --out`") from None
    want = {"backends": list(baseline["backends"]), "model digest": baseline["model"]["digest"],
            "prompt digest": baseline["prompt"]["digest"], "seed": baseline["seed"], "steps": baseline["steps"],
            "repeats": baseline["repeats"], "alignment": baseline["alignment"],
            "sampling settings": SamplingSettings.from_dict(baseline["settings"])}
    for key, value in want.items():
        if got[key] != value:
            raise XBackendError(f"Run {run_dir} was not made like baseline {base_dir}: its {key} is {got[key]}, "
                                f"the baseline's {value}",
                                fix=f"record the run with `xbackend check --baseline {base_dir} --out DIR`, "
                                "or check without --run")
    return CompareReport.from_dict(report)


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class CheckResult:
    backend: str
    check: str
    status: str  # pass | fail | skip
    message: str
    figures: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def logits_check(label: str, tier: str, tol: float, pairs: list[tuple[str, Trace, Trace]]) -> CheckResult:
    runs = {name: metrics.same_input_drift(base, fresh) for name, base, fresh in pairs}
    worst_run = max(runs, key=lambda r: runs[r]["max_abs"])
    worst = runs[worst_run]
    figures = {"tolerance": tol, "tier": tier, "max_abs": worst["max_abs"], "run": worst_run, "runs": runs}
    if worst["max_abs"] == 0.0:
        text = f"bitwise equal to the baseline in {', '.join(runs)} (tolerance {tol:g} for {tier})"
    else:
        text = (f"max |Δlogit| {worst['max_abs']:.3g} against the baseline ({worst_run}, {where(worst['at'])}; "
                f"tolerance {tol:g} for {tier})")
    ok = worst["max_abs"] <= tol
    return CheckResult(label, "logits", "pass" if ok else "fail", f"{label}: logits: {text}", figures)


def tokens_check(label: str, base: Trace, fresh: Trace) -> CheckResult:
    n = min(base.steps, fresh.steps)
    found = metrics.first_token_divergence(base, fresh)
    figures = {"steps": n, "baseline_steps": base.steps}
    if found is None and fresh.steps >= base.steps:
        return CheckResult(label, "tokens", "pass",
                           f"{label}: tokens: portable tokens identical to the baseline's over {count(n, 'step')}", figures)
    if found is None:
        return CheckResult(label, "tokens", "fail", f"{label}: tokens: the portable run stopped at step {fresh.steps} "
                           f"of the baseline's {base.steps}", figures)
    step, stream = found
    col = base.streams.index(stream)
    delta = metrics.max_abs_at(base, fresh, step, stream)
    figures.update(first_difference={"step": step, "stream": stream}, baseline_token=int(base.tokens[step, col]),
                   token=int(fresh.tokens[step, col]), max_abs_there=delta,
                   margin_there=float(base.margins[step, col]))
    return CheckResult(label, "tokens", "fail",
                       f"{label}: tokens: portable tokens differ from the baseline's first at {where(Point(step, stream))}: "
                       f"baseline took {figures['baseline_token']}, now {figures['token']} (max |Δlogit| there "
                       f"{delta:.3g}, decision margin {figures['margin_there']:.3g})", figures)


def verdict_check(label: str, expected: dict, got: Verdict | None) -> CheckResult:
    was = Point.from_dict(expected.get("first_divergence"))
    figures = {"expected": expected["verdict"], "got": got.verdict if got else None,
               "expected_first_divergence": expected.get("first_divergence"),
               "first_divergence": got.first_divergence.to_dict() if got and got.first_divergence else None}
    ok = got is not None and got.verdict == expected["verdict"]
    text = (f"{label}: verdict: expected {expected['verdict']}{' at ' + where(was) if was else ''} against "
            f"{expected['vs']}, got {got.verdict if got else 'none'}"
            f"{' at ' + where(got.first_divergence) if got and got.first_divergence else ''}")
    return CheckResult(label, "verdict", "pass" if ok else "fail", text, figures)


def repeatability_check(label: str, expected: dict | None, got: Repeatability | None) -> CheckResult:
    if expected is None or got is None or not got.measured:
        return CheckResult(label, "repeatability", "skip", f"{label}: repeatability: fewer than 2 runs")
    if not (expected["logits_identical"] and expected["tokens_identical"]):
        return CheckResult(label, "repeatability", "skip",
                           f"{label}: repeatability: not repeatable in the baseline either; not checked")
    ok = bool(got.repeatable)
    d = got.to_dict()
    figures = {k: d[k] for k in ("logits_identical", "tokens_identical", "first_nondeterministic_step",
                                  "first_nondeterministic_stream", "run_to_run_drift")}
    text = (f"{label}: repeatability: bitwise repeatable, as in the baseline" if ok else
            f"{label}: repeatability: repeatable in the baseline, now its runs differ first at "
            f"{where(got.first_nondeterministic)} (run-to-run drift {got.drift_text()})")
    return CheckResult(label, "repeatability", "pass" if ok else "fail", text, figures)


def backend_checks(label: str, baseline: dict, base_dir: Path, report: CompareReport, run_dir: Path,
                   tolerances: dict[str, float]) -> list[CheckResult]:
    entry = next((b for b in report.backends if b["name"] == label), None)
    if entry is None:
        return [CheckResult(label, "run", "fail", f"{label}: run: the run has no backend {label}")]
    if entry["status"] != "ok":
        return [CheckResult(label, "run", "fail", f"{label}: run: {entry['status']} ({entry['error']})")]
    t = baseline["traces"][label]
    tier = t["tier"]
    if tier not in tolerances:
        raise XBackendError(f"No tolerance for tier {tier!r} of {label}", asked=f"tiers are {', '.join(tolerances)}",
                            fix=f"add `{tier} = ...` under [tolerances]")
    pairs = []
    for run in t["runs"]:
        fresh = RunDir(run_dir, report).trace(label, run)
        if fresh is None:
            return [CheckResult(label, "run", "fail", f"{label}: run: its {run} run wrote no trace")]
        pairs.append((run, load_trace(inside(base_dir, f"{t['dir']}/{run}", f"baseline trace of {label}")), fresh))
    out = [logits_check(label, tier, tolerances[tier], pairs)]
    portable = next(p for p in pairs if p[0] == PORTABLE)
    out.append(tokens_check(label, portable[1], portable[2]))
    expected = next((v for v in baseline["expected"]["verdicts"] if v["backend"] == label), None)
    if expected is not None:
        out.append(verdict_check(label, expected, report.verdict_for(label)))
    rep_expected = next((r for r in baseline["expected"]["repeatability"] if r["backend"] == label), None)
    out.append(repeatability_check(label, rep_expected, report.repeatability_for(label)))
    return out


@dataclass(frozen=True)
class CheckReport:
    """The gate's result: every (backend, check) outcome against a baseline; `to_dict()` is `xbackend.check/1`."""

    baseline: str
    run_dir: str | None
    backends: tuple[str, ...]
    model: dict
    seed: int
    steps: int
    tolerances: dict
    checks: tuple[CheckResult, ...]
    elapsed_s: float | None = None  # the whole check's wall time
    advisories: tuple[dict, ...] = ()  # known issues matching the baseline's and the fresh run's fingerprints
    context: dict | None = None  # did the checked runs cross the model's context (xbackend.analysis.context)

    @property
    def passed(self) -> bool:
        return not any(r.failed for r in self.checks)

    @property
    def expected(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        return exit_code(backend_failed=any(r.check == "run" and r.failed for r in self.checks),
                         attention=not self.passed)

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.checks) for s in ("pass", "fail", "skip")}

    @property
    def explanation(self) -> str:
        c = self.counts
        return (f"{'PASSED' if self.passed else 'FAILED'}: {c['pass']} passed, {c['fail']} failed, "
                f"{c['skip']} skipped against {self.baseline}"
                + (f"; {self.context['note']}" if self.context and self.context.get("note") else ""))

    def summary_table(self) -> str:
        """The checks as a GitHub markdown table."""
        return md_table(["backend", "check", "status", "message"],
                        [[r.backend, r.check, r.status.upper(), r.message] for r in self.checks])

    def to_dict(self) -> dict:
        return {"schema": CHECK_SCHEMA, "baseline": self.baseline, "run_dir": self.run_dir,
                "backends": list(self.backends), "model": self.model, "seed": self.seed, "steps": self.steps,
                "tolerances": self.tolerances, "passed": self.passed, "exit_code": self.exit_code,
                "counts": self.counts, "explanation": self.explanation, "checks": [asdict(r) for r in self.checks],
                "elapsed_s": self.elapsed_s, "advisories": list(self.advisories), "context": self.context}

    @staticmethod
    def from_dict(d: dict) -> CheckReport:
        if d.get("schema") != CHECK_SCHEMA:
            raise XBackendError(f"check result has schema {d.get('schema')!r}, expected {CHECK_SCHEMA!r}")
        return CheckReport(d["baseline"], d.get("run_dir"), tuple(d["backends"]), d["model"], d["seed"], d["steps"],
                           d["tolerances"], tuple(CheckResult(**c) for c in d["checks"]), d.get("elapsed_s"),
                           tuple(d.get("advisories") or ()), d.get("context"))


def run_check(baseline_dir: str | Path, *, model: str | None = None, seed: int | None = None,
              steps: int | None = None, tolerances: dict[str, float] | None = None, plugins: tuple[str, ...] = (),
              timeout: float = 600.0, out: str | Path | None = None, on_event: EventFn | None = None,
              run: str | Path | None = None, force: bool = False, compile_choice: str | None = None) -> CheckReport:
    """Run the baseline's backends again (or read the run recorded in `run`) and hold them to the
    committed traces; returns the result.

    Without `out` or `run` the fresh run goes to a temporary directory, deleted when every check passes
    and kept (its path in `run_dir`) when one fails, so that the paths in the messages still exist."""
    started = time.perf_counter()
    base_dir = Path(baseline_dir)
    baseline = load_baseline(base_dir)
    table = dict(tolerances or CHECK_TOLERANCES)
    for tier, tol in table.items():
        validate.number(f"tolerance {tier}", tol, 0.0, math.inf)
    if run is not None and out is not None:
        raise XBackendError("--run and --out exclude each other", asked="--run checks a run recorded earlier, "
                            "--out keeps the run that check makes", fix="drop one of them")
    if run is None or model is not None or seed is not None or steps is not None:
        req = request_from_baseline(baseline, base_dir, model=model, seed=seed, steps=steps, plugins=plugins,
                                    timeout=timeout)
        # a baseline made before --compile existed ran eagerly (xbackend's default then): check it so
        req = replace(req, compile=validate.compile_choice(compile_choice or baseline.get("compile") or "off"))
    if out is not None:
        _refuse_overlap(base_dir, Path(out))
    with kept_on_failure("xbackend-check-") as tmp:
        if run is not None:
            run_dir = out = Path(run)
            report = recorded_run(baseline, base_dir, run_dir)
        else:
            run_dir = Path(out) if out is not None else tmp
            report = run_compare(req, run_dir, on_event, force=force)
        results = [r for label in baseline["traces"]
                   for r in backend_checks(label, baseline, base_dir, report, run_dir, table)]
        failed = any(r.failed for r in results)
        if failed and out is None:
            (tmp / KEEP).touch()  # the context manager keeps a directory that holds this mark
            out = tmp
    committed = baseline.get("env") if isinstance(baseline.get("env"), dict) else {}  # unvalidated: read defensively
    found = advise({**{f"{label} (baseline)": env for label, env in committed.items() if isinstance(label, str)},
                    **{b["name"]: b.get("env") for b in report.backends}})
    results = [with_known_issues(r, found) for r in results]
    return CheckReport(str(base_dir), str(out) if out is not None else None, tuple(baseline["backends"]),
                       baseline["model"], baseline["seed"], baseline["steps"], table, tuple(results),
                       round(time.perf_counter() - started, 3), tuple(found), report.context)


# What each failed check may come from (`advisories.EFFECTS`): logits and the portable tokens they decide,
# repeats that differ.
CHECK_CAUSES = {"logits": (LOGITS,), "tokens": (LOGITS,), "repeatability": (NONDETERMINISM,)}


def with_known_issues(r: CheckResult, found: list[dict]) -> CheckResult:
    """A failed check that a known issue of its backend (fresh or baseline machine) could explain says so."""
    causes = verdict_effects(str(r.figures.get("got"))) if r.check == "verdict" else CHECK_CAUSES.get(r.check, ())
    known = explaining(found, (r.backend, f"{r.backend} (baseline)"), causes) if r.failed else []
    if not known:
        return r
    return replace(r, message=r.message + sentence(known), figures={**r.figures, "known_issues": known})


def _refuse_overlap(baseline: Path, out: Path) -> None:
    """`check --out` must not be (or hold, or sit inside) the baseline: its committed traces would be overwritten."""
    if overlaps(baseline, out):
        raise XBackendError(f"--out {out} overlaps the baseline {baseline}",
                            asked="the fresh run would overwrite the committed traces it is checked against",
                            fix="pass a --out directory outside the baseline, or leave --out out (temporary)")


def junit_xml(report: CheckReport) -> str:
    """JUnit XML: one testcase per backend and check (classname = backend, name = check).

    The suite's time is the whole check's wall time (running every backend, then comparing); the
    checks of one run have no time of their own, so test cases carry none."""
    result = report.to_dict()
    checks = result["checks"]
    timed = {"time": f"{result['elapsed_s']:.3f}"} if result.get("elapsed_s") is not None else {}
    suite = ET.Element("testsuite", name="xbackend check", tests=str(len(checks)),
                       failures=str(result["counts"]["fail"]), skipped=str(result["counts"]["skip"]),
                       errors="0", **timed)
    props = ET.SubElement(suite, "properties")
    for key in ("baseline", "seed", "steps"):
        ET.SubElement(props, "property", name=key, value=str(result[key]))
    ET.SubElement(props, "property", name="model", value=f"{result['model']['name']} ({result['model']['digest']})")
    for r in checks:
        case = ET.SubElement(suite, "testcase", classname=r["backend"], name=r["check"])
        if r["status"] == "fail":
            failure = ET.SubElement(case, "failure", message=r["message"], type=f"xbackend.{r['check']}")
            failure.text = json.dumps(r["figures"], indent=2, default=str)
        elif r["status"] == "skip":
            ET.SubElement(case, "skipped", message=r["message"])
        else:
            ET.SubElement(case, "system-out").text = r["message"]
    root = ET.Element("testsuites", name="xbackend", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
