"""Library knobs that change numerics without making two traces incomparable, and how two runs differ in them.

torch.compile is one: moshi as it ships compiles rms-norm, rope and gating lazily (on the CPU and
MPS only the output RMSNorm), and compiled kernels round differently from eager ones. Two traces
that differ only in it are comparable; the difference is reported beside the verdict, so a drift
it explains is not read as a backend bug, and an inductor bug is not hidden by an eager checker.
"""

from __future__ import annotations


def compiled_functions(meta: dict) -> list[str] | None:
    """What torch.compile really compiled in the run `meta` describes ([] eager); None for a non-torch run."""
    effective = meta.get("effective")
    if not isinstance(effective, dict) or not isinstance(effective.get("torch_compiled"), list):
        return None
    return sorted(str(name) for name in effective["torch_compiled"])


def describe_compiled(names: list[str]) -> str:
    return f"torch.compile of {', '.join(names)}" if names else "eager (nothing compiled)"


def compile_difference(reference: dict, backend: dict) -> dict | None:
    """None when both runs compiled the same functions (or either is not a PyTorch run), else both sides and a note."""
    a, b = compiled_functions(reference), compiled_functions(backend)
    if a is None or b is None or a == b:
        return None
    return {"reference": a, "backend": b,
            "note": f"the runs differ in torch.compile: {describe_compiled(b)} vs {describe_compiled(a)} in the "
                    "reference; compiled kernels round differently, so part of the drift can be that"}
