"""Environment fingerprint (docs/design.md, Contracts): what a bug report needs to reproduce a run."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata

__version__ = "0.1.0"  # re-exported as xbackend.__version__ (pyproject.toml says the same)
PACKAGES = ("torch", "mlx", "moshi", "moshi_mlx", "numpy", "xbackend")
ENV_VARS = (
    "NO_TORCH_COMPILE", "NO_CUDA_GRAPH", "MLX_ENABLE_TF32", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "PYTORCH_ENABLE_MPS_FALLBACK",
    "MLX_DISABLE_COMPILE", "OPENBLAS_CORETYPE", "PYTORCH_MPS_FAST_MATH", "PYTORCH_MPS_PREFER_METAL",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO", "MLX_METAL_FAST_SYNCH",
)
# Found by path first: a PATH without /usr/sbin (launchd jobs, some CI shells) still finds them.
SYSCTL = ("/usr/sbin/sysctl", "/sbin/sysctl")
IOREG = ("/usr/sbin/ioreg",)


def package_version(name: str) -> str | None:
    """Installed version without importing the package (so torch stays unloaded)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _tool(paths: tuple[str, ...], name: str) -> str | None:
    return next((p for p in paths if os.path.isfile(p) and os.access(p, os.X_OK)), None) or shutil.which(name)


def _run(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def sysctl(name: str) -> str | None:
    """One sysctl value (macOS), or None when there is no sysctl or no such key."""
    exe = _tool(SYSCTL, "sysctl")
    return _run([exe, "-n", name]) if exe else None


def mac_gpu_cores() -> int | None:
    """GPU core count of an Apple-silicon Mac, from the AGX accelerator's IORegistry entry."""
    exe = _tool(IOREG, "ioreg")
    out = _run([exe, "-rc", "AGXAccelerator"]) if exe else None
    found = re.search(r'"gpu-core-count"\s*=\s*(\d+)', out or "")
    return int(found.group(1)) if found else None


def mac_info() -> dict:
    """macOS version (not the Darwin kernel's), chip, GPU cores and memory: what MPS/Metal numerics depend on."""
    memory = sysctl("hw.memsize")
    return {"macos": platform.mac_ver()[0] or None, "chip": sysctl("machdep.cpu.brand_string"),
            "gpu_cores": mac_gpu_cores(), "memory_bytes": int(memory) if (memory or "").isdigit() else None}


def chip() -> str:
    """The CPU model: Apple chip name on macOS, /proc/cpuinfo on Linux."""
    if sys.platform == "darwin":
        name = sysctl("machdep.cpu.brand_string")
        if name:
            return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(**extra) -> dict:
    """OS, chip, Python, library versions, threads and relevant variables, plus backend extras."""
    return {
        "os": f"{platform.system()} {platform.release()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "chip": chip(),
        "python": platform.python_version(),
        "versions": {name: package_version(name.replace("_", "-")) or package_version(name)
                     for name in PACKAGES},
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        **({"mac": mac_info()} if sys.platform == "darwin" else {}),
        **extra,
    }


# --------------------------------------------------------------------------- does a framework run here
# (shared by backends and codecs; the frameworks themselves are imported only inside these functions)

COMPILE_ENV = "XBACKEND_TORCH_COMPILE"  # Mimi (codecs): 1 keeps moshi's lazy torch.compile; the LM takes --compile
# --compile: auto does what the library does as it ships on that device (moshi: its lazy torch.compile
# unless NO_TORCH_COMPILE is set), on insists (an error where the library cannot), off runs eagerly.
COMPILE_CHOICES = ("auto", "on", "off")
# Run in a fresh process: mlx 0.26's Metal `is_available()` is true whenever MLX was built with
# Metal, and a process without GPU access (VM, sandbox, ssh session) aborts on the first GPU op.
GPU_PROBE = """
import json, sys, mlx.core as mx
mx.eval(mx.ones(1, stream=mx.gpu) + 1)
if "quantized" in sys.argv[1:]:  # e.g. MLX's CUDA backend 0.30 aborts: "QuantizedMatmul has no CUDA implementation"
    q = mx.quantize(mx.ones((64, 64)), group_size=64, bits=8, stream=mx.gpu)
    mx.eval(mx.quantized_matmul(mx.ones((1, 64)), *q, transpose=True, group_size=64, bits=8, stream=mx.gpu))
info = {}
for get in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
    try:
        info = dict(get())
        break
    except Exception:
        pass
name = info.get("device_name") or info.get("architecture")
if not name and getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
    name = "MLX CUDA backend"
print(json.dumps({"device_name": str(name or "gpu")}))
"""
GPU_PROBE_TIMEOUT = 60.0
_GPU_PROBES: dict[tuple[str, bool], tuple[bool, str]] = {}


def install_hint(extra: str) -> str:
    """The pip command that installs a backend's libraries: the core install has none."""
    return f"pip install 'xbackend[{extra}]'"


def mps_unavailable(torch) -> str | None:
    """Which condition for MPS fails here, in torch's and the OS's own terms, or None."""
    if torch.backends.mps.is_available():
        return None
    machine, mac = platform.machine(), platform.mac_ver()[0]
    facts = (f"torch {torch.__version__}: torch.backends.mps.is_built() {torch.backends.mps.is_built()}, "
             f"is_available() False")
    needs = "macOS 14" if _version(torch.__version__) >= (2, 9) else "macOS 13"  # pytorch#162921: 2.9+ needs Sonoma
    if sys.platform != "darwin":
        return f"MPS needs {needs} or newer on Apple silicon; this is {platform.system()} {machine} ({facts})"
    if machine != "arm64":
        return f"MPS needs Apple silicon; this Mac is {machine} ({facts})"
    if not torch.backends.mps.is_built():
        return f"this torch is built without MPS ({facts}); install the macOS arm64 wheel from PyPI"
    if mac and _version(mac) < _version(needs.split()[1]):
        return f"torch {torch.__version__} needs {needs} or newer for MPS; this is macOS {mac} ({facts})"
    return (f"macOS {mac or '?'} on {machine} with an MPS build, yet no Metal device: a virtual machine, "
            f"sandbox or remote session without GPU access ({facts})")


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def gpu_probe(quantized: bool = False) -> tuple[bool, str]:
    """(True, device name) when a GPU op (and with `quantized`, a quantized matmul) really runs in a
    fresh process, else (False, what that process said); cached per interpreter."""
    key = (sys.executable, quantized)
    if key not in _GPU_PROBES:
        argv = [sys.executable, "-c", GPU_PROBE] + (["quantized"] if quantized else [])
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=GPU_PROBE_TIMEOUT)
            if proc.returncode == 0:
                result = (True, json.loads(proc.stdout.strip().splitlines()[-1])["device_name"])
            else:
                lines = [x.strip() for x in (proc.stderr or proc.stdout).splitlines() if x.strip()]
                result = (False, f"exit code {proc.returncode}: {lines[-1][:300] if lines else 'no message'}")
        except subprocess.TimeoutExpired:
            result = (False, f"no answer in {GPU_PROBE_TIMEOUT:g} s")
        except (OSError, ValueError, KeyError, IndexError) as exc:
            result = (False, f"{type(exc).__name__}: {exc}")
        _GPU_PROBES[key] = result
    return _GPU_PROBES[key]


