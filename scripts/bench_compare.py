"""A real-size `xbackend compare`: a Moshi-7B-layout checkpoint, run through the CLI, timed (issue #13).

It writes a checkpoint directory as Kyutai publishes one (config.json naming its files, the LM in
the published layout in bf16, a Mimi codec file), with random weights, on the local disk of the
machine it runs on (never into the repository); then runs `xbackend compare` on it in a
subprocess, as a user would, and prints where the time went against the target

    wall <= 1.15 x (model steps + one model load per backend)

with the loads, the run directory's size and the trace bytes per step. The anchor is measured in the
same run: plain upstream (`get_moshi_lm`, then `LMGen.step` as moshi ships it: its lazy torch.compile
unless NO_TORCH_COMPILE is set, CUDA graphs, its own sampler, tokens read back every step) in a process
of its own, one load and two runs of --steps (the first holds the compile and graph warm-up). Upstream's
work for the compare is then one load and one first run per backend plus a warm run for every other run,
and the script prints compare wall / that.

    python scripts/bench_compare.py --dir /tmp/xb-7b --backends cuda:bf16,cuda:bf16 --steps 600
    python scripts/bench_compare.py --tiny --backends cpu,mlx:cpu         # the bundled demo, here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 1.15


def make_checkpoint(directory: Path, device: str, dtype: str, seed: int, layers: int | None) -> dict:
    """config.json + model.safetensors (published layout) + Mimi, all random; returns what it made."""
    import torch
    from moshi.models.lm import LMModel
    from moshi.models.loaders import get_mimi
    from safetensors.torch import save_file

    from xbackend.backends.torch_backend import DTYPES
    from xbackend.capture.models import MIMI_NAME, MOSHI_7B_CONFIG, to_published_layout

    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg = dict(MOSHI_7B_CONFIG)
    if layers:
        cfg["num_layers"] = layers
    torch.manual_seed(seed)
    with torch.no_grad():
        lm = LMModel(**cfg, device=device, dtype=getattr(torch, DTYPES[dtype]))
        state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
        state = to_published_layout(state, lambda parts, axis: torch.cat(parts, dim=axis))
        state = {k: v.cpu().contiguous() for k, v in state.items()}
    del lm
    params = sum(v.numel() for v in state.values())
    save_file(state, str(directory / "model.safetensors"))
    del state
    mimi = get_mimi(None, device="cpu")
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(directory / MIMI_NAME))
    config = dict(cfg, moshi_name="model.safetensors", mimi_name=MIMI_NAME)
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"dir": str(directory), "parameters": params, "dtype": dtype, "layers": cfg["num_layers"],
            "bytes": sum(p.stat().st_size for p in directory.iterdir() if p.is_file()),
            "made_s": round(time.perf_counter() - started, 2)}


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def trace_bytes(run: Path) -> dict:
    """Bytes per step of the traces (all files, and logits alone), over every run of the compare."""
    steps = total = logits = 0
    dtypes = set()
    for meta_file in (run / "traces").glob("*/*/meta.json"):
        meta = json.loads(meta_file.read_text())
        steps += int(meta.get("steps") or 0)
        dtypes.add(meta.get("logits_dtype"))
        for f in meta_file.parent.iterdir():
            total += f.stat().st_size
            logits += f.stat().st_size if f.name.startswith("logits-") else 0
    return {"steps": steps, "bytes_per_step": total / steps if steps else None,
            "logits_bytes_per_step": logits / steps if steps else None, "logits_dtypes": sorted(map(str, dtypes))}


def plain_upstream(directory: Path, device: str, dtype: str, steps: int, seed: int = 0) -> dict:
    """Upstream's own cost on this checkpoint: one load, then two runs of `steps` (seconds each)."""
    import numpy as np
    import torch
    from moshi.models.lm import LMGen
    from moshi.models.loaders import get_moshi_lm

    from xbackend.backends.torch_backend import DTYPES
    from xbackend.capture.models import NON_LM_KEYS

    raw = json.loads((directory / "config.json").read_text())
    config = {k: v for k, v in raw.items() if k not in NON_LM_KEYS}
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    started = time.perf_counter()
    lm = get_moshi_lm(directory / raw["moshi_name"], lm_kwargs=config, device=device,
                      dtype=getattr(torch, DTYPES[dtype]))
    sync()
    load_s = time.perf_counter() - started
    n_user = lm.n_q - lm.dep_q
    codes = np.random.default_rng(seed).integers(0, lm.card, size=(steps, n_user))
    runs = []
    for r in range(2):
        gen = LMGen(lm, use_sampling=True, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
        torch.manual_seed(seed + r)
        began = time.perf_counter()
        with gen.streaming(1), torch.no_grad():
            for t in range(steps):
                out = gen.step(torch.tensor(codes[t], dtype=torch.long, device=device).view(1, n_user, 1))
                if out is not None:
                    out.cpu()  # the tokens reach the host every step, as moshi's server loop reads them
        sync()
        runs.append(time.perf_counter() - began)
    from xbackend.backends.torch_backend import compiled_by_moshi

    return {"load_s": round(load_s, 3), "first_run_s": round(runs[0], 3), "warm_run_s": round(runs[1], 3),
            "ms_per_step_warm": round(1000 * runs[1] / steps, 3), "steps": steps,
            "compiled": compiled_by_moshi(), "no_torch_compile": os.environ.get("NO_TORCH_COMPILE")}


def anchor(args, directory: Path) -> dict:
    """plain_upstream in a subprocess of its own (its GPU memory is gone before the compare starts)."""
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from scripts.bench_compare import plain_upstream; "
            "print(json.dumps(plain_upstream(Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(directory), args.device, args.dtype,
                           str(args.steps)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def upstream_work(plain: dict, runs: int, backends: int) -> float:
    """Upstream's seconds for the compare's runs: per backend one load and one first (warm-up) run, warm runs after."""
    return backends * (plain["load_s"] + plain["first_run_s"]) + max(runs - backends, 0) * plain["warm_run_s"]


def run_compare(args, model: str, out: Path) -> dict:
    profile = ["-m", "cProfile", "-o", f"{args.profile}.prof"] if args.profile else []
    cmd = [sys.executable, *profile, "-m", "xbackend", "compare", "--backends", args.backends, "--model", model,
           "--steps", str(args.steps), "--out", str(out), *args.extra.split()]
    if out.exists():
        shutil.rmtree(out)
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, COLUMNS="160"))
    wall = time.perf_counter() - started
    print(proc.stdout[-6000:], flush=True)
    if proc.returncode not in (0, 1):
        print(proc.stderr[-3000:], flush=True)
    if args.profile and Path(f"{args.profile}.prof").is_file():
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(f"{args.profile}.prof", stream=text).sort_stats("cumulative").print_stats(45)
        Path(args.profile).write_text(text.getvalue())
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    t = report.get("timing", {})
    n_backends = len(args.backends.split(","))
    loads = t.get("loads") or 0
    one_load = (t.get("model_load_s", 0.0) / loads) if loads else 0.0
    budget = (t.get("model_steps_s", 0.0) + n_backends * one_load)
    return {"exit": proc.returncode, "wall_s": round(wall, 2), "timing": t, "backends": n_backends,
            "one_load_s": round(one_load, 2), "ratio": round(wall / budget, 3) if budget else None,
            "ratio_in_report": round(t["wall_s"] / budget, 3) if budget and "wall_s" in t else None,
            "run_dir_bytes": size_of(out) if out.exists() else None, "traces": trace_bytes(out) if out.exists() else {},
            "stderr_tail": proc.stderr[-400:]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/xbackend-7b", help="where to write the checkpoint (local disk)")
    p.add_argument("--tiny", action="store_true", help="use the bundled tiny model instead of making a checkpoint")
    p.add_argument("--keep", action="store_true", help="reuse a checkpoint already in --dir")
    p.add_argument("--device", default="cuda", help="where the random weights are made")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--layers", type=int, default=None, help="fewer main layers (smoke tests)")
    p.add_argument("--backends", default="cuda:bf16,cuda:bf16")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=1, help="run the compare this many times")
    p.add_argument("--out", default="/tmp/xbackend-7b-run")
    p.add_argument("--extra", default="", help="more compare arguments, e.g. '--arbiter none'")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, help="profile the compare command (its own process) into this file")
    p.add_argument("--no-anchor", action="store_true", help="skip plain upstream's anchor")
    args = p.parse_args(argv)
    result: dict = {"args": vars(args)}
    if args.tiny:
        model = "tiny"
    else:
        directory = Path(args.dir)
        if not (args.keep and (directory / "config.json").is_file()):
            result["checkpoint"] = make_checkpoint(directory, args.device, args.dtype, 0, args.layers)
            c = result["checkpoint"]
            print(f"checkpoint: {c['parameters'] / 1e9:.2f}B parameters, {c['bytes'] / 1e9:.2f} GB in {c['dir']}, "
                  f"made in {c['made_s']} s", flush=True)
        model = str(directory)
    if not args.tiny and not args.no_anchor:
        result["upstream"] = plain = anchor(args, Path(args.dir))
        if "error" in plain:
            print(f"plain upstream failed: {plain['error']}", flush=True)
        else:
            print(f"plain upstream: load {plain['load_s']} s, first run {plain['first_run_s']} s, warm run "
                  f"{plain['warm_run_s']} s ({plain['ms_per_step_warm']} ms/step; compiled {plain['compiled']})",
                  flush=True)
    result["rounds"] = []
    for r in range(args.rounds):
        res = run_compare(args, model, Path(args.out))
        result["rounds"].append(res)
        t, tr = res["timing"], res["traces"]
        print(f"round {r + 1}: exit {res['exit']}; wall {res['wall_s']:.1f} s (report {t.get('wall_s')} s); "
              f"model steps {t.get('model_steps_s')} s over {t.get('runs')} runs; {t.get('loads')} loads "
              f"{t.get('model_load_s')} s ({res['one_load_s']} s each); other {t.get('other_s')} s "
              f"(worker processes {t.get('workers_s')} s, of which {t.get('worker_overhead_s')} s start-up and exit)",
              flush=True)
        print(f"  wall / (model steps + {res['backends']} x one load) = {res['ratio']} (target <= {TARGET}; "
              f"{res['ratio_in_report']} by the report's own wall clock)", flush=True)
        plain = result.get("upstream") or {}
        if "load_s" in plain and t.get("runs"):
            work = upstream_work(plain, int(t["runs"]), res["backends"])
            res["upstream_work_s"], res["ratio_to_upstream"] = round(work, 2), round(res["wall_s"] / work, 3)
            print(f"  wall / plain upstream's work for {t['runs']} runs and {res['backends']} loads "
                  f"({work:.1f} s, measured in this run) = {res['ratio_to_upstream']} (target <= {TARGET})", flush=True)
        if res["run_dir_bytes"] is not None:
            bps = tr.get("bytes_per_step")
            print(f"  run directory {res['run_dir_bytes'] / 1e6:.1f} MB; traces {tr['steps']} steps, "
                  f"{(bps or 0) / 1e3:.1f} kB/step ({(tr.get('logits_bytes_per_step') or 0) / 1e3:.1f} kB of logits, "
                  f"stored as {', '.join(tr['logits_dtypes'])})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
