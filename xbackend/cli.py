"""The `xbackend` command. The only module that prints or exits; every command calls the library."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .errors import XBackendError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Moshi on several backends with the same prompt and seed; tell why outputs differ.")

SEED_HELP = "Seed for every sampler (the Rust CLI's default)."
PluginOpt = typer.Option(None, "--plugin", help="Python file that registers extra backends (repeatable).")
MODEL_OPT = typer.Option("tiny", help="tiny, a checkpoint directory or file, or hf://owner/repo.")
MODEL_CONFIG_OPT = typer.Option(None, help="LMModel config JSON for a bare checkpoint file.")
PROMPT_OPT = typer.Option(None, help="WAV/FLAC audio or a codes file (default: the bundled hello.wav).")
SEED_OPT = typer.Option(299792458, help=SEED_HELP)
TIMEOUT_OPT = typer.Option(600.0, help="Seconds one run may take before it is killed and reported.")
ALIGNMENT_OPT = typer.Option("aligned", help="aligned (same frame at the same step everywhere) or upstream.")
REPEATS_OPT = typer.Option(2, help="Native runs per backend, for repeatability.")


def friendly(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the exit code of SPEC §5."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except XBackendError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code)
        except OSError as exc:  # an unwritable --out, a full disk: the user's to fix
            typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}. Fix: choose a writable path.", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def load_plugins(plugins: Optional[List[Path]]) -> None:
    from .backends import load_plugin

    for p in plugins or []:
        load_plugin(p)


def progress_bar(label: str):
    """A rich progress bar on stderr; returns (context manager, callback(done, total))."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


@app.command()
@friendly
def backends(plugin: Optional[List[Path]] = PluginOpt) -> None:
    """List every backend spec and whether it runs on this machine (and why not)."""
    from rich.console import Console
    from rich.table import Table

    from .backends import BUILTIN_SPECS, registered
    from .report_env import backend_rows

    load_plugins(plugin)
    table = Table(title="xbackend backends")
    for col in ("spec", "library", "available", "device", "versions"):
        table.add_column(col)
    for row in backend_rows(list(BUILTIN_SPECS) + [n for n in registered() if n not in ("cpu", "cuda", "mps", "mlx")]):
        table.add_row(row["spec"], row["library"], "yes" if row["available"] else f"no: {row['reason']}",
                      row["device"], row["versions"])
    Console().print(table)


@app.command()
@friendly
def capture(
    backend: str = typer.Option("cpu", "--backend", "-b", help="Backend spec, e.g. cpu, cpu:fp64, mlx:cpu."),
    model: str = MODEL_OPT,
    model_config: Optional[str] = MODEL_CONFIG_OPT,
    prompt: Optional[str] = PROMPT_OPT,
    seed: int = SEED_OPT,
    steps: int = typer.Option(50, help="Steps of 80 ms to generate."),
    sampler: str = typer.Option("native", help="native, portable, greedy or forced:PATH."),
    alignment: str = ALIGNMENT_OPT,
    out: Path = typer.Option(Path("trace"), "--out", "-o", help="Trace directory to write."),
    plugin: Optional[List[Path]] = PluginOpt,
) -> None:
    """Capture one backend's logits and tokens, step by step, into a trace directory."""
    from .capture import CaptureRequest
    from .capture import capture as run_capture

    load_plugins(plugin)
    req = CaptureRequest(backend=backend, model=model, model_config=model_config, prompt=prompt, seed=seed,
                         steps=steps, sampler=sampler, alignment=alignment)
    bar, update = progress_bar(f"capture {backend}")
    with bar:
        trace = run_capture(req, out, progress=update)
    typer.echo(f"{trace.steps} steps of {backend} ({trace.meta['sampler']['mode']}) written to {out} "
               f"at {trace.meta.get('ms_per_step')} ms/step")


