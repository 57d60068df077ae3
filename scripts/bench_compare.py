"""A real-size `xbackend compare`: a Moshi-7B-layout checkpoint, run through the CLI, timed (issue #13).

It writes a checkpoint directory as Kyutai publishes one (config.json naming its files, the LM in
the published layout in bf16, a Mimi codec file), with random weights, on the local disk of the
machine it runs on (never into the repository); then runs `xbackend compare` on it in a
subprocess, as a user would, and prints where the time went against the target

    wall <= 1.15 x (model steps + one model load per backend)

with the loads, the run directory's size and the trace bytes per step.

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
