"""MLX's GPU code paths on whatever GPU MLX has here (Metal on a Mac, MLX's CUDA backend elsewhere).

What it exercises: device recording (`loaded_on`, `ran_on`, device name, allocator memory), the
deferred native path (async evaluation, one `mx.eval` per step), device switching between `mlx:cpu`
and `mlx:gpu` in one process, the quantized and bf16 GPU kernels, and run-to-run repeatability.
Every figure is measured on the bundled tiny model; it prints one line per check and writes --json.

    python scripts/mlx_gpu_probe.py --steps 100 --json probe.json
    MLX_DISABLE_COMPILE=1 python scripts/mlx_gpu_probe.py --cpu-tiers --json probe-nocompile.json
    MLX_ENABLE_TF32=0 python scripts/mlx_gpu_probe.py --only fp32 --json probe-notf32.json

Drift is max |Δlogit| over all streams and steps, teacher-forced on PyTorch `cpu`'s native tokens,
against PyTorch `cpu` fp32 (and, with --cpu-tiers, against the same tier on `mlx:cpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xbackend import CaptureRequest, XBackendError, capture, create_backend  # noqa: E402
from xbackend.backends.mlx_backend import gpu_probe, tf32_enabled  # noqa: E402

TIERS = ("mlx:gpu", "mlx:gpu:bf16", "mlx:gpu:q8", "mlx:gpu:q4", "mlx:gpu:bf16:q8")


def drift(a, b) -> float:
    n = min(a.steps, b.steps)
    return float(max(np.abs(a.logits(s)[:n] - b.logits(s)[:n]).max() for s in a.streams))


def first_token_difference(a, b) -> int | None:
    n = min(a.steps, b.steps)
    rows = np.nonzero((a.tokens[:n] != b.tokens[:n]).any(axis=1))[0]
    return int(rows[0]) if rows.size else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", choices=("all", "fp32"), default="all")
    ap.add_argument("--cpu-tiers", action="store_true", help="also run mlx:cpu and each quantized tier on the CPU")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import mlx.core as mx

    out: dict = {"mlx": mx.__version__, "default_device": str(mx.default_device()),
                 "is_available_gpu": bool(mx.is_available(mx.gpu)), "probe": list(gpu_probe()),
                 "probe_quantized": list(gpu_probe(quantized=True)),
                 "MLX_ENABLE_TF32": tf32_enabled(), "MLX_DISABLE_COMPILE": os.environ.get("MLX_DISABLE_COMPILE"),
                 "steps": args.steps,
                 "unavailable": {s: create_backend(s).unavailable_reason() for s in ("mlx", "mlx:gpu", "mlx:cpu")}}
    out["unavailable"]["mlx:gpu:q8"] = create_backend("mlx:gpu:q8").unavailable_reason()
    print(json.dumps({k: out[k] for k in ("mlx", "default_device", "probe", "probe_quantized", "MLX_ENABLE_TF32",
                                          "unavailable")}))
    work = Path(tempfile.mkdtemp(prefix="mlx-gpu-probe-"))

    def run(name: str, **kw):
        t = time.perf_counter()
        tr = capture(CaptureRequest(steps=args.steps, **kw), work / name)
        e, m = tr.meta["effective"], tr.meta
        row = {"backend": m["backend"], "status": m["status"], "device": e.get("device"), "loaded_on": e.get("loaded_on"),
               "ran_on": e.get("ran_on"), "env_device": m["env"]["device"], "memory_bytes": e.get("device_memory_active_bytes"),
               "first_step_ms": m.get("first_step_ms"), "ms_per_step": m.get("ms_per_step"), "wall_s": round(time.perf_counter() - t, 2)}
        return tr, row

    ref, _ = run("cpu-native", backend="cpu")
    forced = f"forced:{ref.path}"
    if args.cpu_tiers:
        cpu_fp32, row = run("mlx-cpu", backend="mlx:cpu", sampler=forced)
        row["max_drift_vs_torch_cpu"] = drift(cpu_fp32, ref)
        out["mlx_cpu_forced"] = row
        print("mlx:cpu", json.dumps(row))
    out["tiers"] = {}
    for spec in TIERS[:1] if args.only == "fp32" else TIERS:
        try:
            tr, row = run(spec.replace(":", "-"), backend=spec, sampler=forced)
        except XBackendError as exc:
            out["tiers"][spec] = {"error": str(exc)}
            print(spec, "failed:", exc)
            continue
        row["max_drift_vs_torch_cpu"] = drift(tr, ref)
        if args.cpu_tiers:  # the same tier on the CPU: what the GPU kernels alone add
            same, _ = run(spec.replace("gpu", "cpu").replace(":", "-"), backend=spec.replace("gpu", "cpu"), sampler=forced)
            row["max_drift_vs_same_tier_on_cpu"] = drift(tr, same)
        out["tiers"][spec] = row
        print(spec, json.dumps(row))
    if args.only == "all" and out["probe"][0]:
        a, row_a = run("gpu-native-a", backend="mlx:gpu")
        b, _ = run("gpu-native-b", backend="mlx:gpu")
        out["native_repeat"] = {"digests_equal_steps": int(sum(x == y for x, y in zip(a.digests, b.digests))),
                                "first_token_difference": first_token_difference(a, b), "first_run": row_a}
        if args.cpu_tiers:
            c, _ = run("cpu-native-mlx", backend="mlx:cpu")
            out["native_gpu_vs_cpu_first_token_difference"] = first_token_difference(a, c)
        p_cpu, _ = run("cpu-portable", backend="cpu", sampler="portable")
        p_gpu, _ = run("gpu-portable", backend="mlx:gpu", sampler="portable")
        out["portable_vs_torch_cpu"] = {"first_token_difference": first_token_difference(p_cpu, p_gpu)}
        d, row_d = run("default", backend="mlx", sampler="greedy")
        out["default_device_run"] = row_d
        print("native repeat", json.dumps(out["native_repeat"]))
        print("portable", json.dumps(out["portable_vs_torch_cpu"]), "default", json.dumps(row_d))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