def run_progress():
    """A rich progress display fed by worker events; returns (context manager, on_event)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console,
                        disable=not console.is_terminal)
    tasks: dict[str, int] = {}

    def on_event(event: dict) -> None:
        name = event.get("name", "?")
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=None, state="")
        task = tasks[name]
        kind = event.get("event")
        if kind == "step":
            progress.update(task, completed=event["step"], total=event["total"])
        elif kind in ("done", "failed", "skipped", "unavailable"):
            progress.update(task, state=kind if kind == "done" else f"[red]{kind}[/red]")

    return progress, on_event


def settings_options(temp_text: float, top_k_text: int, temp_audio: float, top_k_audio: int):
    from .samplers import SamplingSettings

    return SamplingSettings(temp_text=temp_text, top_k_text=top_k_text, temp_audio=temp_audio, top_k_audio=top_k_audio)


def print_verdicts(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ref = report.get("reference_repeatability")
    if ref and not (ref["logits_identical"] and ref["tokens_identical"]):
        console.print(f"[bold red]Warning:[/bold red] the reference {report['reference']} is not repeatable "
                      f"(first difference at step {ref['first_nondeterministic_step']}): every comparison below "
                      "carries its noise.")
    for b in report["backends"]:
        if b["status"] != "ok":
            console.print(f"[red]{b['name']}: {b['status']}[/red] - {b['error']}")
    for n in report.get("not_diagnosed", []):
        console.print(f"[yellow]{n['backend']}: not diagnosed[/yellow] - {n['reason']}")
    table = Table(title=f"xbackend compare (reference: {report['reference']})")
    table.add_column("backend", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for col in ("first div.", "forced max |Δ|", "portable div.", "native div."):
        table.add_column(col)

    def where(d):
        return f"{d['step']}:{d['stream']}" if d else "-"

    for v in report["verdicts"]:
        f = v["figures"]
        drift = f"{f['forced_max_abs']:.2g} (tol {f['tolerance']:g})" if "forced_max_abs" in f else "-"
        table.add_row(v["backend"], v["verdict"], where(v["first_divergence"]), drift,
                      where(f.get("portable_divergence")), where(f.get("native_divergence")))
    console.print(table)
    for v in report["verdicts"]:
        console.print(f"[bold]{v['backend']}[/bold] ({v['verdict']}): {v['explanation']}")
        if v["secondary"]:
            console.print("  also: " + ", ".join(s["verdict"] for s in v["secondary"]))


TEMP_TEXT = typer.Option(0.7, help="Text temperature (PyTorch LMGen default).")
TOPK_TEXT = typer.Option(25, help="Text top-k.")
TEMP_AUDIO = typer.Option(0.8, help="Audio temperature.")
TOPK_AUDIO = typer.Option(250, help="Audio top-k.")


@app.command()
@friendly
def compare(
    backends: str = typer.Option(..., "--backends", "-b", help="Comma-separated specs; the first is the reference."),
    model: str = MODEL_OPT,
    model_config: Optional[str] = MODEL_CONFIG_OPT,
    prompt: Optional[str] = PROMPT_OPT,
    seed: int = SEED_OPT,
    steps: int = typer.Option(100, help="Steps of 80 ms per run."),
    repeats: int = REPEATS_OPT,
    timeout: float = TIMEOUT_OPT,
    alignment: str = ALIGNMENT_OPT,
    temp_text: float = TEMP_TEXT, top_k_text: int = TOPK_TEXT, temp_audio: float = TEMP_AUDIO, top_k_audio: int = TOPK_AUDIO,
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Run directory to write."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json instead of the table."),
    codec: str = typer.Option("torch:cpu", "--codec", help="Codec spec that decodes the generated audio (torch:cpu, mlx:cpu, candle, ...)."),
    plugin: Optional[List[Path]] = PluginOpt,
) -> None:
    """Run the diagnosis protocol on every backend and give one verdict per backend."""
    import json

    from .compare import CompareRequest, exit_code, run_compare

    req = CompareRequest(backends=tuple(backends.split(",")), model=model, model_config=model_config, prompt=prompt,
                         seed=seed, steps=steps, repeats=repeats, timeout=timeout, alignment=alignment,
                         settings=settings_options(temp_text, top_k_text, temp_audio, top_k_audio),
                         plugins=tuple(str(p) for p in plugin or []), codec=codec)
    progress, on_event = run_progress()
    with progress:
        report = run_compare(req, out, on_event, min_backends=2)
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        print_verdicts(report)
        t = report["timing"]
        if report.get("codec"):
            typer.echo(f"audio decoded with codec {report['codec']['spec']} into {out / 'audio'}")
        typer.echo(f"run directory: {out} (report.json, traces/, audio/); took {t['wall_s']:.1f} s, of which "
                   f"model steps {t['model_steps_s']:.1f} s and model loading {t['model_load_s']:.1f} s "
                   f"over {t['runs']} runs")
    raise typer.Exit(exit_code(report))


@app.command()
@friendly
def codec(
    codecs: str = typer.Option("torch,mlx,candle", "--codecs", "-c",
                               help="Comma-separated codec specs (torch, torch:mps, torch:cpu:fp64, mlx:cpu, mlx:gpu, candle, candle:fp16, ...); the first is the reference."),
    codec_weights: Optional[str] = typer.Option(None, "--codec", help="Mimi weights: tiny (bundled, PyTorch only), a .safetensors file or directory, or hf://owner/repo."),
    prompt: Optional[str] = typer.Option(None, help="WAV/FLAC audio (default: the bundled hello.wav)."),
    codebooks: int = typer.Option(8, help="Codebooks to encode with (Moshi uses 8)."),
    timeout: float = TIMEOUT_OPT,
    out: Path = typer.Option(Path("runs/codec"), "--out", "-o", help="Run directory to write."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json on stdout instead of the table."),
    json_file: Optional[Path] = typer.Option(None, "--json-out", help="Also write report.json's content to this file."),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", help="Python file that registers codecs (xbackend.register_codec; repeatable)."),
) -> None:
    """The same audio through Mimi on PyTorch, MLX and candle: codes and decoded audio compared frame by frame."""
    import json

    from .codec_report import write_codec_report
    from .codec_stage import CodecRequest, exit_code, run_codec_stage

    req = CodecRequest(codecs=tuple(codecs.split(",")), codec=codec_weights, prompt=prompt, codebooks=codebooks,
                       timeout=timeout, plugins=tuple(str(p) for p in plugin or []))
    progress, on_event = run_progress()
    with progress:
        report = run_codec_stage(req, out, on_event)
    files = write_codec_report(out)
    if json_file:
        json_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        from .codec_report import summary_lines

        for line in summary_lines(report):
            typer.echo(line)
        typer.echo(f"run directory: {out} (report.json, report.md, plots/, audio/); took {report['timing']['wall_s']:.1f} s")
    for c in report["codecs"]:
        if c["status"] != "ok":
            typer.echo(f"error: codec {c['name']} {c['status']}: {c['error']}", err=True)
    raise typer.Exit(exit_code(report))


@app.command()
@friendly
def diff(
    trace_a: Path = typer.Argument(..., help="Reference trace directory."),
    trace_b: Path = typer.Argument(..., help="Trace to compare against it."),
    force: bool = typer.Option(False, help="Compare even when the traces are not comparable (says why)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Drift and first divergence between two traces captured anywhere (two Macs, two versions)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .diff import diff as run_diff

    result = run_diff(trace_a, trace_b, force=force)
    if result.steps_compared == 0:
        empty = trace_a if result.steps_a == 0 else trace_b
        raise XBackendError(f"Trace {empty} has no complete step, so there is nothing to compare",
                            fix="capture it again (its meta.json says why the run stopped)")
    data = result.to_dict()
    if json_out:
        typer.echo(json.dumps(data, indent=2))
    else:
        console = Console()
        for note in data.get("notes", []):
            console.print(f"note: {note}")
        table = Table(title=f"{trace_b} against {trace_a} ({data['steps_compared']} steps)")
        for col in ("stream", "max |Δlogit|", "median", "p99", "RMS max", "KL max", "top-1 agree"):
            table.add_column(col)
        for stream, s in data["summaries"].items():
            table.add_row(stream, _fmt(s["max_abs"]["max"]), _fmt(s["max_abs"]["median"]), _fmt(s["max_abs"]["p99"]),
                          _fmt(s["rms"]["max"]), _fmt(s["kl"]["max"]), _fmt(s["top1"]["mean"]))
        console.print(table)
        fd = data.get("first_divergence")
        console.print("tokens: identical" if fd is None else
                      f"first token divergence: step {fd['step']}, stream {fd['stream']} "
                      f"(|Δlogit| {_fmt(fd.get('max_abs'))}, margins {_fmt(fd.get('margin_a'))} / {_fmt(fd.get('margin_b'))}, "
                      f"explained by drift: {fd.get('explained')})")
        console.print("logits: bitwise identical" if data["logits_identical"] else
                      f"logits: first bitwise difference at step {data['first_bitwise_step']}; "
                      f"{'within' if data['within_tolerance'] else 'BEYOND'} tolerance {data['tolerance']:g}")
    diverged = data.get("first_divergence") is not None or not data["within_tolerance"]
    raise typer.Exit(1 if diverged else 0)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


@app.command()
@friendly
def repeat(
    backend: str = typer.Option("cpu", "--backend", "-b", help="Backend spec."),
    runs: int = typer.Option(3, help="How many runs with the same seed and inputs."),
    model: str = MODEL_OPT, model_config: Optional[str] = MODEL_CONFIG_OPT, prompt: Optional[str] = PROMPT_OPT,
    seed: int = SEED_OPT, steps: int = typer.Option(50, help="Steps of 80 ms per run."), timeout: float = TIMEOUT_OPT,
    out: Path = typer.Option(Path("runs/repeat"), "--out", "-o", help="Directory for the runs' traces."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    plugin: Optional[List[Path]] = PluginOpt,
) -> None:
    """Run one backend several times with the native sampler: is it bitwise repeatable?"""
    import json

    from .compare import CompareRequest, run_repeat

    req = CompareRequest(backends=(backend,), model=model, model_config=model_config, prompt=prompt, seed=seed,
                         steps=steps, repeats=runs, timeout=timeout, plugins=tuple(str(p) for p in plugin or []))
    progress, on_event = run_progress()
    with progress:
        result = run_repeat(req, out, on_event)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        n = result["runs"]
        typer.echo(f"{backend}: {result['identical_logits_runs']}/{n} runs bitwise identical in logits, "
                   f"{result['identical_token_runs']}/{n} in tokens")
        if result["first_nondeterministic_step"] is not None:
            typer.echo(f"first nondeterministic step: {result['first_nondeterministic_step']} "
                       f"({result['first_nondeterministic_stream']}); run-to-run drift {result['run_to_run_drift']:.3g}")
        for i, d in enumerate(result["run_digests"]):
            typer.echo(f"  run {i}: {d}")
        for f in result["failures"]:
            typer.echo(f"  {f['run']}: {f['status']} - {f['error']}", err=True)
    if result["failures"]:
        raise typer.Exit(3)
    raise typer.Exit(0 if result["logits_identical"] and result["tokens_identical"] else 1)


@app.command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="Run directory written by `xbackend compare` or `xbackend codec`.")) -> None:
    """Write report.md (for an upstream issue), drift plots and bundle.tar.gz into a run directory."""
    from .codec_report import is_codec_run, write_codec_report
    from .report import write_report

    if is_codec_run(run_dir):  # written by `xbackend codec`
        made = write_codec_report(run_dir)
        typer.echo(f"report: {made.markdown}")
        for plot in made.plots:
            typer.echo(f"plot: {plot}")
        typer.echo(f"bundle: {made.bundle} ({made.bundle_bytes / 1e6:.2f} MB)")
        return

    files = write_report(run_dir)
    typer.echo(f"report: {files.markdown}")
    for plot in files.plots:
        typer.echo(f"plot: {plot}")
    typer.echo(f"bundle: {files.bundle} ({files.bundle_bytes / 1e6:.2f} MB; traces trimmed to "
               f"{files.plan.half_width} steps either side of each divergence)")
    if files.plan.omitted:
        typer.echo(f"warning: {len(files.plan.omitted)} trimmed traces left out of the bundle to stay under its "
                   "size limit (listed in report.md)", err=True)


@app.command()
@friendly
def check(
    baseline: Path = typer.Option(..., "--baseline", help="Baseline directory (from `xbackend baseline create`)."),
    tolerances: Optional[Path] = typer.Option(None, help="TOML file: [tolerances] fp32 = 1e-5 ... (tiers only)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here (one testcase per backend and check)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    model: Optional[str] = typer.Option(None, help="Model to check (default: the baseline's); must match its digest."),
    seed: Optional[int] = typer.Option(None, help="Must equal the baseline's seed if given."),
    steps: Optional[int] = typer.Option(None, help="Must equal the baseline's steps if given."),
    timeout: float = TIMEOUT_OPT,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Keep the fresh run directory here (default: temporary)."),
    plugin: Optional[List[Path]] = PluginOpt,
) -> None:
    """Pre-release gate: run the baseline's backends again and hold them to its committed traces."""
    import json

    from .check import load_tolerances, run_check

    table = load_tolerances(tolerances) if tolerances else None
    progress, on_event = run_progress()
    with progress:
        result = run_check(baseline, model=model, seed=seed, steps=steps, tolerances=table, timeout=timeout,
                           plugins=tuple(str(p) for p in plugin or []), out=out, on_event=on_event)
    if junit:
        from .check import junit_xml

        junit.write_text(junit_xml(result))
    if json_file:
        json_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for r in result["checks"]:
        typer.echo(f"{r['status'].upper():4} {r['message']}")
    c = result["counts"]
    typer.echo(f"{'PASSED' if result['passed'] else 'FAILED'}: {c['pass']} passed, {c['fail']} failed, "
               f"{c['skip']} skipped against {baseline}")
    raise typer.Exit(result["exit_code"])


