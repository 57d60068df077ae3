"""Rows for `xbackend backends`: each spec, available or why not, device and library versions."""

from __future__ import annotations

from ..backends import create_backend
from ..env import package_version
from ..errors import XBackendError

LIBRARIES = {"torch": ("torch", "moshi"), "mlx": ("mlx", "moshi_mlx")}


def backend_rows(specs: list[str]) -> list[dict]:
    rows = []
    for text in specs:
        try:
            backend = create_backend(text)
            reason = backend.unavailable_reason()
        except XBackendError as exc:
            rows.append({"spec": text, "library": "?", "available": False, "reason": str(exc), "device": "-",
                         "versions": "-", "extra": None})
            continue
        device = "-"
        if reason is None:
            try:
                device = backend.device_name()
            except Exception as exc:  # a device query failing is itself worth showing
                reason = f"device query failed: {exc}"
        libs = LIBRARIES.get(backend.library, ())
        versions = ", ".join(f"{name} {package_version(name.replace('_', '-')) or 'missing'}" for name in libs)
        rows.append({"spec": text, "library": backend.library or "plugin", "available": reason is None,
                     "reason": reason or "", "device": device, "versions": versions or "-",
                     "extra": backend.extra or None})
    return rows
