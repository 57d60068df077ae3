"""Backend specs: `NAME[:DEVICE][:DTYPE or QUANT]` (SPEC §1), parsed into a frozen value."""

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
        if self.quant:
            parts.append(self.quant)
        elif self.dtype != "fp32":
            parts.append(self.dtype)
        return ":".join(parts)

    @property
    def tier(self) -> str:
        """Tolerance tier: the quantization if any, else the dtype."""
        return self.quant or self.dtype


def parse_spec(text: str) -> BackendSpec:
    """Parse a backend spec; raises `XBackendError` naming the grammar when it does not fit."""
    raw = text.strip()
    parts = [p.strip().lower() for p in raw.split(":")]
    if not raw or not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise XBackendError(
            f"Cannot read backend spec {text!r}",
            asked="the grammar is NAME[:DEVICE][:DTYPE or QUANT], e.g. cpu, cpu:fp64, cuda:bf16, "
            "mps:fp16, mlx, mlx:cpu, mlx:gpu:bf16, mlx:q8",
            fix="run `xbackend backends` to list the backends of this machine",
        )
    name, rest = parts[0], parts[1:]
    device, dtype, quant = None, "fp32", None
    for i, part in enumerate(rest):
        if part in DTYPES:
            dtype = part
        elif part in QUANTS:
            quant = part
        elif i == 0 and (part in DEVICES or part.isdigit()):
            device = part
        else:
            raise XBackendError(
                f"Unknown part {part!r} in backend spec {text!r}",
                asked=f"devices are {', '.join(DEVICES)} (or a CUDA index), dtypes "
                f"{', '.join(DTYPES)}, quantized tiers {', '.join(QUANTS)}",
                fix="write NAME[:DEVICE][:DTYPE or QUANT], e.g. mlx:cpu:bf16",
            )
    return BackendSpec(name=name, device=device, dtype=dtype, quant=quant)


def parse_specs(text: str) -> list[BackendSpec]:
    """Parse a comma-separated list such as `cpu,mps,mlx`."""
    items = text.split(",")
    if not text.strip() or any(not t.strip() for t in items):
        raise XBackendError(f"Empty backend in the list {text!r}",
                            fix="separate specs by single commas, e.g. --backends cpu,mlx:cpu")
    return [parse_spec(t) for t in items]
