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


def friendly(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the exit code of SPEC §5."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except XBackendError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code)
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

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
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
    model: str = typer.Option("tiny", help="tiny, a checkpoint directory or file, or hf://owner/repo."),
    model_config: Optional[str] = typer.Option(None, help="LMModel config JSON for a bare checkpoint file."),
    prompt: Optional[str] = typer.Option(None, help="WAV/FLAC audio or a codes file (default: the bundled hello.wav)."),
    seed: int = typer.Option(299792458, help=SEED_HELP),
    steps: int = typer.Option(50, help="Steps of 80 ms to generate."),
    sampler: str = typer.Option("native", help="native, portable, greedy or forced:PATH."),
    alignment: str = typer.Option("aligned", help="aligned (same frame at the same step everywhere) or upstream."),
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

    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=Console(stderr=True))
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
    table = Table(title=f"xbackend compare (reference: {report['reference']})")
    for col in ("backend", "verdict", "first divergence", "forced max |Δlogit|", "tolerance", "portable / native divergence"):
        table.add_column(col)
    for v in report["verdicts"]:
        f, at = v["figures"], v["first_divergence"]
        def where(d):
            return f"{d['step']}:{d['stream']}" if d else "-"
        table.add_row(v["backend"], v["verdict"], where(at),
                      f"{f['forced_max_abs']:.3g}" if "forced_max_abs" in f else "-",
                      f"{f['tolerance']:g}" if "tolerance" in f else "-",
                      f"{where(f.get('portable_divergence'))} / {where(f.get('native_divergence'))}" if f else "-")
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
    model: str = typer.Option("tiny", help="tiny, a checkpoint directory or file, or hf://owner/repo."),
    model_config: Optional[str] = typer.Option(None, help="LMModel config JSON for a bare checkpoint file."),
    prompt: Optional[str] = typer.Option(None, help="WAV/FLAC audio or a codes file (default: the bundled hello.wav)."),
    seed: int = typer.Option(299792458, help=SEED_HELP),
    steps: int = typer.Option(100, help="Steps of 80 ms per run."),
    repeats: int = typer.Option(2, help="Native runs per backend, for repeatability."),
    timeout: float = typer.Option(600.0, help="Seconds one run may take before it is killed and reported."),
    alignment: str = typer.Option("aligned", help="aligned (same frame at the same step everywhere) or upstream."),
    temp_text: float = TEMP_TEXT, top_k_text: int = TOPK_TEXT, temp_audio: float = TEMP_AUDIO, top_k_audio: int = TOPK_AUDIO,
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Run directory to write."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json instead of the table."),
    plugin: Optional[List[Path]] = PluginOpt,
) -> None:
    """Run the diagnosis protocol on every backend and give one verdict per backend."""
    import json

    from .compare import CompareRequest, exit_code, run_compare

    req = CompareRequest(backends=tuple(backends.split(",")), model=model, model_config=model_config, prompt=prompt,
                         seed=seed, steps=steps, repeats=repeats, timeout=timeout, alignment=alignment,
                         settings=settings_options(temp_text, top_k_text, temp_audio, top_k_audio),
                         plugins=tuple(str(p) for p in plugin or []))
    progress, on_event = run_progress()
    with progress:
        report = run_compare(req, out, on_event)
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        print_verdicts(report)
        typer.echo(f"run directory: {out} (report.json, traces/, audio/)")
    raise typer.Exit(exit_code(report))


@app.command()
@friendly
def repeat(
    backend: str = typer.Option("cpu", "--backend", "-b", help="Backend spec."),
    runs: int = typer.Option(3, help="How many runs with the same seed and inputs."),
    model: str = typer.Option("tiny"), model_config: Optional[str] = typer.Option(None),
    prompt: Optional[str] = typer.Option(None), seed: int = typer.Option(299792458, help=SEED_HELP),
    steps: int = typer.Option(50), timeout: float = typer.Option(600.0),
    out: Path = typer.Option(Path("runs/repeat"), "--out", "-o"),
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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
