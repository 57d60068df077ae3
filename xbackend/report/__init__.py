"""`report`: turn a run directory into a page for an upstream issue, drift plots and a small bundle.

Everything is read back from what `compare` wrote (`report.json` and the traces); nothing is run.
`report.md` holds the verdicts, the command that reproduces the run, every backend's env
fingerprint, the top-5 candidates of every backend at each divergence and the teacher-forced
drift plots. `bundle.tar.gz` holds the same files plus the traces trimmed to a window around each
divergence, small enough to attach to an issue (`BUNDLE_LIMIT`, checked for a 7B vocabulary).
"""

from __future__ import annotations

import io
import json
import shlex
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis import metrics
from ..errors import XBackendError
from .locate import locate_section, write_locate_plots
from .markdown import details, md_table
from ..results import Point, Verdict, where
from ..store.rundir import FORCED, NATIVE_0, PORTABLE, PROMPT_CODES, REPORT_JSON, RunDir, load_run, native, safe_name
from ..samplers import SamplingSettings
from ..store.files import write_file
from ..store.trace import Trace, TraceWriter, step_bytes

__all__ = ["RunDir", "load_run", "write_report", "softmax", "BUNDLE_LIMIT", "TOP", "WINDOW"]

REPORT_MD = "report.md"
BUNDLE = "bundle.tar.gz"
PLOTS = "plots"
BUNDLE_ROOT = "xbackend-bundle"
BUNDLE_LIMIT = 10_000_000  # bytes: what an issue attachment comfortably takes
WINDOW = 8  # steps kept either side of a divergence in the bundle (shrunk when over the limit)
TOP = 5
LOG_FLOOR = 1e-15  # zeros (bitwise-equal steps) are drawn here on the log-scale plots
_MD_RESERVE = 512_000  # bytes kept for report.md and tar/gzip framing when planning the bundle

# Which run of each backend shows a kind of divergence, and why.
EVIDENCE = {
    PORTABLE: "portable-sampler free runs: decisions depend only on the logits",
    NATIVE_0: "native-sampler free runs: each backend's own sampler and RNG",
    FORCED: "teacher-forced runs on the reference's tokens (the reference's own native-0)",
}


def evidence_kind(v: Verdict) -> str:
    """The run whose traces show this verdict's divergence."""
    if v.verdict == "NUMERIC_DIVERGENCE":
        return {"native": NATIVE_0, "spike": FORCED}.get(v.figures.get("numeric_cause"), PORTABLE)
    if v.verdict == "SEMANTIC_MISMATCH":
        return NATIVE_0 if v.figures.get("onset_source") == "native" else FORCED
    return NATIVE_0


def quoted_points(v: Verdict) -> list[tuple[Point, str]]:
    """Every (step, stream) the report quotes for a verdict, with the run that shows it."""
    f = v.figures
    out = [(v.first_divergence, evidence_kind(v))] if v.first_divergence else []
    onset_run = NATIVE_0 if f.get("onset_source") == "native" else FORCED
    for key, kind in (("portable_divergence", PORTABLE), ("native_divergence", NATIVE_0), ("onset", onset_run)):
        if f.get(key):
            out.append((Point.from_dict(f[key]), kind))
    out += [(Point(s["step"], s["stream"]), FORCED) for s in f.get("spikes") or []]
    return [(p, k) for p, k in out if p.stream is not None or k == NATIVE_0]


def temperature(trace: Trace, stream: str) -> float:
    """The stream's sampling temperature from the trace's settings; greedy (0) counts as 1."""
    temp = SamplingSettings.from_meta(trace.meta).for_stream(trace.streams.index(stream))[0]
    return float(temp) if temp > 0 else 1.0


# --------------------------------------------------------------------------- candidates at a step


@dataclass(frozen=True)
class Candidate:
    token: int
    prob: float
    logit: float


@dataclass(frozen=True)
class StepView:
    """What one backend's trace shows at one (step, stream): its top candidates and the reference token."""

    backend: str
    run: str
    step: int
    stream: str
    temperature: float
    taken: int | None  # None: the trace does not reach the step
    top: tuple[Candidate, ...] = ()
    ref_token: int | None = None
    ref_rank: int | None = None
    ref_prob: float | None = None
    margin: float | None = None


