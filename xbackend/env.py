"""Environment fingerprint (SPEC §5): what a bug report needs to reproduce a run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

PACKAGES = ("torch", "mlx", "moshi", "moshi_mlx", "numpy", "xbackend")
ENV_VARS = (
    "NO_TORCH_COMPILE", "NO_CUDA_GRAPH", "MLX_ENABLE_TF32", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "PYTORCH_ENABLE_MPS_FALLBACK",
    "MLX_DISABLE_COMPILE", "OPENBLAS_CORETYPE",
)


def package_version(name: str) -> str | None:
    """Installed version without importing the package (so torch stays unloaded)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def chip() -> str:
    """The CPU model: Apple chip name on macOS, /proc/cpuinfo on Linux."""
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
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
        **extra,
    }