baseline_app = typer.Typer(no_args_is_help=True, help="Make the baselines `xbackend check` holds runs to.")
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("create")
@friendly
def baseline_create(
    backends: str = typer.Option(..., "--backends", "-b", help="Comma-separated specs; the first is the reference."),
    out: Path = typer.Option(..., "--out", "-o", help="Baseline directory to write (commit it)."),
    model: str = MODEL_OPT,
    prompt: Optional[str] = PROMPT_OPT,
    seed: int = SEED_OPT,
    steps: int = typer.Option(16, help="Steps of 80 ms per run (the committed traces grow with it)."),
    repeats: int = REPEATS_OPT,
    timeout: float = TIMEOUT_OPT,
    alignment: str = ALIGNMENT_OPT,
    temp_text: float = TEMP_TEXT, top_k_text: int = TOPK_TEXT, temp_audio: float = TEMP_AUDIO, top_k_audio: int = TOPK_AUDIO,
    plugin: Optional[List[Path]] = PluginOpt,
) -> None:
    """Run compare once and keep what `check` needs: baseline.json, prompt codes and traces."""
    from .check import create_baseline
    from .compare import CompareRequest

    req = CompareRequest(backends=tuple(backends.split(",")), model=model, prompt=prompt, seed=seed, steps=steps,
                         repeats=repeats, timeout=timeout, alignment=alignment,
                         settings=settings_options(temp_text, top_k_text, temp_audio, top_k_audio),
                         plugins=tuple(str(p) for p in plugin or []))
    progress, on_event = run_progress()
    with progress:
        made = create_baseline(req, out, on_event)
    for v in made["expected"]["verdicts"]:
        typer.echo(f"{v['backend']}: expected verdict {v['verdict']}")
    typer.echo(f"baseline written to {out} (model {made['model']['name']} {made['model']['digest']}, "
               f"{made['steps']} steps, seed {made['seed']})")


