"""CUDA validation of the PyTorch backend (issue #6), in one process so torch loads once.

1. Bundled tiny model: the graphed device path against the eager host path on CUDA, every
   sampler mode (bitwise); CUDA run-to-run repeatability; cpu vs cuda fp32 teacher-forced drift
   and the portable free run; cuda bf16 drift against cpu fp32.
2. Moshi-7B-shaped random model: cuda fp32 reference, then the same weights in bf16: run-to-run
   repeatability, teacher-forced bf16-vs-fp32 drift, device path vs host path per mode.

    python scripts/gpu_validate.py --json $OUT/validate.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import SEED, capture_loaded, random_7b  # noqa: E402

from xbackend import CaptureRequest, Sampler, SamplingSettings, capture, create_backend  # noqa: E402
from xbackend.analysis.metrics import first_token_divergence, step_metrics  # noqa: E402
from xbackend.store.trace import Trace  # noqa: E402

MODES = ("native", "portable", "greedy", "forced")


def identical(a: Trace, b: Trace) -> dict:
    """Bitwise comparison of two traces, and where they first differ."""
    n = min(a.steps, b.steps)
    first = next((s for s in range(n) if a.digests[s] != b.digests[s]), None)
    tokens = bool(np.array_equal(a.tokens[:n], b.tokens[:n]))
    margins = bool(np.array_equal(np.asarray(a.margins[:n]).view(np.uint32), np.asarray(b.margins[:n]).view(np.uint32)))
    return {"steps": n, "logits_identical": first is None, "first_logits_difference": first,
            "tokens_identical": tokens, "margins_identical": margins,
            "identical": first is None and tokens and margins and a.steps == b.steps}


def drift(ref: Trace, other: Trace) -> dict:
    """Teacher-forced drift of `other` against `ref`: max |Δlogit| statistics, per stream and overall."""
    m = step_metrics(ref, other)
    per = {s: float(m.max_abs[:, k].max()) for k, s in enumerate(m.streams)}
    flat = m.max_abs.reshape(-1)
    return {"steps": m.steps, "max_abs": float(flat.max()), "median_step_max_abs": float(np.median(m.max_abs.max(axis=1))),
            "p99_step_max_abs": float(np.percentile(m.max_abs.max(axis=1), 99)), "per_stream_max_abs": per,
            "mean_rms": float(m.rms.mean()), "max_kl": float(m.kl.max()), "top1_agreement": float(m.top1.mean()),
            "tokens_forced_equal": bool(np.array_equal(ref.tokens[:m.steps], other.tokens[:m.steps]))}


def log(msg: str) -> None:
    print(msg, flush=True)


def tiny(work: Path, steps: int, dev: str) -> dict:
    out: dict = {"steps": steps}

    def cap(name, backend=dev, path="device", **kw):
        os.environ["XBACKEND_CAPTURE_PATH"] = path
        tr = capture(CaptureRequest(backend=backend, steps=steps, **kw), work / name)
        log(f"  tiny {name}: {tr.meta['ms_per_step']} ms/step, effective {tr.meta['effective']}")
        return tr

    # graphed device path vs eager host path
    ref = cap("host-native", path="host")
    paths = {}
    for mode in MODES:
        sampler = f"forced:{ref.path}" if mode == "forced" else mode
        host = ref if mode == "native" else cap(f"host-{mode}", path="host", sampler=sampler)
        on_device = cap(f"device-{mode}", sampler=sampler)
        paths[mode] = identical(host, on_device) | {"cuda_graphs": on_device.meta["effective"]["cuda_graphs"],
                                                    "host_ms_per_step": host.meta["ms_per_step"],
                                                    "device_ms_per_step": on_device.meta["ms_per_step"]}
        log(f"  tiny cuda {mode}: device path vs host path {paths[mode]}")
    out["device_vs_host"] = paths
    # repeatability (native, default path)
    again = cap("device-native-2")
    out["repeat_cuda_native"] = identical(load(work / "device-native"), again)
    again_p = cap("device-portable-2", sampler="portable")
    out["repeat_cuda_portable"] = identical(load(work / "device-portable"), again_p)
    # cpu vs cuda fp32
    cpu = cap("cpu-native", backend="cpu")
    cpu2 = cap("cpu-native-2", backend="cpu")
    out["repeat_cpu_native"] = identical(cpu, cpu2)
    forced = cap("cuda-forced-on-cpu", sampler=f"forced:{cpu.path}")
    out["drift_cpu_vs_cuda_fp32"] = drift(cpu, forced)
    bf16 = cap("cudabf16-forced-on-cpu", backend=f"{dev}:bf16", sampler=f"forced:{cpu.path}")
    out["drift_cpu_fp32_vs_cuda_bf16"] = drift(cpu, bf16)
    cpu_p = cap("cpu-portable", backend="cpu", sampler="portable")
    div = first_token_divergence(cpu_p, load(work / "device-portable"))
    out["portable_cpu_vs_cuda_first_divergence"] = div
    cpu_native_vs_cuda = first_token_divergence(cpu, load(work / "device-native"))
    out["native_cpu_vs_cuda_first_divergence"] = cpu_native_vs_cuda
    return out


def load(path: Path) -> Trace:
    from xbackend import load_trace

    return load_trace(path)


def seven_b(work: Path, steps: int, path_steps: int, dev: str, layers: int | None) -> dict:
    import torch

    out: dict = {"steps": steps, "path_steps": path_steps}
    os.environ.pop("XBACKEND_CAPTURE_PATH", None)
    started = time.perf_counter()
    backend = create_backend(dev)
    backend.lm, model = random_7b(dev, "fp32", layers)
    out["build_fp32_s"] = time.perf_counter() - started
    rng = np.random.default_rng(0)
    codes = rng.integers(0, int(model.config["card"]), size=(model.n_user, steps)).astype(np.int64)
    settings = SamplingSettings()

    def cap(name, mode="native", n=steps, forced=None, path=None):
        backend.path_choice = path
        sampler = Sampler(mode, SEED, settings, forced_from=forced)
        ms, tr = capture_loaded(backend, model, codes, sampler, n, work / name, warmup=min(10, n - 2))
        log(f"  7b {name}: {ms:.2f} ms/step, effective {backend.effective()}")
        return ms, tr

    ms32, ref32 = cap("fp32-native")
    out["fp32_native_ms_per_step"] = ms32
    _, ref32b = cap("fp32-native-2")
    out["repeat_fp32_native"] = identical(ref32, ref32b)
    log(f"  7b fp32 repeat: {out['repeat_fp32_native']}")
    # the same weights in bf16 (as get_moshi_lm casts a checkpoint)
    backend.lm = backend.lm.to(torch.bfloat16)
    backend.spec = dataclasses.replace(backend.spec, dtype="bf16")
    backend.label = str(backend.spec)
    if dev == "cuda":
        torch.cuda.empty_cache()
    ms16, a = cap("bf16-native")
    _, b = cap("bf16-native-2")
    out["bf16_native_ms_per_step"] = ms16
    out["repeat_bf16_native"] = identical(a, b)
    log(f"  7b bf16 repeat: {out['repeat_bf16_native']}")
    _, pa = cap("bf16-portable", "portable")
    _, pb = cap("bf16-portable-2", "portable")
    out["repeat_bf16_portable"] = identical(pa, pb)
    forced32 = str(ref32.path)  # forced runs replay the fp32 trace's tokens
    _, f16 = cap("bf16-forced-on-fp32", "forced", forced=forced32)
    out["drift_bf16_vs_fp32"] = drift(ref32, f16)
    log(f"  7b drift bf16 vs fp32: {out['drift_bf16_vs_fp32']}")
    paths = {}
    for mode in MODES:
        forced = forced32 if mode == "forced" else None
        host_ms, host = cap(f"host-{mode}", mode, n=path_steps, forced=forced, path="host")
        dev_ms, on_device = cap(f"device-{mode}", mode, n=path_steps, forced=forced, path="device")
        paths[mode] = identical(host, on_device) | {"host_ms_per_step": host_ms, "device_ms_per_step": dev_ms}
        log(f"  7b bf16 {mode}: device path vs host path {paths[mode]}")
    out["bf16_device_vs_host"] = paths
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/xbackend-validate")
    p.add_argument("--tiny-steps", type=int, default=50)
    p.add_argument("--steps-7b", type=int, default=100)
    p.add_argument("--path-steps-7b", type=int, default=40)
    p.add_argument("--skip-7b", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of this script)")
    p.add_argument("--layers-7b", type=int, default=None, help="fewer main layers (smoke tests)")
    args = p.parse_args()
    import torch

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    log(f"validate on {result['device']} (torch {result['torch']}, CUDA {result['cuda']})")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")

    try:
        result["tiny"] = tiny(work / "tiny", args.tiny_steps, args.device)
        save()
        if not args.skip_7b:
            result["7b"] = seven_b(work / "7b", args.steps_7b, args.path_steps_7b, args.device, args.layers_7b)
    finally:
        save()
    log(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
