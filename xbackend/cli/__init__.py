"""The `xbackend` command. The only module that prints or exits; every command calls the library."""

from __future__ import annotations

import functools
import json
import math
import numbers
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from ..capture.run import DEFAULT_SEED
from ..errors import XBackendError
from ..results import count, plain
from ..samplers import SamplingSettings
from ..store.files import clean, write_text

METAVARS = {"Path": "PATH", "str": "TEXT", "int": "INTEGER", "float": "NUMBER"}


def plain_help(params: list) -> list:
    """Help without Python type hints: flags show no `<bool>`, values PATH, TEXT, INTEGER or NUMBER."""
    for param in params:
        if getattr(param, "_plain", False):
            continue
        param._plain = True
        bare = getattr(param, "bare_type", lambda: "")().removeprefix("list[").removesuffix("]")
        kind = METAVARS.get(bare, "VALUE")
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx, kind=kind: kind
        elif param.metavar is None:
            param.metavar = "" if getattr(param, "is_flag", False) else kind
    return params


class Command(TyperCommand):
    """A command whose usage reads `xbackend diff [OPTIONS] TRACE_A TRACE_B`, with plain help."""

    def get_params(self, ctx) -> list:
        return plain_help(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


class Group(TyperGroup):
    """The command groups (`xbackend`, `xbackend baseline`), with the same plain help."""

    def get_params(self, ctx) -> list:
        return plain_help(super().get_params(ctx))


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Moshi on several backends with the same prompt and seed; tell why outputs differ.")
command = functools.partial(app.command, cls=Command)

# Every option that several commands take is defined once, here.
PLUGIN_OPT = typer.Option(None, "--plugin", metavar="FILE", help="Python file that registers extra backends (repeatable).")
MODEL_OPT = typer.Option("tiny", help="tiny, a checkpoint directory or file, or hf://owner/repo.")
MODEL_CONFIG_OPT = typer.Option(None, help="LMModel config JSON for a bare checkpoint file.")
PROMPT_OPT = typer.Option(None, help="WAV/FLAC audio or a codes file (default: the bundled hello.wav).")
PROMPT_FRAMES_OPT = typer.Option(None, "--prompt-frames", help="With a codes file: its first N frames are the prompt "
                                 "itself, the rest the silence an audio prompt was continued with (a run's "
                                 "prompt_codes.npy; the prompt digest covers those N).")
SEED_OPT = typer.Option(DEFAULT_SEED, help="Seed for every sampler (the Rust CLI's default).")
TIMEOUT_OPT = typer.Option(600.0, help="Seconds one run may take before it is killed and reported.")
ALIGNMENT_OPT = typer.Option("aligned", help="aligned (same frame at the same step everywhere) or upstream.")
REPEATS_OPT = typer.Option(2, help="Native runs per backend, for repeatability.")
_DEFAULT_SETTINGS = SamplingSettings()
TEMP_TEXT_OPT = typer.Option(None, help=f"Text temperature [default: {_DEFAULT_SETTINGS.temp_text} (PyTorch LMGen); "
                                          "0.8 with --sampler candle (the Rust CLI)].")
TOPK_TEXT_OPT = typer.Option(None, help=f"Text top-k, 0: every token [default: {_DEFAULT_SETTINGS.top_k_text}; "
                                        "250 with --sampler candle].")
TEMP_AUDIO_OPT = typer.Option(None, help=f"Audio temperature [default: {_DEFAULT_SETTINGS.temp_audio}].")
TOPK_AUDIO_OPT = typer.Option(None, help=f"Audio top-k, 0: every token [default: {_DEFAULT_SETTINGS.top_k_audio}].")
COMPILE_OPT = typer.Option("auto", "--compile", help="auto: compile what upstream moshi compiles on that device "
                           "(its lazy torch.compile unless NO_TORCH_COMPILE is set); on: insist; off: eager.")
JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout instead of the text output.")


def _output_file(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """A file written when the work is done (--json-out, --junit): its folder must exist before the work starts."""
    from ..store import validate

    if value is not None:
        friendly(validate.output_file)(value, param.opts[0])
    return value


JSON_OUT_OPT = typer.Option(None, "--json-out", metavar="FILE", callback=_output_file,
                            help="Also write the result as JSON to FILE.")
FORCE_OPT = typer.Option(False, "--force", help="Write into a non-empty --out that xbackend did not make (deletes nothing).")


def settings_options(temp_text: Optional[float], top_k_text: Optional[int], temp_audio: Optional[float],
                     top_k_audio: Optional[int], sampler: str = "native") -> SamplingSettings:
    """The sampling settings asked for; what is not given takes the sampler's defaults
    (the Rust CLI's 0.8/250 for candle, PyTorch LMGen's otherwise)."""
    from dataclasses import replace

    from ..samplers import default_settings, parse_mode

    given = {"temp_text": temp_text, "top_k_text": top_k_text, "temp_audio": temp_audio, "top_k_audio": top_k_audio}
    return replace(default_settings(parse_mode(sampler)[0]), **{k: v for k, v in given.items() if v is not None})


def say(text: str = "", err: bool = False) -> None:
    """Print one block of output: untrusted text in it (names, paths, errors read from files) cannot
    drive the terminal (ESC, BEL, CR and other control characters are shown escaped)."""
    typer.echo(clean(text, lines=True), err=err)


def esc(value) -> str:
    """An untrusted value inside rich markup: its brackets are literal, its control characters escaped."""
    from rich.markup import escape

    return escape(clean(value))


def apart(json_out: Optional[Path], *inputs: Path) -> None:
    """--json-out must not replace a file of the directories a command reads."""
    import os

    if json_out is None:
        return
    target = os.path.realpath(json_out)
    for d in inputs:
        if d is not None and (target + os.sep).startswith(os.path.realpath(d) + os.sep):
            raise XBackendError(f"--json-out {json_out} is inside {d}, which this command reads",
                                fix="write the JSON outside the directory, e.g. --json-out result.json")


def emit(data: dict | list, as_json: bool, json_out: Optional[Path], text: Callable[[], None]) -> None:
    """The one way a command hands over its result: JSON on stdout (`--json`), into a file
    (`--json-out FILE`), and the text output unless `--json` replaced it."""
    dumped = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)
    if json_out is not None:
        write_text(json_out, dumped + "\n")
    if as_json:
        say(dumped)
    else:
        text()


def json_safe(value):
    """Strict JSON: NaN and infinities (no margin, a non-finite drift) become null."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):  # numpy's integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def version_callback(value: bool) -> None:
    if value:
        from ..env import __version__

        say(f"xbackend {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Run Moshi on several backends with the same prompt and seed; tell why outputs differ."""


def friendly(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and their exit code (docs/design.md, Exit codes)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except XBackendError as exc:
            say(f"error: {clean(exc)}", err=True)
            raise typer.Exit(exc.exit_code)
        except BrokenPipeError:  # `xbackend ... | head`: the reader left; nothing more to say, to anyone
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141)
        except MemoryError:
            say("error: out of memory. Fix: pass fewer --steps, a smaller model, or free memory.", err=True)
            raise typer.Exit(2)
        except OSError as exc:  # an unwritable --out, a full disk: the user's to fix
            say(f"error: {clean(os_error(exc))}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            say("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def os_error(exc: OSError) -> str:
    """An OSError as the user's fix: memory and disk are not output paths."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOMEM:
        return f"out of memory{where}. Fix: pass fewer --steps, a smaller model, or free memory."
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk{where}. Fix: free space, or pass an --out on a larger disk."
    return f"{exc.strerror or exc}{where}. Fix: choose a writable path."


def load_plugins(plugins: Optional[List[Path]]) -> None:
    from ..backends import load_plugin

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


@command()
@friendly
def backends(plugin: Optional[List[Path]] = PLUGIN_OPT, as_json: bool = JSON_OPT,
             json_out: Optional[Path] = JSON_OUT_OPT) -> None:
    """List every backend spec, whether it runs on this machine (and why not, with the extra that enables it)."""
    from ..backends import BUILTIN_NAMES, BUILTIN_SPECS, registered
    from ..report.env import backend_rows

    load_plugins(plugin)
    rows = backend_rows(list(BUILTIN_SPECS) + [n for n in registered() if n not in BUILTIN_NAMES])

    def text() -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="xbackend backends")
        for col in ("spec", "library", "available", "device", "versions"):
            table.add_column(col, overflow="fold")
        for row in rows:
            cells = (row["spec"], row["library"], "yes" if row["available"] else f"no: {row['reason']}",
                     row["device"], row["versions"])
            table.add_row(*(escape(clean(c)) for c in cells))
        Console().print(table)

    emit({"schema": "xbackend.backends/1", "backends": rows}, as_json, json_out, text)


@command()
@friendly
def capture(
    backend: str = typer.Option("cpu", "--backend", "-b", help="Backend spec, e.g. cpu, cpu:fp64, mlx:cpu."),
    model: str = MODEL_OPT,
    model_config: Optional[str] = MODEL_CONFIG_OPT,
    prompt: Optional[str] = PROMPT_OPT,
    prompt_frames: Optional[int] = PROMPT_FRAMES_OPT,
    seed: int = SEED_OPT,
    steps: int = typer.Option(50, help="Steps of 80 ms to generate."),
    sampler: str = typer.Option("native", help="native, portable, greedy, candle (the Rust app's sampler) or forced:PATH."),
    alignment: str = ALIGNMENT_OPT,
    temp_text: Optional[float] = TEMP_TEXT_OPT, top_k_text: Optional[int] = TOPK_TEXT_OPT,
    temp_audio: Optional[float] = TEMP_AUDIO_OPT, top_k_audio: Optional[int] = TOPK_AUDIO_OPT,
    out: Path = typer.Option(Path("trace"), "--out", "-o", help="Trace directory to write."),
    compile_choice: str = COMPILE_OPT,
    force: bool = FORCE_OPT,
    plugin: Optional[List[Path]] = PLUGIN_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Capture one backend's logits and tokens, step by step, into a trace directory."""
    from ..capture.run import CaptureRequest
    from ..capture.run import capture as run_capture

    load_plugins(plugin)
    req = CaptureRequest(backend=backend, model=model, model_config=model_config, prompt=prompt,
                         prompt_frames=prompt_frames, seed=seed,
                         steps=steps, sampler=sampler, alignment=alignment, compile=compile_choice,
                         settings=settings_options(temp_text, top_k_text, temp_audio, top_k_audio, sampler))
    bar, update = progress_bar(f"capture {backend}")
    with bar:
        trace = run_capture(req, out, progress=update, force=force)
    meta = trace.meta
    data = {"schema": "xbackend.capture/1", "trace": str(out), "backend": meta["backend"], "steps": trace.steps,
            "status": meta.get("status"), "sampler": meta["sampler"], "settings": meta["settings"],
            "seed": meta["seed"], "ms_per_step": meta.get("ms_per_step"),
            "first_step_ms": meta.get("first_step_ms"), "effective": meta.get("effective")}
    emit(data, as_json, json_out, lambda: say(
        f"{trace.steps} steps of {backend} ({meta['sampler']['mode']}) written to {out} "
        f"at {meta.get('ms_per_step')} ms/step"))


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


def print_verdicts(report) -> None:
    """The terminal table of a CompareReport: every verdict labelled expected or needs attention."""
    from rich.console import Console
    from rich.table import Table

    from ..results import where

    console = Console(highlight=False, emoji=False)
    if report.reference_warning:
        console.print(f"[bold red]Warning:[/bold red] {esc(report.reference_warning)}.")
    for b in report.backends:
        if b["status"] != "ok":
            console.print(f"[red]{esc(b['name'])}: {esc(b['status'])}[/red] - {esc(b['error'])}")
    for n in report.not_diagnosed:
        console.print(f"[yellow]{esc(n['backend'])}: not diagnosed[/yellow] - {esc(n['reason'])}")
    arbiter = report.arbiter or {}
    if arbiter.get("status") not in (None, "ok", "off"):
        console.print(f"[yellow]arbiter {esc(arbiter.get('spec'))}: {esc(arbiter['status'])}[/yellow] - "
                      f"{esc(arbiter.get('error'))}")
    table = Table(title=f"xbackend compare (reference: {esc(report.reference)})")
    for col in ("backend", "verdict", "first div.", "forced max |Δ| / tol", "portable / native div.",
                "to arbiter (median)"):
        table.add_column(col, overflow="fold")
    for v in report.verdicts:
        f = v.figures
        drift = f"{f['forced_max_abs']:.2g} / {f['tolerance']:g}" if f.get("forced_max_abs") is not None else "-"
        a = f.get("arbiter")
        arb = "-" if not a else "refused" if a.get("refused") else f"{a['backend_median']:.2g} vs {a['reference_median']:.2g}"
        label = "[green]expected[/green]" if v.expected else "[red]needs attention[/red]"
        table.add_row(esc(v.backend), f"{esc(v.verdict)}\n{label}", esc(where(v.first_divergence, short=True)), drift,
                      esc(f"{where(f.get('portable_divergence'), short=True)} / "
                          f"{where(f.get('native_divergence'), short=True)}"), arb)
    console.print(table)
    for v in report.verdicts:
        console.print(f"[bold]{esc(v.backend)}[/bold] ({esc(v.verdict)}, {esc(v.label)}): {esc(v.explanation)}")
        located = (report.locate or {}).get(v.backend) or {}
        if located.get("sentence") or located.get("error"):
            console.print("  located: " + esc(located.get('sentence') or 'not located: ' + str(located.get('error'))))
        if v.secondary:
            console.print("  also: " + esc("; ".join(str(s) for s in v.secondary)))
    print_advisories(report.advisories)
    print_words(report.words)


def print_advisories(found) -> None:
    """Known issues matching the fingerprints read (xbackend.advisories), one line each."""
    for m in found:
        say(f"known issue: {m['backend']}: {m['text']}")


def print_words(words: Optional[dict]) -> None:
    """Each run's decoded text, marked where it first parts from the run it is held against."""
    from ..analysis.words import shorten

    if not words or not words.get("runs"):
        return
    if words.get("tokenizer") is None:
        from ..analysis.words import no_words_reason

        reason = no_words_reason()
        say(f"words: none ({reason}" + ("; a checkpoint directory may hold tokenizer_spm_32k_3.model, or config.json "
                                        "may name it as tokenizer_name)" if reason.startswith("no text") else ")"))
        return
    say(f"words ({words['tokenizer']['name']}; {words['mark']} marks the first step where a run's tokens "
               "differ from the run named after it):")
    width = max(len(r["backend"]) for r in words["runs"])
    for r in words["runs"]:
        against = f"  (vs {r['against']}" + (f", step {r['first_divergence']['step']})" if r["first_divergence"]
                                             else ", no difference)") if r["against"] else ""
        say(f"  {r['backend']:<{width}} {r['run']:<9} {shorten(r['marked']) or '(no words)'}{against}")


@command()
@friendly
def compare(
    backends: str = typer.Option(..., "--backends", "-b", help="Comma-separated specs; the first is the reference."),
    model: str = MODEL_OPT,
    model_config: Optional[str] = MODEL_CONFIG_OPT,
    prompt: Optional[str] = PROMPT_OPT,
    prompt_frames: Optional[int] = PROMPT_FRAMES_OPT,
    seed: int = SEED_OPT,
    steps: int = typer.Option(100, help="Steps of 80 ms per run."),
    repeats: int = REPEATS_OPT,
    timeout: float = TIMEOUT_OPT,
    alignment: str = ALIGNMENT_OPT,
    temp_text: Optional[float] = TEMP_TEXT_OPT, top_k_text: Optional[int] = TOPK_TEXT_OPT,
    temp_audio: Optional[float] = TEMP_AUDIO_OPT, top_k_audio: Optional[int] = TOPK_AUDIO_OPT,
    sampler: str = typer.Option("portable", help="Sampler of the comparable free runs: portable, or candle "
                                                 "(the Rust app's TopK, bit-exact)."),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Run directory to write."),
    arbiter: str = typer.Option("auto", help="Numeric arbiter teacher-forced on the reference's tokens: auto "
                                "(cpu:fp64 when the model fits in memory), none, or a backend spec."),
    codec: str = typer.Option("torch:cpu", "--codec", help="Codec spec that decodes the generated audio (torch:cpu, mlx:cpu, candle, ...)."),
    compile_choice: str = COMPILE_OPT,
    force: bool = FORCE_OPT,
    plugin: Optional[List[Path]] = PLUGIN_OPT,
    locate_: bool = typer.Option(False, "--locate", help="Then locate the first diverging module of every backend "
                                 "that needs attention (`xbackend locate`)."),
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Run the diagnosis protocol on every backend and give one verdict per backend."""
    from ..compare import CompareRequest, run_compare

    req = CompareRequest(backends=tuple(backends.split(",")), model=model, model_config=model_config, prompt=prompt,
                         prompt_frames=prompt_frames,
                         seed=seed, steps=steps, repeats=repeats, timeout=timeout, alignment=alignment,
                         settings=settings_options(temp_text, top_k_text, temp_audio, top_k_audio, sampler),
                         sampler=sampler, plugins=tuple(str(p) for p in plugin or []), codec=codec, arbiter=arbiter,
                         compile=compile_choice)
    progress, on_event = run_progress()
    with progress:
        report = run_compare(req, out, on_event, min_backends=2, force=force)
    if locate_:
        from ..locate import locate_all

        report = locate_all(out, report, plugins=req.plugins)

    def text() -> None:
        print_verdicts(report)
        if report.context:
            say(report.context["note"])
        t = report.timing
        if report.codec:
            say(f"audio decoded with codec {report.codec['spec']} into {out / 'audio'}")
        say(f"run directory: {out} (report.json, traces/, audio/); took {t['wall_s']:.1f} s, of which "
                   f"model steps {t['model_steps_s']:.1f} s and {t['loads']} model "
                   f"load{'s' if t['loads'] != 1 else ''} {t['model_load_s']:.1f} s, over {t['runs']} runs")
        written = [(label, out / path) for label, path in report.traces.items() if (out / path).is_dir()]
        if written:  # a backend that never ran (unavailable) has no trace directory to point at
            say("traces: " + ", ".join(f"{label} in {path}" for label, path in written))

    emit(report.to_dict(), as_json, json_out, text)
    raise typer.Exit(report.exit_code)


@command()
@friendly
def locate(
    run_dir: Path = typer.Argument(..., help="Run directory written by `xbackend compare`."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Backend label of the run "
                                          "(default: the first whose verdict needs attention)."),
    at: Optional[int] = typer.Option(None, "--at", help="Step S to locate (default: the verdict's first divergence)."),
    window: int = typer.Option(4, "--window", help="Steps ending at S whose module outputs are compared."),
    model: Optional[str] = typer.Option(None, help="The run's model, if it moved (must match its digest)."),
    plugin: Optional[List[Path]] = PLUGIN_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Re-run a backend and the reference module by module: the first module that diverges, and which amplifies it."""
    from ..locate import LocateRequest, run_locate

    result = run_locate(LocateRequest(run_dir=str(run_dir), backend=backend, at=at, window=window,
                                      plugins=tuple(str(p) for p in plugin or []), model=model))
    emit(result.to_dict(), as_json, json_out, lambda: print_located(result))
    raise typer.Exit(1 if result.first is not None else 0)


def print_located(result) -> None:
    say(f"{result.backend} against {result.reference}, steps {result.window[0]}-{result.window[1]}:")
    say(result.sentence())
    if result.amplifier:
        a = result.amplifier
        say(f"amplifier: {a['module']} at step {a['step']} (LEMON score {a['score']:.3g}, after "
                   f"{a['previous'] or 'the input'})")
    for row in [r for r in result.modules if r["over"] or r["isolated_over"]][:8]:
        say(f"  over: {row['module']:<40} propagated {row['max_abs']:.3g} (tol {row['tolerance']:.3g}), "
                   f"isolated {row['isolated_max_abs']:.3g}")
    say(f"took {result.run.get('seconds_total', 0):.1f} s; written to report.json (locate)")


@command()
@friendly
def codec(
    codecs: str = typer.Option("torch,mlx,candle", "--codecs", "-c",
                               help="Comma-separated codec specs (torch, torch:mps, torch:cpu:fp64, mlx:cpu, mlx:gpu, candle, candle:fp16, ...); the first is the reference."),
    codec_weights: Optional[str] = typer.Option(None, "--codec", help="Mimi weights: tiny (bundled, PyTorch only), a .safetensors file or directory, or hf://owner/repo."),
    prompt: Optional[str] = typer.Option(None, help="WAV/FLAC audio (default: the bundled hello.wav)."),
    codebooks: int = typer.Option(8, help="Codebooks to encode with (Moshi uses 8)."),
    timeout: float = TIMEOUT_OPT,
    out: Path = typer.Option(Path("runs/codec"), "--out", "-o", help="Run directory to write."),
    plugin: Optional[List[Path]] = typer.Option(None, "--plugin", metavar="FILE", help="Python file that registers codecs (xbackend.register_codec; repeatable)."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """The same audio through Mimi on PyTorch, MLX and candle: codes and decoded audio compared frame by frame."""
    from ..codecs.report import write_codec_report
    from ..codecs.stage import CodecRequest, exit_code, run_codec_stage

    req = CodecRequest(codecs=tuple(codecs.split(",")), codec=codec_weights, prompt=prompt, codebooks=codebooks,
                       timeout=timeout, plugins=tuple(str(p) for p in plugin or []))
    progress, on_event = run_progress()
    with progress:
        report = run_codec_stage(req, out, on_event, force=force)
    write_codec_report(out)

    def text() -> None:
        from ..codecs.report import summary_lines

        for line in summary_lines(report):
            say(line)
        say(f"run directory: {out} (report.json, report.md, plots/, audio/); took {report['timing']['wall_s']:.1f} s")

    emit(report, as_json, json_out, text)
    for c in report["codecs"]:
        if c["status"] != "ok":
            say(f"error: codec {c['name']} {c['status']}: {c['error']}", err=True)
    raise typer.Exit(exit_code(report))


@command()
@friendly
def diff(
    trace_a: Path = typer.Argument(..., help="Reference trace directory."),
    trace_b: Path = typer.Argument(..., help="Trace to compare against it."),
    force: bool = typer.Option(False, "--force", help="Compare even when the traces are not comparable (says why)."),
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Drift and first divergence between two traces captured anywhere (two Macs, two versions)."""
    from ..analysis.diff import diff as run_diff

    result = run_diff(trace_a, trace_b, force=force)
    if result.steps_common == 0:
        empty = trace_a if result.steps_a == 0 else trace_b
        raise XBackendError(f"Trace {empty} has no complete step, so there is nothing to compare",
                            fix="capture it again (its meta.json says why the run stopped)")
    data = result.to_dict()

    def text() -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(markup=False, highlight=False, emoji=False)
        for note in data.get("notes", []):
            console.print(f"note: {clean(note)}")
        table = Table(title=f"{clean(trace_b)} against {clean(trace_a)} ({data['steps_compared']} of {data['steps_common']} common "
                            "steps with identical inputs)")
        for col in ("stream", "max |Δlogit|", "median", "p99", "RMS max", "KL max", "top-1 agree"):
            table.add_column(col, overflow="fold")
        for stream, s in data["summaries"].items():
            table.add_row(stream, _fmt(s["max_abs"]["max"]), _fmt(s["max_abs"]["median"]), _fmt(s["max_abs"]["p99"]),
                          _fmt(s["rms"]["max"]), _fmt(s["kl"]["max"]), _fmt(s["top1"]["mean"]))
        console.print(table)
        fd = data.get("first_divergence")
        if fd is not None:
            console.print(f"first token divergence: step {fd['step']}, stream {fd['stream']} "
                          f"(|Δlogit| {_fmt(fd.get('max_abs'))}, margins {_fmt(fd.get('margin_a'))} / "
                          f"{_fmt(fd.get('margin_b'))}, explained by drift: {plain(fd.get('explained'), 'not measured')})")
        if not data["logits_compared"]:
            console.print("logits: not compared (a token trace has none)")
        else:
            console.print("logits: bitwise identical" if data["logits_identical"] else
                          f"logits: first bitwise difference at step {data['first_bitwise_step']}")
        console.print(f"{'expected' if result.expected else 'needs attention'}: {result.explanation}")

    emit(data, as_json, json_out, text)
    raise typer.Exit(result.exit_code)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


@command()
@friendly
def repeat(
    backend: str = typer.Option("cpu", "--backend", "-b", help="Backend spec."),
    runs: int = typer.Option(3, help="How many runs with the same seed and inputs."),
    model: str = MODEL_OPT, model_config: Optional[str] = MODEL_CONFIG_OPT, prompt: Optional[str] = PROMPT_OPT,
    prompt_frames: Optional[int] = PROMPT_FRAMES_OPT,
    seed: int = SEED_OPT, steps: int = typer.Option(50, help="Steps of 80 ms per run."), timeout: float = TIMEOUT_OPT,
    alignment: str = ALIGNMENT_OPT,
    sampler: str = typer.Option("native", help="native, portable, greedy or candle (the Rust app's sampler)."),
    temp_text: Optional[float] = TEMP_TEXT_OPT, top_k_text: Optional[int] = TOPK_TEXT_OPT,
    temp_audio: Optional[float] = TEMP_AUDIO_OPT, top_k_audio: Optional[int] = TOPK_AUDIO_OPT,
    out: Path = typer.Option(Path("runs/repeat"), "--out", "-o", help="Directory for the runs' traces."),
    compile_choice: str = COMPILE_OPT,
    force: bool = FORCE_OPT,
    plugin: Optional[List[Path]] = PLUGIN_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Run one backend several times with the same seed: is it bitwise repeatable?"""
    from ..compare import CompareRequest, run_repeat

    req = CompareRequest(backends=(backend,), model=model, model_config=model_config, prompt=prompt,
                         prompt_frames=prompt_frames, seed=seed,
                         steps=steps, repeats=runs, timeout=timeout, alignment=alignment, sampler=sampler,
                         settings=settings_options(temp_text, top_k_text, temp_audio, top_k_audio, sampler),
                         plugins=tuple(str(p) for p in plugin or []), compile=compile_choice)
    progress, on_event = run_progress()
    with progress:
        result = run_repeat(req, out, on_event, force=force)

    def text() -> None:
        rep, n = result.repeatability, result.repeatability.runs
        say(f"{backend}: {result.identical_logits_runs}/{n} runs bitwise identical in logits, "
                   f"{result.identical_token_runs}/{n} in tokens")
        if rep.first_nondeterministic is not None:
            say(f"first nondeterministic: {rep.first_nondeterministic}; run-to-run drift {rep.drift_text()}")
        from ..analysis.words import shorten

        say(f"{result.identical_text_runs}/{n} runs give the same words as run 0, "
                   f"{result.identical_audio_runs}/{n} the same decoded audio")
        for i, d in enumerate(result.run_digests):
            w = result.words[i] if i < len(result.words) else {}
            say(f"  run {i}: trace digest {d}, audio digest {w.get('audio_digest') or '-'}, words: "
                f"{shorten(w.get('text') or '') or '(none)'}")
        say(f"traces in {out / 'traces'}, result in {out / 'repeat.json'}")
        for f in result.failures:
            say(f"  {f['run']}: {f['status']} - {f['error']}", err=True)

    emit(result.to_dict(), as_json, json_out, text)
    raise typer.Exit(result.exit_code)


@command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="Run directory written by `xbackend compare` or `xbackend codec`."),
           as_json: bool = JSON_OPT, json_out: Optional[Path] = JSON_OUT_OPT) -> None:
    """Write report.md (for an upstream issue), drift plots and bundle.tar.gz into a run directory."""
    from ..codecs.report import is_codec_run, write_codec_report
    from ..report import write_report

    apart(json_out, run_dir)
    if is_codec_run(run_dir):  # written by `xbackend codec`
        made = write_codec_report(run_dir)
        codec_data = {"schema": "xbackend.report-files/1", "markdown": str(made.markdown),
                      "plots": [str(p) for p in made.plots], "bundle": str(made.bundle),
                      "bundle_bytes": made.bundle_bytes}

        def codec_text() -> None:
            say(f"report: {made.markdown}")
            for plot in made.plots:
                say(f"plot: {plot}")
            say(f"bundle: {made.bundle} ({made.bundle_bytes / 1e6:.2f} MB)")

        emit(codec_data, as_json, json_out, codec_text)
        return

    files = write_report(run_dir)
    data = {"schema": "xbackend.report-files/1", "markdown": str(files.markdown),
            "plots": [str(p) for p in files.plots], "bundle": str(files.bundle), "bundle_bytes": files.bundle_bytes,
            "half_width": files.plan.half_width, "omitted": [str(o) for o in files.plan.omitted],
            "advisories": list(files.advisories)}

    def text() -> None:
        print_advisories(files.advisories)
        say(f"report: {files.markdown}")
        for plot in files.plots:
            say(f"plot: {plot}")
        say(f"bundle: {files.bundle} ({files.bundle_bytes / 1e6:.2f} MB; traces trimmed to "
                   f"{files.plan.half_width} steps either side of each divergence)")

    emit(data, as_json, json_out, text)
    if files.plan.omitted:
        say(f"warning: {len(files.plan.omitted)} trimmed traces left out of the bundle to stay under its "
                   "size limit (listed in report.md)", err=True)


@command()
@friendly
def check(
    baseline: Path = typer.Option(..., "--baseline", help="Baseline directory (from `xbackend baseline create`)."),
    tolerances: Optional[Path] = typer.Option(None, help="TOML file: \\[tolerances] fp32 = 1e-5 ... (tiers only)."),
    junit: Optional[Path] = typer.Option(None, "--junit", metavar="FILE", callback=_output_file,
                                         help="Write JUnit XML here (one testcase per backend and check)."),
    model: Optional[str] = typer.Option(None, help="Model to check (default: the baseline's); must match its digest."),
    seed: Optional[int] = typer.Option(None, help="Must equal the baseline's seed if given."),
    steps: Optional[int] = typer.Option(None, help="Must equal the baseline's steps if given."),
    timeout: float = TIMEOUT_OPT,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Keep the fresh run directory here (default: temporary)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Check this run directory, recorded earlier by `compare` or "
                                       "`check --out`, instead of running the backends (needs no backend installed)."),
    compile_choice: Optional[str] = typer.Option(None, "--compile", help="auto, on or off [default: the baseline's]."),
    force: bool = FORCE_OPT,
    plugin: Optional[List[Path]] = PLUGIN_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Pre-release gate: run the baseline's backends again (or read a recorded run) and hold them to its
    committed traces."""
    from ..check import load_tolerances, run_check

    apart(json_out, baseline, run)
    apart(junit, baseline, run)
    table = load_tolerances(tolerances) if tolerances else None
    progress, on_event = run_progress()
    with progress:
        result = run_check(baseline, model=model, seed=seed, steps=steps, tolerances=table, timeout=timeout,
                           plugins=tuple(str(p) for p in plugin or []), out=out, on_event=on_event, run=run,
                           force=force, compile_choice=compile_choice)
    if junit:
        from ..check import junit_xml

        write_text(junit, junit_xml(result))

    def text() -> None:
        say(result.summary_table())
        print_advisories(result.advisories)
        say(result.explanation)

    emit(result.to_dict(), as_json, json_out, text)
    raise typer.Exit(result.exit_code)


@command()
@friendly
def matrix(
    dirs: List[Path] = typer.Argument(..., help="Run directories, baselines or unpacked bundles, one per machine."),
    reference: Optional[str] = typer.Option(None, "--reference", metavar="MACHINE",
                                            help="Machine (directory name) the others are held to (default: the first)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write matrix.json, report.md and matrix.png here."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Many machines, one answer: each backend's run on every machine against the reference machine's."""
    from ..matrix import run_matrix

    result = run_matrix(dirs, reference)
    files = {}
    if out is not None:
        from ..report.matrix import write_matrix

        files = write_matrix(result, out, force=force)
    data = {**result.to_dict(), "files": {k: str(v) for k, v in files.items()}}

    def text() -> None:
        from ..report.matrix import cell_text

        rows = [[c.machine, c.backend, c.env.get("chip", "-"), cell_text(c), c.drift_text(),
                 "-" if c.group is None else str(c.group)] for c in result.cells]
        from ..report.markdown import md_table

        say(md_table(["machine", "backend", "chip", "cell", "max abs Δlogit", "group"], rows))
        for line in result.answer:
            say(line)
        print_advisories(result.advisories)
        for note in result.notes:
            say(f"note: {note}")
        for what, path in files.items():
            say(f"{what}: {path}")
        say(result.explanation)

    emit(data, as_json, json_out, text)
    raise typer.Exit(result.exit_code)


baseline_app = typer.Typer(cls=Group, no_args_is_help=True, help="Make the baselines `xbackend check` holds runs to.")
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("create", cls=Command)
@friendly
def baseline_create(
    backends: str = typer.Option(..., "--backends", "-b", help="Comma-separated specs; the first is the reference."),
    out: Path = typer.Option(..., "--out", "-o", help="Baseline directory to write (commit it)."),
    model: str = MODEL_OPT,
    prompt: Optional[str] = PROMPT_OPT,
    prompt_frames: Optional[int] = PROMPT_FRAMES_OPT,
    seed: int = SEED_OPT,
    steps: int = typer.Option(16, help="Steps of 80 ms per run (the committed traces grow with it)."),
    repeats: int = REPEATS_OPT,
    timeout: float = TIMEOUT_OPT,
    alignment: str = ALIGNMENT_OPT,
    temp_text: Optional[float] = TEMP_TEXT_OPT, top_k_text: Optional[int] = TOPK_TEXT_OPT,
    temp_audio: Optional[float] = TEMP_AUDIO_OPT, top_k_audio: Optional[int] = TOPK_AUDIO_OPT,
    compile_choice: str = COMPILE_OPT,
    force: bool = FORCE_OPT,
    plugin: Optional[List[Path]] = PLUGIN_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Run compare once and keep what `check` needs: baseline.json, prompt codes and traces."""
    from ..check import create_baseline
    from ..compare import CompareRequest

    req = CompareRequest(backends=tuple(backends.split(",")), model=model, prompt=prompt, prompt_frames=prompt_frames,
                         seed=seed, steps=steps,
                         repeats=repeats, timeout=timeout, alignment=alignment,
                         settings=settings_options(temp_text, top_k_text, temp_audio, top_k_audio),
                         plugins=tuple(str(p) for p in plugin or []), compile=compile_choice)
    progress, on_event = run_progress()
    with progress:
        made = create_baseline(req, out, on_event, force=force)

    def text() -> None:
        for v in made["expected"]["verdicts"]:
            say(f"{v['backend']}: expected verdict {v['verdict']}")
        say(f"baseline written to {out} (model {made['model']['name']} {made['model']['digest']}, "
                   f"{made['steps']} steps, seed {made['seed']})")

    emit(made, as_json, json_out, text)


@command("inspect")
@friendly
def inspect_cmd(
    trace: Path = typer.Argument(..., help="Trace directory."),
    against: Optional[Path] = typer.Option(None, help="A second trace: where they diverge and what each produced."),
    plot: Optional[Path] = typer.Option(None, help="Write an entropy plot (PNG) here."),
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
    force: bool = typer.Option(False, help="Inspect --against a trace that is not comparable (says why)."),
) -> None:
    """Entropy, repeated-token runs, n-gram loops and text padding of one trace, per stream."""
    from ..analysis.inspection import divergence, inspect_trace
    from ..report.plots import plot_inspection
    from ..store.trace import load_trace

    first = load_trace(trace)
    result = inspect_trace(first)
    data = result.to_dict()
    if against is not None:
        data["against"] = divergence(first, load_trace(against), force=force)
    at = (data.get("against") or {}).get("first_divergence")
    if plot is not None:
        plot_inspection(result, plot, at["step"] if at else None)
        data["plot"] = str(plot)
    emit(data, as_json, json_out, lambda: print_inspection(trace, against, plot, result, data))


def print_inspection(trace: Path, against: Optional[Path], plot: Optional[Path], result, data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    at = (data.get("against") or {}).get("first_divergence")
    table = Table(title=clean(f"{trace} ({result.backend}, {result.sampler}, {result.steps} steps)"))
    for col in ("stream", "entropy (nats, T=1) mean", "min-max", "longest run", "loop from step", "period", "pattern"):
        table.add_column(col, overflow="fold")
    for name, d in data["streams"].items():
        run, loop = d["longest_run"], d["loop"]
        table.add_row(name, f"{d['entropy_mean']:.3f}" if d["entropy_mean"] is not None else "-",
                      f"{d['entropy_min']:.2f}-{d['entropy_max']:.2f}" if d["entropy_mean"] is not None else "-",
                      f"{run['token']} x{run['length']} @ {run['start']}" if run else "-",
                      str(loop["start"]) if loop else "-", str(loop["period"]) if loop else "-",
                      " ".join(map(str, loop["pattern"])) if loop else "-")
    Console(markup=False, highlight=False, emoji=False).print(table)
    pad = data["text_padding"]
    if pad["ratio"] is not None:
        say(f"text padding (id {pad['id']}): {pad['ratio']:.1%} of steps (runs and loops of it are ignored)")
    from ..analysis.words import no_words_reason

    say(f"words: {data['text'] or f'(none: {no_words_reason()}, or nothing but padding)'}")
    if against is not None:
        if at is None:
            say(f"no token differs from {against} over {count(data['against']['steps_compared'], 'step')}")
        else:
            say(f"first divergence from {against}: step {at['step']}, {at['stream']} "
                       f"({at['token_a']} vs {at['token_b']}, max |Δlogit| there {_fmt(at['max_abs_there'])})")
            from ..analysis.words import MARK

            say(f"words ({MARK} marks step {at['step']}):\n  a {data['against']['words']['a'] or '-'}\n"
                       f"  b {data['against']['words']['b'] or '-'}")
            say(f"tokens from step {at['step']} on (a: {trace}, b: {against}):")
            for name, pair in data["against"]["after"].items():
                say(f"  {name:7} a {pair['a']}\n  {'':7} b {pair['b']}")
    if plot is not None:
        say(f"plot: {plot}")


@command("import")
@friendly
def import_cmd(
    path: Path = typer.Argument(..., help="A moshi-backend session .json (its .safetensors beside it), a MIMI_VERBOSE=1 "
                                         "log, or a log with per-step token lines."),
    out: Path = typer.Option(..., "--out", "-o", help="Token trace directory to write."),
    fmt: Optional[str] = typer.Option(None, "--format", help="session, verbose or lines (default: detected)."),
    seed: Optional[int] = typer.Option(None, help="Seed of both processors, for logs without a session file "
                                                  "[default: 299792458, the Rust CLI's]."),
    text_seed: Optional[int] = typer.Option(None, help="Text processor seed (overrides --seed)."),
    audio_seed: Optional[int] = typer.Option(None, help="Audio processor seed (overrides --seed)."),
    temp_text: Optional[float] = typer.Option(None, help="Text temperature [default: 0.8, the Rust CLI's]."),
    top_k_text: Optional[int] = typer.Option(None, help="Text top-k [default: 250]."),
    temp_audio: Optional[float] = typer.Option(None, help="Audio temperature [default: 0.8]."),
    top_k_audio: Optional[int] = typer.Option(None, help="Audio top-k [default: 250]."),
    acoustic_delay: Optional[int] = typer.Option(None, help="The app's acoustic delay [default: read from a "
                                                            "MIMI_VERBOSE log, else 2 as moshi-cli]."),
    text_pattern: Optional[str] = typer.Option(None, help="Regex of a text token line, groups step and token "
                                                          "[default matches 'Step 12 text token: 345']."),
    audio_pattern: Optional[str] = typer.Option(None, help="Regex of an audio token line, groups step and tokens "
                                                           "[default matches 'Step 12 audio tokens: [1, 2]']."),
    audio_layout: Optional[str] = typer.Option(None, help="frame (what State::last_audio_tokens() returns after the "
                                                          "step), sampled (the step's depformer output) or auto "
                                                          "[default: auto: frame unless there are audio lines before "
                                                          "the acoustic delay]."),
    text_vocab: Optional[int] = typer.Option(None, help="Text vocabulary of a token-line log [default: 32000]."),
    audio_vocab: Optional[int] = typer.Option(None, help="Audio vocabulary of a token-line log [default: 2048]."),
    allow_partial: bool = typer.Option(False, help="Import the complete steps of a log that ends inside a step."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Bring what a Rust Moshi app logged into xbackend as a token trace (tokens, user codes, seeds; no logits)."""
    from ..rust.logs import read_run, write_token_trace

    given = {"temp_text": temp_text, "top_k_text": top_k_text, "temp_audio": temp_audio, "top_k_audio": top_k_audio}
    options = {"settings": settings_options(temp_text, top_k_text, temp_audio, top_k_audio, "candle")
               if any(v is not None for v in given.values()) else None,
               "text_seed": text_seed if text_seed is not None else seed,
               "audio_seed": audio_seed if audio_seed is not None else seed,
               "acoustic_delay": acoustic_delay, "text_pattern": text_pattern, "audio_pattern": audio_pattern,
               "audio_layout": audio_layout, "text_vocab": text_vocab, "audio_vocab": audio_vocab,
               "allow_partial": allow_partial or None}
    run = read_run(path, fmt, **options)
    trace = write_token_trace(run, out, force=force)
    data = {"trace": str(out), "format": run.format, "source": run.source, "steps": trace.steps,
            "streams": trace.streams, "vocab": list(trace.meta["vocab"]), "text_seed": run.text_seed,
            "audio_seed": run.audio_seed, "settings": run.settings.__dict__, "settings_from": run.settings_from,
            "acoustic_delay": run.config["acoustic_delay"], "user_codebooks": int(trace.meta["n_inputs"]),
            "unknown_tokens": int((run.tokens < 0).sum()), "transcript": run.transcript, "notes": list(run.notes)}
    def text() -> None:
        say(f"imported {trace.steps} steps ({run.format}) from {path} into {out}: {len(trace.streams)} streams, "
                   f"seeds text {run.text_seed} / audio {run.audio_seed}, settings {plain(run.settings.__dict__)} "
                   f"(from {run.settings_from}), acoustic delay {run.config['acoustic_delay']}, "
                   f"{data['unknown_tokens']} unknown tokens")
        for note in run.notes:
            say(f"note: {note}")

    emit(data, as_json, json_out, text)


@command()
@friendly
def replay(
    trace: Path = typer.Argument(..., help="A token trace from `xbackend import` (or a candle capture)."),
    backend: str = typer.Option("cpu", "--backend", "-b", help="Backend spec whose logits candle's sampler replays on."),
    model: str = MODEL_OPT,
    model_config: Optional[str] = MODEL_CONFIG_OPT,
    prompt: Optional[str] = typer.Option(None, help="The app's input audio or codes, when the trace has no user codes."),
    steps: Optional[int] = typer.Option(None, help="Replay only the first N steps."),
    out: Path = typer.Option(Path("runs/replay"), "--out", "-o", help="Directory for the forced trace, replay.json, report.md."),
    compile_choice: str = COMPILE_OPT,
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
    plugin: Optional[List[Path]] = PLUGIN_OPT,
) -> None:
    """Teacher-force a backend along a Rust app's tokens; is every token what candle's sampler picks on its logits?"""
    from ..rust.replay import ReplayRequest
    from ..rust.replay import replay as run_replay

    load_plugins(plugin)
    if steps is not None and steps < 1:
        raise XBackendError(f"--steps must be at least 1, got {steps}")
    bar, update = progress_bar(f"replay on {backend}")
    with bar:
        result = run_replay(ReplayRequest(trace=str(trace), backend=backend, model=model, model_config=model_config,
                                          prompt=prompt, steps=steps, compile=compile_choice), out, progress=update,
                           force=force)
    def text() -> None:
        f = result["first_inconsistency"]
        say(f"{result['verdict']}: " + ("consistent through step " + str(result["consistent_through"]) if f is None
                                               else f"first inconsistency at step {f['step']}, {f['stream']}"))
        say(result["explanation"])
        say(f"report: {out / 'report.md'}")

    emit(result, as_json, json_out, text)
    raise typer.Exit(0 if result["verdict"] == "CONSISTENT" else 1)


@command()
@friendly
def sessions(
    directory: Path = typer.Argument(..., help="moshi-backend's log_dir (or a folder of imported token traces)."),
    as_json: bool = JSON_OPT,
    json_out: Optional[Path] = JSON_OUT_OPT,
) -> None:
    """Many sessions of the same input: distinct token sequences, where they part, transcripts, shared seeds."""
    from ..rust.sessions import survey

    data = survey(directory)
    def text() -> None:
        say(f"{data['sessions']} sessions, {data['distinct_sequences']} distinct token sequences"
                   + ("" if data["same_settings"] else " (sampling settings differ between sessions)"))
        for g in data["groups"]:
            part = g["first_parting_from_group_0"]
            where = "" if g["group"] == 0 else (
                f"; parts from group 0 at step {part['step']}, {part['stream']}" if part and part.get("stream")
                else f"; {part['why']}" if part else "")
            say(f"  group {g['group']}: {g['count']} session(s), {g['steps']} steps{where}: {', '.join(g['sessions'])}")
        for r in data["runs"]:
            say(f"  {r['name']}: group {r['group']}, seeds {r['text_seed']}/{r['audio_seed']}, "
                       + (f"transcript {r['transcript']!r}" if r["transcript"] is not None else "no transcript"))
        for s in data["shared_seeds"]:
            say(f"  same seeds {s['text_seed']}/{s['audio_seed']}: {', '.join(s['sessions'])}")

    emit(data, as_json, json_out, text)
    if data["unreadable"]:
        bad = data["unreadable"]
        raise XBackendError(f"{len(bad)} of {len(bad) + data['sessions']} files in {directory} could not be read "
                            f"(first: {bad[0]['name']}: {bad[0]['error']})",
                            fix="the others are surveyed above; repair or remove the unreadable ones")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    say(f"warning: {clean(message)}", err=True)


def take_stdout() -> None:
    """stdout carries xbackend's own output only (the result under --json): the real stdout becomes
    sys.stdout, and fd 1, where a plugin or a library may write directly, points at stderr. Lone
    surrogates and an ascii terminal print escaped, never raise."""
    import os

    if sys.stdout is None or not hasattr(sys.stdout, "fileno"):
        return
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    tty = sys.stdout.isatty()
    sys.stdout.flush()
    try:
        result = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no stdout at all: nothing to keep apart
        return
    sys.stdout = open(result, "w", encoding=encoding, errors="backslashreplace", buffering=1 if tty else -1)
    if hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(errors="backslashreplace")


def main() -> None:
    import os
    import warnings

    take_stdout()
    warnings.showwarning = _one_line_warning
    try:
        code = app(standalone_mode=False)
        sys.stdout.flush()
    except BrokenPipeError:  # `xbackend ... | head`: the reader left; nothing more to say, to anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except typer.TyperException as exc:  # usage errors (a bad option value, a missing argument): one line
        if type(exc).__name__ == "NoArgsIsHelpError":
            say(exc.format_message(), err=True)
        else:
            ctx, names = getattr(exc, "ctx", None), []
            while ctx is not None and ctx.parent is not None:  # the subcommand's path, without the program name
                names.insert(0, ctx.info_name)
                ctx = ctx.parent
            command = " ".join(names)
            message = " ".join(exc.format_message().split())
            say(f"error: {message.rstrip('.')}. Fix: see `xbackend {command + ' ' if command else ''}--help`.",
                       err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        say("error: aborted.", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