def softmax(z: np.ndarray, temp: float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temp
    z = z - z[np.isfinite(z)].max(initial=0.0)
    p = np.exp(z)
    return p / p.sum()


def step_view(trace: Trace | None, backend: str, run: str, step: int, stream: str,
              ref_token: int | None, k: int = TOP) -> StepView:
    """Top-k tokens with their probabilities (full softmax at the stream's temperature), and the
    rank (1 = most likely) and probability of the token the reference took."""
    if trace is None or step >= trace.steps or stream not in trace.streams or not trace.has_logits:
        return StepView(backend, run, step, stream, float("nan"), None)
    col = trace.streams.index(stream)
    temp = temperature(trace, stream)
    z = np.asarray(trace.logits(stream)[step], dtype=np.float64)
    p = softmax(z, temp)
    order = np.argsort(-z, kind="stable")[:k]
    top = tuple(Candidate(int(t), float(p[t]), float(z[t])) for t in order)
    rank = prob = None
    if ref_token is not None and 0 <= ref_token < z.shape[0]:
        rank, prob = int(np.count_nonzero(z > z[ref_token])) + 1, float(p[ref_token])
    margin = float(trace.margins[step, col])
    return StepView(backend, run, step, stream, temp, int(trace.tokens[step, col]), top, ref_token, rank, prob,
                    margin if np.isfinite(margin) else None)


@dataclass(frozen=True)
class Divergence:
    """One quoted divergence (step, stream, run) and every backend's view of it; `verdicts` lists the
    (backend, verdict) pairs that quote it, so identical tables are rendered once."""

    verdicts: tuple[tuple[str, str], ...]
    step: int
    stream: str
    run: str
    why: str
    views: tuple[StepView, ...]

    @property
    def title(self) -> str:
        return ", ".join(f"{b}: {v}" for b, v in self.verdicts) + f" at {where(Point(self.step, self.stream))}"


def evidence_runs(run: RunDir, v: Verdict, kind: str) -> list[tuple[str, str]]:
    """(backend, run) pairs whose traces show a divergence of run `kind`, reference first."""
    pairs = []
    for label in run.labels:
        pairs.append((label, NATIVE_0) if kind == FORCED and label == run.reference else (label, kind))
        if v.verdict.startswith("NONDETERMINISTIC") and label == v.backend:
            pairs.append((label, native(1)))
    return pairs


def divergences(run: RunDir) -> list[Divergence]:
    """Each verdict's first divergence, merged when several verdicts quote the same step, stream and runs."""
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for v in run.report.verdicts:
        if v.first_divergence is None or v.first_divergence.stream is None:
            continue
        kind = evidence_kind(v)
        key = (v.first_divergence.step, v.first_divergence.stream, kind, tuple(evidence_runs(run, v, kind)))
        groups.setdefault(key, []).append((v.backend, v.verdict))
    out = []
    for (step, stream, kind, pairs), quoted in groups.items():
        traces = {pair: run.trace(*pair) for pair in pairs}
        ref = traces[pairs[0]]
        ref_token = (int(ref.tokens[step, ref.streams.index(stream)])
                     if ref is not None and step < ref.steps and stream in ref.streams else None)
        views = tuple(step_view(traces[(b, r)], b, r, step, stream, ref_token) for b, r in pairs)
        out.append(Divergence(tuple(quoted), step, stream, kind, EVIDENCE[kind], views))
    return out


# --------------------------------------------------------------------------- drift plots


def forced_drift(run: RunDir, label: str) -> metrics.StepMetrics | None:
    """Teacher-forced drift of one backend against the reference (None when a run is missing)."""
    ref, other = run.trace(run.reference, NATIVE_0), run.trace(label, FORCED)
    if ref is None or other is None or min(ref.steps, other.steps) == 0 or not (ref.has_logits and other.has_logits):
        return None
    if ref.streams != other.streams or ref.vocab != other.vocab:
        return None
    return metrics.step_metrics(ref, other)


def divergence_marks(v: Verdict | None) -> list[tuple[int, str]]:
    """Steps worth a vertical line on a backend's plot: its verdict's divergence, portable and native ones."""
    if v is None:
        return []
    marks = {}
    for key, name in (("native_divergence", "native"), ("portable_divergence", "portable"), ("onset", "onset")):
        if v.figures.get(key):
            marks.setdefault(int(v.figures[key]["step"]), f"{name} divergence" if name != "onset" else "onset")
    if v.first_divergence:
        marks[v.first_divergence.step] = v.verdict
    return sorted(marks.items())


def stream_styles(n: int) -> list[dict]:
    """Text in thick black; audio streams in distinct tab10 colours, alternating solid and dashed."""
    import matplotlib

    tab = matplotlib.colormaps["tab10"]
    return [{"color": "black", "linewidth": 1.8}] + [
        {"color": tab(i % 10), "linewidth": 1.0, "linestyle": "-" if i % 2 == 0 else "--"} for i in range(n - 1)]


def plot_drift(m: metrics.StepMetrics, path: Path, title: str, marks: list[tuple[int, str]],
               tolerance: float | None = None) -> Path:
    """|Δlogit| (max abs) and KL per step, log scale, one line per stream, the tolerance as a horizontal
    line, divergences as vertical lines; the legend sits outside the data, on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(m.steps)
    fig, axes = plt.subplots(2, 1, figsize=(10.5, 6.5), sharex=True, constrained_layout=True)
    styles = stream_styles(len(m.streams))
    for ax, name, label in ((axes[0], "max_abs", "max |Δlogit|"), (axes[1], "kl", "KL(ref ‖ backend)")):
        for i, stream in enumerate(m.streams):
            y = np.maximum(np.nan_to_num(getattr(m, name)[:, i], nan=LOG_FLOOR, posinf=1e30), LOG_FLOOR)
            ax.plot(steps, y, label=stream, **styles[i])
        ax.set_yscale("log")
        ax.set_ylabel(f"{label}\n(zeros at {LOG_FLOOR:g})")
        ax.grid(True, which="major", alpha=0.3)
        for step, what in marks:
            ax.axvline(step, color="red", linestyle=":", linewidth=1.0)
            if ax is axes[0]:
                ax.annotate(f" {what} @ {step}", (step, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                            va="top", ha="left", fontsize=7, color="red",
                            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
    if tolerance:
        axes[0].axhline(tolerance, color="dimgray", linestyle="-.", linewidth=1.2, label=f"tolerance {tolerance:g}")
    axes[0].set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes[1].set_xlabel("step (80 ms)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def save_figure(fig, path: Path) -> None:
    """A PNG written whole, through no link (a planted link must not redirect the write)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_file(path, buf.getvalue())


def write_plots(run: RunDir) -> dict[str, Path]:
    """One drift plot per non-reference backend whose forced run exists: backend -> PNG path."""
    plots = {}
    for label in run.labels:
        if label == run.reference:
            continue
        m = forced_drift(run, label)
        if m is None:
            continue
        v = run.report.verdict_for(label)
        title = f"{label} teacher-forced on {run.reference}'s tokens ({m.steps} steps)"
        plots[label] = plot_drift(m, run.path / PLOTS / f"drift-{safe_name(label)}.png", title,
                                  divergence_marks(v), v.figures.get("tolerance") if v else None)
    return plots


# --------------------------------------------------------------------------- bundle plan


@dataclass(frozen=True)
class Window:
    """Steps [start, stop) of one run of one backend, kept in the bundle."""

    backend: str
    run: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.run}.steps{self.start}-{self.stop - 1}"

    def arcname(self) -> str:
        return f"traces/{safe_name(self.backend)}/{self.name}"