def metal_available(mx) -> bool:
    metal = getattr(mx, "metal", None)
    return bool(metal is not None and metal.is_available())


def mlx_unavailable(device: str | None, quantized: bool = False, label: str = "mlx") -> str | None:
    """Why MLX (on `device`: cpu, gpu, or None for its default) does not run here, or None; `label` names
    the backend or codec asked for in the message."""
    if sys.platform == "darwin" and platform.machine() != "arm64":
        return (f"MLX runs on Apple silicon only: this Mac is {platform.machine()}, for which MLX publishes "
                "no wheels (xbackend installs mlx and moshi_mlx on arm64 Macs only); use cpu here")
    try:
        import mlx.core as mx
        import moshi_mlx  # noqa: F401
    except ImportError as exc:
        return f"mlx or moshi_mlx is not installed ({exc.name}); install with `{install_hint('mlx')}`"
    if not (device == "gpu" if device is not None else mx.default_device().type == mx.gpu):
        return None
    if not mx.is_available(mx.gpu):
        return (f"MLX has no GPU here (mx.metal.is_available() is {metal_available(mx)}: Metal needs "
                "macOS on Apple silicon); use mlx:cpu here")
    ok, said = gpu_probe(quantized=quantized)
    if not ok:
        which = label if device == "gpu" else f"{label} (MLX's default device is the GPU)"
        return f"{which} does not run here: a GPU operation failed in a test process ({said}); use mlx:cpu here"
    return None