@app.command("inspect")
@friendly
def inspect_cmd(
    trace: Path = typer.Argument(..., help="Trace directory."),
    against: Optional[Path] = typer.Option(None, help="A second trace: where they diverge and what each produced."),
    plot: Optional[Path] = typer.Option(None, help="Write an entropy plot (PNG) here."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Entropy, repeated-token runs, n-gram loops and text padding of one trace, per stream."""
    import json

    from .inspection import divergence, inspect_trace, plot_inspection
    from .trace import load_trace

    first = load_trace(trace)
    result = inspect_trace(first)
    data = result.to_dict()
    if against is not None:
        data["against"] = divergence(first, load_trace(against))
    at = (data.get("against") or {}).get("first_divergence")
    if plot is not None:
        plot_inspection(result, plot, at["step"] if at else None)
        data["plot"] = str(plot)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{trace} ({result.backend}, {result.sampler}, {result.steps} steps)")
    for col in ("stream", "entropy (nats, T=1) mean", "min-max", "longest run", "loop from step", "period", "pattern"):
        table.add_column(col)
    for name, d in data["streams"].items():
        run, loop = d["longest_run"], d["loop"]
        table.add_row(name, f"{d['entropy_mean']:.3f}" if d["entropy_mean"] is not None else "-",
                      f"{d['entropy_min']:.2f}-{d['entropy_max']:.2f}" if d["entropy_mean"] is not None else "-",
                      f"{run['token']} x{run['length']} @ {run['start']}" if run else "-",
                      str(loop["start"]) if loop else "-", str(loop["period"]) if loop else "-",
                      " ".join(map(str, loop["pattern"])) if loop else "-")
    Console().print(table)
    pad = data["text_padding"]
    if pad["ratio"] is not None:
        typer.echo(f"text padding (id {pad['id']}): {pad['ratio']:.1%} of steps (runs and loops of it are ignored)")
    if against is not None:
        if at is None:
            typer.echo(f"no token differs from {against} over {data['against']['steps_compared']} steps")
        else:
            typer.echo(f"first divergence from {against}: step {at['step']}, {at['stream']} "
                       f"({at['token_a']} vs {at['token_b']}, max |Δlogit| there {at['max_abs_there']:.3g})")
            typer.echo(f"tokens from step {at['step']} on (a: {trace}, b: {against}):")
            for name, pair in data["against"]["after"].items():
                typer.echo(f"  {name:7} a {pair['a']}\n  {'':7} b {pair['b']}")
    if plot is not None:
        typer.echo(f"plot: {plot}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


def main() -> None:
    import warnings

    warnings.showwarning = _one_line_warning
    app()


if __name__ == "__main__":
    sys.exit(main())