@dataclass(frozen=True)
class BundlePlan:
    windows: tuple[Window, ...]
    half_width: int  # steps kept either side of each divergence
    omitted: tuple[Window, ...] = ()


def row_bytes(trace: Trace) -> int:
    """Bytes one step takes in a trace directory."""
    return step_bytes(trace.meta)


def _wanted(run: RunDir, half: int) -> list[Window]:
    """Merged windows per (backend, run) around every point the report quotes; the first steps when none."""
    spans: dict[tuple[str, str], list[list[int]]] = {}
    for v in run.report.verdicts:
        for point, kind in quoted_points(v):
            for pair in evidence_runs(run, v, kind):
                spans.setdefault(pair, []).append([point.step - half, point.step + half + 1])
    windows = _windows(run, spans)
    if not windows:
        head = {(label, NATIVE_0 if label == run.reference else FORCED): [[0, 2 * half]] for label in run.labels}
        windows = _windows(run, head)
    return windows


def _windows(run: RunDir, spans: dict[tuple[str, str], list[list[int]]]) -> list[Window]:
    windows = []
    for (label, name), items in spans.items():
        trace = run.trace(label, name)
        if trace is None or trace.steps == 0:
            continue
        merged: list[list[int]] = []
        for a, b in sorted(items):
            a, b = max(a, 0), min(max(b, a + 1), trace.steps)
            if a >= trace.steps:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        windows += [Window(label, name, a, b) for a, b in merged]
    return windows


