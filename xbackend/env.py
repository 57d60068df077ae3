"""Environment fingerprint (docs/design.md, Contracts): what a bug report needs to reproduce a run."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata

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
