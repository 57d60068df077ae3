"""Backend and codec specs: `NAME[:DEVICE][:DTYPE][:QUANT]` (docs/design.md, Words), parsed into a frozen value.

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
        return tier_name(self.dtype, self.quant)


def tier_name(dtype: str | None, quant: str | None) -> str:
    """The one tier rule (`tolerances.TOLERANCES` keys): the quantization if any, else the dtype (fp32 when neither)."""
    return str(quant or dtype or "fp32")


@dataclass(frozen=True)
class Grammar:
    """What a spec names (backends, codecs): its device words, examples and the option that takes a list."""

    what: str = "backend"
    devices: tuple[str, ...] = DEVICES
    examples: str = "cpu, cpu:fp64, cuda:bf16, mps:fp16, mlx, mlx:cpu, mlx:gpu:bf16, mlx:q8, mlx:gpu:bf16:q8"
    option: str = "--backends cpu,mlx:cpu"


BACKENDS = Grammar()


def parse_spec(text: str, grammar: Grammar = BACKENDS) -> BackendSpec:
    """Parse a `NAME[:DEVICE][:DTYPE][:QUANT]` spec; raises `XBackendError` naming the grammar when it does not fit."""
    raw = text.strip()
    parts = [p.strip().lower() for p in raw.split(":")]
    what, devices = f"{grammar.what} spec", grammar.devices
    if not raw or not parts[0] or len(parts) > 4 or any(not p for p in parts):
        raise XBackendError(
            f"Cannot read {what} {text!r}",
            asked=f"the grammar is NAME[:DEVICE][:DTYPE][:QUANT], e.g. {grammar.examples}",
            fix="run `xbackend backends` to list the backends of this machine" if grammar is BACKENDS
            else f"write e.g. {grammar.option.split()[-1]}",
        )
    name, rest = parts[0], parts[1:]
    found: dict[str, str] = {}
    for i, part in enumerate(rest):
        if part in DTYPES:
            kind = "dtype"
        elif part in QUANTS:
            kind = "quant"
        elif i == 0 and (part in devices or part.isdigit()):
            kind = "device"
        else:
            raise XBackendError(
                f"Unknown part {part!r} in {what} {text!r}",
                asked=f"devices are {', '.join(devices)} (or a CUDA index), dtypes "
                f"{', '.join(DTYPES)}, quantized tiers {', '.join(QUANTS)}",
                fix="write NAME[:DEVICE][:DTYPE][:QUANT], e.g. mlx:gpu:bf16:q8",
            )
        if kind in found:
            raise XBackendError(f"{what.capitalize()} {text!r} names two {kind}s ({found[kind]} and {part})",
                                fix="write NAME[:DEVICE][:DTYPE][:QUANT], each part at most once")
        found[kind] = part
    return BackendSpec(name=name, device=found.get("device"), dtype=found.get("dtype", "fp32"),
                       quant=found.get("quant"))


def parse_specs(text: str, grammar: Grammar = BACKENDS) -> list[BackendSpec]:
    """Parse a comma-separated list such as `cpu,mps,mlx`."""
    items = text.split(",")
    if not text.strip() or any(not t.strip() for t in items):
        raise XBackendError(f"Empty {grammar.what} in the list {text!r}",
                            fix=f"separate specs by single commas, e.g. {grammar.option}")
    return [parse_spec(t, grammar) for t in items]