def plan_bundle(run: RunDir, budget: int) -> BundlePlan:
    """The widest windows (at most `WINDOW` steps either side) whose traces fit in `budget` bytes.

    Sizes are counted uncompressed, so the gzip'd bundle can only come out smaller.
    """
    sizes: dict[tuple[str, str], tuple[int, int]] = {}

    def cost(w: Window) -> int:
        key = (w.backend, w.run)
        if key not in sizes:
            t = run.trace(*key)
            sizes[key] = (row_bytes(t), len(json.dumps(t.meta, default=str)) + 4096)
        per_step, fixed = sizes[key]
        return (w.stop - w.start) * per_step + fixed

    for half in range(WINDOW, -1, -1):
        windows = _wanted(run, half)
        if sum(cost(w) for w in windows) <= budget:
            return BundlePlan(tuple(windows), half)
    kept, omitted, used = [], [], 0
    for w in _wanted(run, 0):
        if used + cost(w) <= budget:
            kept.append(w)
            used += cost(w)
        else:
            omitted.append(w)
    return BundlePlan(tuple(kept), 0, tuple(omitted))


def trim_trace(trace: Trace, start: int, stop: int, out: Path) -> Path:
    """Write steps [start, stop) of `trace` as a trace directory of its own, meta kept and the
    offset recorded as `trimmed_from` (step 0 of the copy is step `start` of the original)."""
    stop = min(stop, trace.steps)
    meta = {k: v for k, v in trace.meta.items() if k not in ("schema", "streams", "vocab", "n_inputs", "has_logits",
                                                             "logits_dtype", "status", "steps", "error")}
    meta["trimmed_from"] = {"start": int(start), "steps": int(stop - start), "original_steps": int(trace.steps),
                            "original": str(trace.path)}
    writer = TraceWriter(out, meta, trace.streams, [int(v) for v in trace.meta["vocab"]],
                         int(trace.meta["n_inputs"]), trace.logits_dtype if trace.has_logits else "float32",
                         has_logits=trace.has_logits)
    columns = [trace.logits(s) for s in trace.streams] if trace.has_logits else None
    for step in range(start, stop):
        writer.write_step([c[step] for c in columns] if columns else None, [int(t) for t in trace.tokens[step]],
                          [float(x) for x in trace.margins[step]], trace.inputs[step])
    status = trace.meta.get("status", "complete")
    writer.close(status if status != "running" else "interrupted", error=trace.meta.get("error"))
    return out


def write_bundle(run: RunDir, plan: BundlePlan, files: list[Path], path: Path) -> Path:
    """`files` (paths inside the run directory) and the planned trimmed traces, as one tar.gz."""
    with tempfile.TemporaryDirectory(prefix="xbackend-bundle-") as tmp:
        def fill(tar: tarfile.TarFile) -> None:
            for f in files:
                add_file(tar, run.path, f)
            for w in plan.windows:
                local = trim_trace(run.trace(w.backend, w.run), w.start, w.stop, Path(tmp) / w.arcname())
                tar.add(local, arcname=f"{BUNDLE_ROOT}/{w.arcname()}")

        write_file(path, tar_bytes(fill, _bundle_readme(plan)))  # never through a link planted at bundle.tar.gz
    return path


