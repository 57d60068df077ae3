"""Capture overhead, trace writing and diff speed, measured side by side in one run (issue #6).

For one model on one device it times, per step and with warm-up steps left out:

- `plain`: upstream generation as upstream runs it. PyTorch: `moshi.models.lm.LMGen.step` with its
  own sampler and CUDA graphs on where the device is CUDA, the tokens read back to the host every
  step (as moshi's server loop does before decoding them); `plain-async` reads nothing back until
  the end (the device's own pace). MLX: `moshi_mlx.models.LmGen.step` with its own samplers.
- `capture <mode>`: xbackend's capture of the same model, prompt and steps in each sampler mode
  (the device path on PyTorch: decisions on the device, one copy per step), trace written to disk.
- `host <mode>` (with --host-modes): the eager host-decision path, for reference.

then trace write throughput (TraceWriter alone, MB/s) and `diff` throughput (metrics.step_metrics
over two synthetic traces with a Moshi-7B vocabulary, beside a raw read of the same files).

torch.compile: --compile auto (the default, as xbackend's own) keeps moshi's lazy torch.compile as
moshi ships it (unless NO_TORCH_COMPILE is set), for `plain` and the captures alike; --compile off runs
both eagerly. The knobs that really took effect (what compiled, CUDA graphs) are read after the runs.

    python scripts/bench.py --model tiny --device cpu
    python scripts/bench.py --model 7b-random --device cuda --dtype bf16 --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xbackend import DEFAULT_SEED, CaptureRequest, Job, Sampler, SamplingSettings, create_backend  # noqa: E402
from xbackend.testing.bench import bench_diff  # noqa: E402
from xbackend.capture.run import LoadedBackend, run_loaded  # noqa: E402
from xbackend.capture.models import MOSHI_7B_CONFIG, ModelRef, resolve_model  # noqa: E402
from xbackend.capture.prompt import load_prompt  # noqa: E402
from xbackend.testing.traces import MOSHI_7B_VOCAB, synthetic_trace  # noqa: E402
from xbackend.store.trace import TraceWriter, load_trace  # noqa: E402

MODES = ("native", "portable", "greedy", "forced")
SEED = DEFAULT_SEED


# --- the model ------------------------------------------------------------------------------------

def random_7b(device: str, dtype: str, layers: int | None = None, seed: int = 0):
    """A Moshi-7B-shaped LMModel with random weights (no download), and its ModelRef."""
    import torch
    from moshi.models.lm import LMModel

    from xbackend.backends.torch_backend import DTYPES

    cfg = dict(MOSHI_7B_CONFIG)
    if layers:
        cfg["num_layers"] = layers
    torch.manual_seed(seed)
    lm = LMModel(**cfg, device=device, dtype=getattr(torch, DTYPES[dtype])).eval()
    ref = ModelRef(name="7b-random" + (f"-{layers}l" if layers else ""), config=cfg, weights=Path("random"),
                   digest=f"random-seed{seed}", source="random", layout="published")
    return lm, ref


def load(args):
    """(backend, model ref, user codes [n_user, steps]) with the weights loaded once for every variant."""
    spec = args.device if args.device.startswith("mlx") else f"{args.device}:{args.dtype}"
    backend = create_backend(spec)
    reason = backend.unavailable_reason()
    if reason:
        raise SystemExit(f"error: {spec} is unavailable here: {reason}")
    if args.model == "tiny":
        model = resolve_model("tiny")
        LoadedBackend(backend, model).load()
        codes = load_prompt(None, model, args.steps).codes
    elif args.model == "7b-random":
        if backend.library != "torch":
            raise SystemExit("error: --model 7b-random runs on PyTorch devices (cpu, cuda, mps)")
        backend.lm, model = random_7b(backend.device, backend.spec.dtype, args.layers)
        rng = np.random.default_rng(0)
        codes = rng.integers(0, int(model.config["card"]), size=(model.n_user, args.steps)).astype(np.int64)
    else:
        raise SystemExit(f"error: unknown model {args.model!r}: use tiny or 7b-random")
    backend.compile_choice = args.compile
    return backend, model, codes


def sync(backend) -> None:
    if backend.library == "torch" and backend.spec.name == "cuda":
        import torch

        torch.cuda.synchronize()
    elif backend.library == "torch" and backend.spec.name == "mps":
        import torch

        torch.mps.synchronize()


# --- the variants -----------------------------------------------------------------------------------

def plain_torch(backend, model, codes, args, read_back: bool, pinned: bool = False) -> float:
    """ms/step of upstream LMGen as upstream runs it (own sampler, CUDA graphs where CUDA).

    `pinned` uploads the user codes from pinned memory without blocking (upstream's loops build
    them with torch.tensor(..., device=...), which waits for the device): the device's own pace.
    """
    import torch
    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_compile

    s = SamplingSettings()
    gen = LMGen(backend.lm, use_sampling=True, temp=s.temp_audio, temp_text=s.temp_text,
                top_k=s.top_k_audio, top_k_text=s.top_k_text)
    torch.manual_seed(SEED)
    n_user = model.n_user
    job = Job(model, codes, args.steps, SEED, Sampler("native", SEED))
    cuda = backend.spec.name == "cuda"
    frames = torch.from_numpy(np.stack([job.frame(t, False) for t in range(args.steps)]))
    if pinned and cuda:
        frames = frames.pin_memory()
    marks = []
    with (contextlib.nullcontext() if backend.compile else no_compile()), gen.streaming(1), torch.no_grad():
        for t in range(args.steps):
            if pinned:
                x = frames[t].to(backend.device, non_blocking=True).view(1, n_user, 1)
            else:
                x = torch.tensor(job.frame(t, False), dtype=torch.long, device=backend.device).view(1, n_user, 1)
            out = gen.step(x)
            if read_back and out is not None:
                out.cpu()
            if t == args.warmup - 1:
                sync(backend)
            marks.append(time.perf_counter())
        sync(backend)
    return per_step(marks, args.warmup) if read_back else 1000 * (time.perf_counter() - marks[args.warmup - 1]) / (
        args.steps - args.warmup)


def per_step(marks: list[float], warmup: int) -> float:
    """ms/step from the times each step reached the host, warm-up left out.

    The last mark is left out too: the device path hands step t over after step t+1 was launched,
    which on a synchronous device (the CPU) means after step t+1 ran, so the last interval holds
    no model step there. Every other interval holds exactly one step on every device.
    """
    if len(marks) - warmup < 2:
        raise SystemExit("error: --steps must exceed --warmup by at least 2")
    return 1000 * (marks[-2] - marks[warmup - 1]) / (len(marks) - warmup - 1)


def plain_tokens(backend, model, codes, args) -> np.ndarray:
    """Tokens `[steps, streams]` that plain upstream generation samples (through LMGen's own hooks)."""
    import torch
    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_compile

    s = SamplingSettings()
    text: list = []
    audio: list = []
    gen = LMGen(backend.lm, use_sampling=True, temp=s.temp_audio, temp_text=s.temp_text, top_k=s.top_k_audio,
                top_k_text=s.top_k_text, on_text_hook=lambda t: text.append(t.clone()),
                on_audio_hook=lambda a: audio.append(a.clone()))
    torch.manual_seed(SEED)
    job = Job(model, codes, args.steps, SEED, Sampler("native", SEED))
    with (contextlib.nullcontext() if backend.compile else no_compile()), gen.streaming(1), torch.no_grad():
        for t in range(args.steps):
            gen.step(torch.tensor(job.frame(t, False), dtype=torch.long, device=backend.device).view(1, model.n_user, 1))
    return torch.cat([torch.stack(text), torch.stack(audio)[:, 0]], dim=1).cpu().numpy()


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    rows = np.flatnonzero((a != b).any(axis=1))
    return int(rows[0]) if rows.size else None


def plain_mlx(backend, model, codes, args, read_back: bool) -> float:
    import mlx.core as mx
    from moshi_mlx.models import LmGen
    from moshi_mlx.utils.sampling import Sampler as MlxSampler

    s = SamplingSettings()
    vocab = model.vocab

    def sampler(temp, k, v):
        return MlxSampler(temp=temp, top_k=k if 0 < k < v else None, top_p=0.0)

    for cache in backend.lm.transformer_cache:
        cache.reset()
    gen = LmGen(backend.lm, max_steps=args.steps + 2, text_sampler=sampler(s.temp_text, s.top_k_text, vocab[0]),
                audio_sampler=sampler(s.temp_audio, s.top_k_audio, vocab[1]))
    mx.random.seed(SEED)
    job = Job(model, codes, args.steps, SEED, Sampler("native", SEED))
    marks = []
    for t in range(args.steps):
        gen.step(mx.array(job.frame(t, True).astype(np.int32)).reshape(1, model.n_user))
        if read_back or t == args.warmup - 1:
            mx.eval(gen.gen_sequence)
        marks.append(time.perf_counter())
    mx.eval(gen.gen_sequence)
    return per_step(marks, args.warmup) if read_back else 1000 * (time.perf_counter() - marks[args.warmup - 1]) / (
        args.steps - args.warmup)


def capture_loaded(backend, model, codes, sampler: Sampler, steps: int, out: Path,
                   warmup: int = 0) -> tuple[float, object]:
    """Capture with an already loaded backend through xbackend's own `run_loaded`, trace written.

    The user codes are saved beside `out` and given as the prompt; a forced sampler names the
    trace it replays in `forced_from`. Returns (ms/step after the warm-up steps, the trace). Steps
    are timed by when they reach the trace (`per_step`), as a real capture writes them.
    """
    prompt = out.parent / f"{out.name}-codes.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(prompt, codes[:, :max(steps, 1)])
    mode = f"forced:{sampler.forced_from}" if sampler.mode == "forced" else sampler.mode
    req = CaptureRequest(backend=backend.label, sampler=mode, seed=sampler.seed, steps=steps, prompt=str(prompt),
                         settings=sampler.settings, compile=backend.compile_choice)
    marks: list[float] = []
    started = time.perf_counter()
    trace = run_loaded(LoadedBackend(backend, model, loaded=True), req, out,
                       progress=lambda done, total: marks.append(time.perf_counter()))
    prompt.unlink()
    if warmup == 0:
        return 1000 * (marks[-1] - started) / steps, trace
    return per_step(marks, warmup), trace


def variants(args, library: str) -> list[str]:
    plain = ["plain", "plain-async"] + (["plain-pinned"] if library == "torch" else [])
    return plain + [f"capture {m}" for m in args.modes]


def run_variant(name, backend, model, codes, args, forced, work: Path) -> float:
    plain = plain_mlx if backend.library == "mlx" else plain_torch
    if name == "plain":
        return plain(backend, model, codes, args, read_back=True)
    if name == "plain-async":
        return plain(backend, model, codes, args, read_back=False)
    if name == "plain-pinned":
        return plain_torch(backend, model, codes, args, read_back=False, pinned=True)
    kind, mode = name.split()
    if backend.library == "torch":
        backend.path_choice = "host" if kind == "host" else None
    sampler = Sampler(mode, SEED, SamplingSettings(), forced_from=str(forced) if mode == "forced" else None)
    out = work / name.replace(" ", "-")
    ms, trace = capture_loaded(backend, model, codes, sampler, args.steps, out, args.warmup)
    shutil.rmtree(out, ignore_errors=True)
    return ms


def timed(name, r, *args) -> float:
    """One timed variant; a failure is printed and recorded as NaN, so the other figures still come."""
    try:
        ms = run_variant(name, *args)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
        print(f"  round {r + 1}: {name:<18} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return float("nan")
    print(f"  round {r + 1}: {name:<18} {ms:9.3f} ms/step", flush=True)
    return ms


# --- trace writing and diff ---------------------------------------------------------------------------

def bench_write(vocab: list[int], steps: int, work: Path) -> dict:
    """TraceWriter alone: MB/s of logits written (with digests and flushes), fresh rows every step."""
    rng = np.random.default_rng(0)
    rows = [[rng.standard_normal(v, dtype=np.float32) for v in vocab] for _ in range(8)]
    out = work / "write"
    writer = TraceWriter(out, {"bench": "write"}, [f"s{k}" for k in range(len(vocab))], vocab, n_inputs=8)
    inputs = np.zeros(8, dtype=np.int64)
    start = time.perf_counter()
    for t in range(steps):
        writer.write_step(rows[t % 8], [0] * len(vocab), [0.0] * len(vocab), inputs)
    elapsed = time.perf_counter() - start
    writer.close()
    shutil.rmtree(out, ignore_errors=True)
    nbytes = steps * 4 * sum(vocab)
    return {"steps": steps, "bytes_per_step": 4 * sum(vocab), "mb_s": nbytes / elapsed / 1e6,
            "ms_per_step": 1000 * elapsed / steps}


def bench_diff_traces(steps: int, work: Path) -> dict:
    """bench.bench_diff on two synthetic 7B-vocabulary traces (cold reads where the OS allows)."""
    a_path, b_path = work / "diff-a", work / "diff-b"
    start = time.perf_counter()
    for path, noise, noise_seed in ((a_path, 0.0, None), (b_path, 1e-3, 7)):
        done = path.is_dir() and (load_trace(path).steps == steps if (path / "meta.json").is_file() else False)
        if not done:
            synthetic_trace(path, steps=steps, vocab=MOSHI_7B_VOCAB, seed=1, noise=noise, noise_seed=noise_seed)
    made_s = time.perf_counter() - start
    a, b = load_trace(a_path), load_trace(b_path)
    result = bench_diff(a, b).to_dict()
    result["vocab"] = list(MOSHI_7B_VOCAB)
    result["synthetic_write_s"] = made_s
    return result


# --- report -------------------------------------------------------------------------------------------

def describe(backend, args) -> dict:
    info = {"model": args.model + (f" ({args.layers} layers)" if args.layers else ""), "backend": backend.label,
            "device": backend.device_name(), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "compile": args.compile}
    if backend.library == "torch":
        import torch

        info.update(torch=torch.__version__, threads=torch.get_num_threads(), effective=backend.effective())
    else:
        import mlx.core as mx

        info.update(mlx=mx.__version__, effective=backend.effective())
    return info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (bundled) or 7b-random (Moshi-7B shape, random weights)")
    p.add_argument("--layers", type=int, default=None, help="7b-random only: fewer main layers (smoke tests)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, mlx, mlx:cpu, mlx:gpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "fp64"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (CUDA graphs are captured in step 1)")
    p.add_argument("--rounds", type=int, default=2, help="each variant runs this many times, order rotated; medians reported")
    p.add_argument("--modes", default=",".join(MODES), help="capture sampler modes, comma-separated")
    p.add_argument("--host-modes", default="", help="also time the eager host path in these modes (PyTorch)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="auto: moshi's lazy torch.compile as it ships (plain and capture alike); off: eager")
    p.add_argument("--write-steps", type=int, default=500, help="steps of the trace-write benchmark (0: skip)")
    p.add_argument("--diff-steps", type=int, default=3750, help="steps of each diff trace, 7B vocab (0: skip)")
    p.add_argument("--work", default=None, help="folder for traces (default: a temporary one)")
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    host_modes = [m for m in args.host_modes.split(",") if m]
    for m in args.modes + host_modes:
        if m not in MODES:
            raise SystemExit(f"error: unknown mode {m!r}: available are {', '.join(MODES)}")
    if not 0 < args.warmup < args.steps - 1:
        raise SystemExit("error: --warmup must be between 1 and --steps - 2")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="xbackend-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    backend, model, codes = load(args)
    info = describe(backend, args)
    print(f"bench: {info['model']} on {info['backend']} ({info['device']}), {args.steps} steps "
          f"({args.warmup} warm-up left out), {args.rounds} rounds, --compile {args.compile}", flush=True)
    # A first native capture warms everything up (allocator, kernels, handles) and gives the
    # tokens that forced mode replays.
    _, source = capture_loaded(backend, model, codes, Sampler("native", SEED), args.steps, work / "source")
    forced = source.path  # the trace that forced mode replays
    if backend.library == "torch":
        # Upstream's own tokens, twice: capture native must give them, as far as upstream repeats itself.
        first, second = plain_tokens(backend, model, codes, args), plain_tokens(backend, model, codes, args)
        native = np.asarray(source.tokens, dtype=np.int64)
        info["native_vs_upstream"] = {"steps": args.steps, "capture_vs_upstream": first_difference(native, first),
                                      "upstream_vs_upstream": first_difference(first, second)}
        print(f"first differing step of sampled tokens, same seed ({args.steps} steps; None: identical): "
              f"capture native vs plain upstream {info['native_vs_upstream']['capture_vs_upstream']}, "
              f"plain upstream run to run {info['native_vs_upstream']['upstream_vs_upstream']}", flush=True)
    names = variants(args, backend.library)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(name, r, backend, model, codes, args, forced, work))
    for m in host_modes:
        name = f"host {m}"
        times[name] = [timed(name, 0, backend, model, codes, args, forced, work)]
    if backend.library == "torch":
        backend.path_choice = None
    info["effective"] = backend.effective()  # after the runs: what really compiled is known only now

    def median(name: str) -> float:
        values = [v for v in times.get(name, []) if v == v]
        return statistics.median(values) if values else float("nan")

    plain, pinned = median("plain"), median("plain-pinned")
    rows = []
    for name, values in times.items():
        ms = median(name)
        rows.append({"variant": name, "ms_per_step": ms, "runs": values, "overhead_vs_plain": ms / plain - 1,
                     "overhead_vs_plain_pinned": ms / pinned - 1})
    result = {"info": info, "variants": rows}
    if args.write_steps:
        result["trace_write"] = bench_write(model.vocab, args.write_steps, work)
    if args.diff_steps:
        result["diff"] = bench_diff_traces(args.diff_steps, work)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)

    library = f"torch {info['torch']}" if "torch" in info else f"mlx {info.get('mlx')}"
    print(f"\n{info['device']} | {info['model']} {backend.spec.tier} | {library} | "
          f"--compile {args.compile} | effective after the runs {info.get('effective', {})}")
    print(f"{'variant':<20} {'ms/step':>10} {'vs plain':>9} {'vs pinned':>9}   runs")
    for row in rows:
        vs = [f"{100 * row[k]:+.1f}%" if row[k] == row[k] else "-" for k in ("overhead_vs_plain", "overhead_vs_plain_pinned")]
        print(f"{row['variant']:<20} {row['ms_per_step']:10.3f} {vs[0]:>9} {vs[1]:>9}   "
              + " ".join(f"{x:.3f}" for x in row["runs"]))
    if "trace_write" in result:
        w = result["trace_write"]
        print(f"trace write: {w['bytes_per_step'] / 1e3:.0f} kB/step, {w['mb_s']:.0f} MB/s "
              f"({w['ms_per_step']:.3f} ms/step, {w['steps']} steps)")
    if "diff" in result:
        d = result["diff"]
        print(f"diff: 2 x {d['steps']} steps, 7B vocab: {d['steps_per_s']:.0f} steps/s, {d['diff_mb_s']:.0f} MB/s; "
              f"raw read {d['read_mb_s']:.0f} MB/s (diff/read {d['ratio']:.2f}, cold {d['cold']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
