"""Backend specs: `NAME[:DEVICE][:DTYPE][:QUANT]`, parsed into a frozen value.

A quantized tier keeps its activation dtype: moshi_mlx ships bf16 weights quantized to q8/q4
(`local.py` casts to bf16, then quantizes), which is not fp32 + q8, so both stay in the label.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import XBackendError

DTYPES = ("fp32", "fp16", "bf16", "fp64")
QUANTS = ("q8", "q4")
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class BackendSpec:
    """One backend as the user named it; `str(spec)` gives the canonical text."""

    name: str
    device: str | None = None
    dtype: str = "fp32"
    quant: str | None = None

    def __str__(self) -> str:
        parts = [self.name]
        if self.device:
            parts.append(self.device)
        if self.dtype != "fp32":
            parts.append(self.dtype)
        if self.quant:
            parts.append(self.quant)
        return ":".join(parts)

    @property
    def tier(self) -> str:
        """Tolerance tier: the quantization if any, else the dtype."""
        return self.quant or self.dtype


def parse_spec(text: str) -> BackendSpec:
    """Parse a backend spec; raises `XBackendError` naming the grammar when it does not fit."""
    raw = text.strip()
    parts = [p.strip().lower() for p in raw.split(":")]
    if not raw or not parts[0] or len(parts) > 4 or any(not p for p in parts):
        raise XBackendError(
            f"Cannot read backend spec {text!r}",
            asked="the grammar is NAME[:DEVICE][:DTYPE][:QUANT], e.g. cpu, cpu:fp64, cuda:bf16, "
            "mps:fp16, mlx, mlx:cpu, mlx:gpu:bf16, mlx:q8, mlx:gpu:bf16:q8",
            fix="run `xbackend backends` to list the backends of this machine",
        )
    name, rest = parts[0], parts[1:]
    found: dict[str, str] = {}
    for i, part in enumerate(rest):
        if part in DTYPES:
            kind = "dtype"
        elif part in QUANTS:
            kind = "quant"
        elif i == 0 and (part in DEVICES or part.isdigit()):
            kind = "device"
        else:
            raise XBackendError(
                f"Unknown part {part!r} in backend spec {text!r}",
                asked=f"devices are {', '.join(DEVICES)} (or a CUDA index), dtypes "
                f"{', '.join(DTYPES)}, quantized tiers {', '.join(QUANTS)}",
                fix="write NAME[:DEVICE][:DTYPE][:QUANT], e.g. mlx:gpu:bf16:q8",
            )
        if kind in found:
            raise XBackendError(f"Backend spec {text!r} names two {kind}s ({found[kind]} and {part})",
                                fix="write NAME[:DEVICE][:DTYPE][:QUANT], each part at most once")
        found[kind] = part
    return BackendSpec(name=name, device=found.get("device"), dtype=found.get("dtype", "fp32"),
                       quant=found.get("quant"))


def parse_specs(text: str) -> list[BackendSpec]:
    """Parse a comma-separated list such as `cpu,mps,mlx`."""
    items = text.split(",")
    if not text.strip() or any(not t.strip() for t in items):
        raise XBackendError(f"Empty backend in the list {text!r}",
                            fix="separate specs by single commas, e.g. --backends cpu,mlx:cpu")
    return [parse_spec(t) for t in items]