def tar_bytes(fill, readme: str, top: str = BUNDLE_ROOT) -> bytes:
    """A bundle as bytes: what `fill(tar)` adds, then README.txt."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        fill(tar)
        info = tarfile.TarInfo(f"{top}/README.txt")
        data = readme.encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, root: Path, f: Path, top: str = BUNDLE_ROOT) -> None:
    """One file of `root` into a bundle: regular, reached through no link, with no second hard link (a
    link of either kind would put another file's content in a bundle meant for a public issue)."""
    from ..store.files import no_link_between, read_bytes

    no_link_between(root, f)
    data = read_bytes(f, "bundle file", limit=BUNDLE_LIMIT * 4, fix="replace it by a regular file of its own",
                      single_link=True)
    info = tarfile.TarInfo(f"{top}/{f.relative_to(root).as_posix()}")
    info.size, info.mode, info.mtime = len(data), 0o644, int(f.stat().st_mtime)
    tar.addfile(info, io.BytesIO(data))


def _bundle_readme(plan: BundlePlan) -> str:
    lines = ["xbackend report bundle: report.json, report.md, drift plots and trimmed traces.",
             "Each traces/<backend>/<run>.stepsA-B directory is a trace (xbackend.load_trace) holding steps A..B",
             "of the original run; its meta.json says so under trimmed_from (start, steps).", ""]
    lines += [f"{w.arcname()}: steps {w.start}..{w.stop - 1}" for w in plan.windows]
    lines += [f"omitted (over the size limit): {w.arcname()}" for w in plan.omitted]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- markdown


def _num(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _prob(p: float | None) -> str:
    """Four decimals, or scientific notation for what four decimals would show as 0."""
    return "-" if p is None else f"{p:.4f}" if p >= 5e-5 or p == 0.0 else f"{p:.2e}"


def reproduce_command(report) -> str:
    """The `xbackend compare` command line for the request recorded in report.json: `CompareRequest.to_argv()`.

    A prompt other than the bundled one is given as `prompt_codes.npy` (the exact codes, in the
    bundle), never as a path on the machine that ran it; no `--out` is forced."""
    from ..capture.prompt import DEFAULT_PROMPT
    from ..requests import CompareRequest

    source = (report.request.get("prompt") or {}).get("source")
    prompt = PROMPT_CODES if source and Path(source).name != DEFAULT_PROMPT.name else None
    codec = (report.codec or {}).get("spec")
    req = CompareRequest.from_record(report.request, prompt=prompt, codec=codec)
    return " ".join(shlex.quote(a) for a in req.to_argv())


ENV_ORDER = ("os", "platform", "machine", "chip", "cpu_count", "python", "library", "device", "dtype", "quant",
             "threads")


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}.") if v else {f"{prefix}{k}": "(none)"})
        else:
            out[f"{prefix}{k}"] = "-" if v is None else str(v)
    return out


def env_table(backends: list[dict]) -> str:
    flat = {b["name"]: _flatten(b.get("env") or {}) for b in backends}
    keys = sorted({k for f in flat.values() for k in f},
                  key=lambda k: (ENV_ORDER.index(k) if k in ENV_ORDER else len(ENV_ORDER) + (k.startswith("env.")), k))
    return md_table(["", *flat], [[k, *(f.get(k, "-") for f in flat.values())] for k in keys])


def _verdict_section(report) -> list[str]:
    out = ["## Verdicts", ""]
    if report.reference_warning:
        out += [f"> **Warning:** {report.reference_warning}.", ""]
    rows = []
    for v in report.verdicts:
        f = v.figures
        rows.append([v.backend, v.vs, f"**{v.verdict}**", v.label, where(v.first_divergence),
                     _num(f.get("forced_max_abs")), _num(f.get("tolerance"), "g"),
                     f"{where(f.get('portable_divergence'))} / {where(f.get('native_divergence'))}",
                     _num(f.get("delta_at_divergence")), _num(f.get("margin_at_divergence")),
                     "; ".join(str(s) for s in v.secondary) or "-"])
    out += [md_table(["backend", "vs", "verdict", "", "first divergence", "forced max abs Δlogit", "tolerance",
                      "portable / native divergence", "Δlogit at divergence", "margin", "also"], rows), ""]
    for b in report.backends:
        if b["status"] != "ok":
            out += [f"- **{b['name']}: {b['status']}** - {b.get('error')}"]
    out += [f"- **{v.backend}** ({v.verdict}, {v.label}): {v.explanation}" for v in report.verdicts]
    if report.context and report.context.get("note"):
        out += [f"- Context: {report.context['note']}."]
    return out + [""]


def advisories_section(found: list[dict], explained: list[tuple[str, str, list[dict]]]) -> list[str]:
    """Known issues (xbackend.advisories) matching the fingerprints, and the verdicts one could explain."""
    if not found:
        return []
    from ..advisories import TABLE_VERSION

    out = ["## Known issues", "",
           f"Fingerprints that match the known-issue table (version {TABLE_VERSION}): a match is a known cause to "
           "rule out first, not a verdict.", "",
           md_table(["backend", "known issue", "when"], [[m["backend"], m["text"], m["condition"]] for m in found]), ""]
    out += [f"- **{who}** ({verdict}) could be explained by: " + "; ".join(f"{m['backend']}: {m['text']}" for m in ms)
            for who, verdict, ms in explained]
    return out + ([""] if explained else [])


def _words_section(report) -> list[str]:
    """Each run's decoded text, marked where it parts from the run it is held against."""
    words = report.words
    rows = words.get("runs") if isinstance(words, dict) else None
    if not isinstance(rows, list) or not rows or not isinstance(words.get("tokenizer"), dict):
        return []
    mark = str(words.get("mark", ""))

    def code(text) -> str:
        text = str(text or "").replace("`", "'")
        return f"`{text}`" if text else "(no words)"

    table = [[r.get("backend"), r.get("run"), code(r.get("marked")),
              f"{r['against']}: " + (f"step {r['first_divergence'].get('step')}"
                                     if isinstance(r.get("first_divergence"), dict) else "same tokens")
              if r.get("against") else "-"] for r in rows if isinstance(r, dict)]
    return ["## Words", "",
            f"The text stream decoded by the model's tokenizer (`{words['tokenizer'].get('name')}`); `{mark}` marks "
            "the first step where a run's tokens differ from the run it is held against.", "",
            md_table(["backend", "run", "words", "against"], table), ""]


def _arbiter_section(report) -> list[str]:
    a = report.arbiter or {}
    out = ["## Numeric arbiter", ""]
    if a.get("status") != "ok":
        return out + [f"No arbiter: {a.get('status', 'not recorded')}" + (f" ({a['error']})" if a.get("error") else "")
                      + ".", ""]
    out += [f"`{a['spec']}` teacher-forced on {report.reference}'s tokens: per backend, the per-step max |Δlogit| "
            "to it (max and median over steps). Smaller is closer to exact arithmetic.", ""]
    rows = [[d["backend"], _num(d["max_abs"]), _num(d["median_abs"]), d["steps"]] for d in a.get("backends", [])]
    return out + [md_table(["backend", "max", "median", "steps"], rows), ""]


def _reproduce_section(report) -> list[str]:
    req = report.request
    out = ["## Reproduce", "", "```sh", reproduce_command(report), "```", "",
           f"Model `{req['model']}` (digest `{req.get('model_digest')}`), prompt digest "
           f"`{(req.get('prompt') or {}).get('digest')}` (its codes are `{PROMPT_CODES}`, in the bundle: "
           f"`--prompt {PROMPT_CODES}` feeds exactly the same codes), alignment `" + str(req["alignment"]) + "`."]
    recorded = report.command or ""
    if recorded.startswith("xbackend compare"):
        out += ["", f"As typed: `{recorded}`"]
    out += ["", details("request (report.json)", "```json\n" + json.dumps(req, indent=2, sort_keys=True) + "\n```")]
    return out + [""]


def _divergence_section(divs: list[Divergence]) -> list[str]:
    out = ["## Divergences", ""]
    if not divs:
        return out + ["No backend diverged: no token differs in any mode.", ""]
    for d in divs:
        temp = next((v.temperature for v in d.views if v.taken is not None), float("nan"))
        ref = d.views[0]
        out += [f"### {d.title}", "",
                f"Traces: `{d.run}` ({d.why}). Probabilities: softmax over the full vocabulary at the stream's "
                f"sampling temperature T = {temp:g} (no top-k cut). Reference token: **{ref.ref_token}**, what "
                f"{ref.backend} ({ref.run}) took.", ""]
        rows = []
        for v in d.views:
            if v.taken is None:
                rows.append([f"{v.backend} ({v.run})", "step not recorded", *["-"] * (TOP + 3)])
                continue
            top = [f"{c.token} ({_prob(c.prob)})" for c in v.top] + ["-"] * (TOP - len(v.top))
            rows.append([f"{v.backend} ({v.run})", v.taken, _num(v.ref_rank, "d"), _prob(v.ref_prob),
                         _num(v.margin), *top])
        out += [md_table(["backend (trace)", "took", "ref token rank", "p(ref token)", "margin",
                          *[f"#{i + 1} token (p)" for i in range(TOP)]], rows), ""]
        logit_rows = [[f"{v.backend} ({v.run})", *[f"{c.token}: {c.logit:.6g}" for c in v.top]]
                      for v in d.views if v.taken is not None]
        out += [details("top logits (raw values)", md_table(["backend (trace)", *[f"#{i + 1}" for i in range(TOP)]],
                                                            logit_rows)), ""]
    return out


def _drift_section(run: RunDir, plots: dict[str, Path]) -> list[str]:
    out = ["## Teacher-forced drift", "",
           "Each backend forced onto the reference's native tokens: max |Δlogit| and KL (at the sampling "
           "temperature) per step, one line per stream; the dash-dotted line is the tolerance, red dotted lines mark "
           "divergences. The PNGs are in `plots/` (attach them to the issue).", ""]
    for label, path in plots.items():
        out += [f"![{label} drift]({path.relative_to(run.path).as_posix()})", ""]
    if not plots:
        out += ["No backend has a complete teacher-forced run to plot.", ""]
    rows = []
    for d in run.report.drift:
        for stream, stats in d.get("streams", {}).items():
            ma, kl = stats.get("max_abs", {}), stats.get("kl", {})
            rows.append([d["backend"], d["mode"], stream, _num(ma.get("max")), _num(ma.get("max_step"), "d"),
                         _num(ma.get("mean")), _num(ma.get("p99")), _num(kl.get("max")), _num(kl.get("mean"))])
    if rows:
        out += [details("per-stream drift statistics", md_table(
            ["backend", "mode", "stream", "max abs Δlogit", "at step", "mean", "p99", "KL max", "KL mean"], rows)), ""]
    return out


def _env_section(report) -> list[str]:
    backends = [b for b in report.backends if b.get("env")]
    missing = [b["name"] for b in report.backends if not b.get("env")]
    out = ["## Environment", ""]
    if backends:
        out += [details("env fingerprint of every backend (OS, chip, Python, library versions, device, dtype, "
                        "threads, env vars)", env_table(backends))]
    if missing:
        out += ["", f"No fingerprint for {', '.join(missing)} (the backend did not run)."]
    return out + [""]


def _bundle_section(plan: BundlePlan) -> list[str]:
    rows = [[w.arcname(), f"{w.start}..{w.stop - 1}"] for w in plan.windows]
    out = ["## Bundle", "",
           f"`{BUNDLE}` holds report.json, this page, the plots, `{PROMPT_CODES}` and the traces trimmed to "
           f"{plan.half_width} steps either side of every step this page quotes (the first steps when none). Each "
           "trimmed trace loads with `xbackend.load_trace`; its meta.json records `trimmed_from` (start, steps).", ""]
    out += [details(f"trimmed traces ({len(rows)})", md_table(["trace", "original steps"], rows))]
    if plan.omitted:
        out += ["", "Left out to stay under the size limit: " + ", ".join(w.arcname() for w in plan.omitted)]
    return out + [""]


def render_markdown(run: RunDir, divs: list[Divergence], plots: dict[str, Path], plan: BundlePlan,
                    located: dict[str, Path] | None = None) -> str:
    report = run.report
    req = report.request
    from ..env import __version__

    head = [f"# xbackend: {', '.join(req['backends'])} on model `{req['model']}`", "",
            f"Reference **{report.reference}**; seed {req['seed']}, {req['steps']} steps, {req['repeats']} native "
            f"runs per backend, alignment `{req['alignment']}`; xbackend {__version__}; run {report.created}.", ""]
    explained = [(v.backend, v.verdict, found) for v in report.verdicts if (found := report.known_issues(v))]
    body = (_verdict_section(report) + advisories_section(report.advisories, explained) + _words_section(report)
            + _divergence_section(divs) + _drift_section(run, plots) + locate_section(run, located or {})
            + _arbiter_section(report) + _reproduce_section(report) + _env_section(report) + _bundle_section(plan))
    if report.failures:
        body += ["## Failures", "", md_table(["run", "status", "error", "failed at", "steps done"],
                                             [[f["run"], f["status"], f.get("error"), where(f.get("failed_at")),
                                               f.get("steps")] for f in report.failures]), ""]
    return "\n".join(head + body)


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    plots: tuple[Path, ...]
    bundle: Path
    bundle_bytes: int
    plan: BundlePlan
    advisories: tuple[dict, ...] = ()  # known issues matching the run's fingerprints


def write_report(run_dir: str | Path, limit: int = BUNDLE_LIMIT) -> ReportFiles:
    """Write `report.md`, the drift plots and `bundle.tar.gz` into a run directory from `compare`."""
    from ..store.claim import claim

    run = load_run(run_dir)
    from ..store.files import shaped

    with claim(run.path, "run", what="run directory"), \
            shaped(f"{run.path / REPORT_JSON} (or a trace it names)", "regenerate the run directory with `xbackend compare`"):
        return _write_report(run, limit)


def extracted_bundle(path: Path) -> bool:
    """Whether `path` is a bundle's content (its README.txt, or trimmed `<run>.stepsA-B` traces)."""
    import re

    readme = path / "README.txt"
    if readme.is_file() and not readme.is_symlink():
        try:
            with readme.open("rb") as f:
                if f.read(64).startswith(b"xbackend report bundle"):
                    return True
        except OSError:
            pass
    traces = path / "traces"
    if not traces.is_dir() or traces.is_symlink():
        return False
    return any(re.fullmatch(r".+\.steps\d+-\d+", p.name) for d in traces.iterdir() if d.is_dir() and not d.is_symlink()
               for p in d.iterdir())


def _write_report(run: RunDir, limit: int) -> ReportFiles:
    ok = {b["name"] for b in run.report.backends if b.get("status") == "ok"}
    if extracted_bundle(run.path) or (run.reference in ok and run.trace(run.reference, NATIVE_0) is None):
        raise XBackendError(f"{run.path} has no trace of its reference {run.reference!r} ({NATIVE_0}): it is an "
                            "extracted bundle or a run whose traces were removed, and its page would be empty",
                            asked="report renders from the traces; the bundle's own report.md is its page",
                            fix="read report.md there, or run `xbackend report` on the original run directory")
    divs = divergences(run)
    render_markdown(run, divs, {}, plan_bundle(run, limit))  # a field of the wrong shape fails here, before any write
    plots = write_plots(run)
    located = write_locate_plots(run, save_figure)
    extras = [run.path / REPORT_JSON, *plots.values(), *located.values()]
    if (run.path / PROMPT_CODES).is_file() and not (run.path / PROMPT_CODES).is_symlink():
        extras.append(run.path / PROMPT_CODES)
    budget = limit - _MD_RESERVE - sum(p.stat().st_size + 1024 for p in extras)
    plan = plan_bundle(run, budget)
    md = run.path / REPORT_MD
    write_file(md, render_markdown(run, divs, plots, plan, located).encode())
    bundle = write_bundle(run, plan, [md, *extras], run.path / BUNDLE)
    return ReportFiles(md, (*plots.values(), *located.values()), bundle, bundle.stat().st_size, plan,
                       tuple(run.report.advisories))
