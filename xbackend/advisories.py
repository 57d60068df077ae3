"""Known issues: library versions, devices and chips known to compute wrongly or irreproducibly.

A small, versioned table (`TABLE_VERSION`) checked against every environment fingerprint that
`compare`, `check`, `report` and `matrix` read (`env.fingerprint` as recorded in traces). A match
is printed and recorded; a verdict one of them could explain says so. Each entry holds only what
its source states (issue or pull request, read when the entry was written): the version range,
device, chip and knob it names. An entry never decides a verdict; it points at a known cause.

Fingerprints come from other machines (bundles, CI artifacts), so every field is read defensively:
anything missing or of the wrong type simply does not match.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

TABLE_VERSION = 1

# What a known issue does to a run; a verdict (or a failed check, or a matrix cell) is explained by the
# issues whose effect could produce it.
LOGITS = "logits"  # the logits themselves change (precision, a wrong kernel)
NATIVE_TOKENS = "native-tokens"  # only the library's own sampler picks other tokens
NONDETERMINISM = "nondeterminism"  # repeats on identical inputs differ
EFFECTS = (LOGITS, NATIVE_TOKENS, NONDETERMINISM)
VERDICT_EFFECTS = {"NUMERIC_DRIFT": (LOGITS,), "NUMERIC_DIVERGENCE": (LOGITS,), "SEMANTIC_MISMATCH": (LOGITS,),
                   "SAMPLER_DIVERGENCE": (NATIVE_TOKENS,), "NONDETERMINISTIC_SAMPLER": (NATIVE_TOKENS,),
                   "NONDETERMINISTIC_KERNELS": (NONDETERMINISM,)}
DEVICES = {"mps": "MPS", "gpu": "the Metal GPU (MLX)"}


@dataclass(frozen=True)
class Advisory:
    """One known issue. `versions` is [first, end): `first` included, `end` excluded, None open."""

    id: str
    library: str  # the package whose version is checked (fingerprint `versions`)
    versions: tuple[str | None, str | None]
    device: str  # mps (PyTorch on Metal) | gpu (MLX on Metal)
    condition: str
    effect: str
    link: str
    effects: tuple[str, ...]  # EFFECTS: what the issue does to a run
    chip_min: int | None = None  # Apple M-generation from which the issue holds (M5 -> 5)
    dtypes: tuple[str, ...] | None = None  # only runs computing in these dtypes
    knob: str | None = None  # a fingerprint knob that must be on: see `_knob_on`

    @property
    def range_text(self) -> str:
        first, end = self.versions
        return ",".join(p for p in (f">={first}" if first else "", f"<{end}" if end else "") if p) or "every version"

    def text(self, version: str) -> str:
        """`torch 2.8.0 on MPS: F.linear wrong on non-contiguous inputs, pytorch#161640 ...`"""
        return f"{self.library} {version} on {DEVICES[self.device]}: {self.effect}, {self.link}"


ADVISORIES: tuple[Advisory, ...] = (
    # Reported on torch 2.13.0 (M1 Pro, macOS 15.7.7); fixed on main by #192621, in a release the sources do
    # not name: 2.13.x only (earlier versions were not reported). moshi samples exactly so (utils/sampling.py).
    Advisory(
        id="torch-mps-exponential-negative-zero", library="torch", versions=("2.13.0", "2.14"), device="mps",
        condition="native sampling (exponential_ then argmax, as moshi's multinomial does) on MPS",
        effect="exponential_ emits exact -0.0, so a zero-probability token becomes NaN and argmax can pick it",
        link="pytorch#192577 (fix: pytorch#192621)",
        effects=(NATIVE_TOKENS,)),
    # #161641 "Fixes #161640" (the no-graph MPS path on non-contiguous tensors); backport #162779 for 2.8.0;
    # fixed in 2.9.0 (TransformerLens#1271, pytorch#197796).
    Advisory(
        id="torch-2.8-mps-linear-noncontiguous", library="torch", versions=("2.8.0", "2.9"), device="mps",
        condition="F.linear on MPS with non-contiguous inputs (the no-graph fast path)",
        effect="F.linear wrong on non-contiguous inputs", link="pytorch#161640 (fix: pytorch#161641, in 2.9)",
        effects=(LOGITS,)),
    # #97574 (open, since torch 2.1 nightlies) and #161029 (open, 2025: MPS has no deterministic index ops);
    # no release is named as fixed.
    Advisory(
        id="torch-mps-index-put-nondeterministic", library="torch", versions=(None, None), device="mps",
        condition="index_put_ / index_add on MPS, even under torch.use_deterministic_algorithms(True)",
        effect="index_put_/index_add nondeterministic even under use_deterministic_algorithms",
        link="pytorch#97574, pytorch#161029", effects=(NONDETERMINISM,)),
    # mlx#3534: M5 fp32 matmul/SDPA lose precision since 0.30.0 (0.29.4 fine, M4 fine); the cause is the
    # MLX_ENABLE_TF32 default of 1 (mlx#3860, #3883, #3894: M5 and newer run them on the neural accelerators).
    Advisory(
        id="mlx-m5-tf32-default", library="mlx", versions=("0.30.0", None), device="gpu", chip_min=5,
        dtypes=("fp32",), knob="MLX_ENABLE_TF32",
        condition="fp32 on an M5 (or later) GPU with MLX_ENABLE_TF32 unset or 1 (its default)",
        effect="fp32 matmul and SDPA run at TF32-class precision (M1-M4 stay full fp32; MLX_ENABLE_TF32=0 restores "
               "fp32)", link="mlx#3534", effects=(LOGITS,)),
    # mlx#878: Metal reductions differ run to run; the maintainers: run-to-run bitwise identity is not expected.
    Advisory(
        id="mlx-metal-not-bitwise-repeatable", library="mlx", versions=(None, None), device="gpu",
        condition="MLX on the Metal GPU", effect="run-to-run bitwise identity is not promised (GPU reductions)",
        link="mlx#878", effects=(NONDETERMINISM,)),
)


# --------------------------------------------------------------------------- reading a fingerprint


def version_tuple(text) -> tuple[int, ...] | None:
    """`2.9.1+cpu` -> (2, 9, 1), `0.30.0.dev1` -> (0, 30, 0); None for anything else."""
    found = re.match(r"(\d{1,6})(?:\.(\d{1,6}))?(?:\.(\d{1,6}))?", text) if isinstance(text, str) else None
    return tuple(int(g) for g in found.groups() if g is not None) if found else None


def _pad(v: tuple[int, ...]) -> tuple[int, ...]:
    return (v + (0, 0, 0))[:3]


def in_range(version, versions: tuple[str | None, str | None]) -> bool:
    v = version_tuple(version)
    if v is None:
        return False
    first, end = (None if b is None else _pad(version_tuple(b)) for b in versions)
    return (first is None or _pad(v) >= first) and (end is None or _pad(v) < end)


def _str(env: dict, *keys: str) -> str | None:
    value = env
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) and len(value) <= 256 else None


def library_of(env: dict) -> str | None:
    return _str(env, "library")


def device_of(env: dict) -> str | None:
    """mps / cuda / cpu for PyTorch, gpu / cpu for MLX (Metal or not), from the fingerprint."""
    library, device = library_of(env), _str(env, "device")
    if library == "mlx":
        where = _str(env, "mlx_device") or ""
        if "gpu" in where or "cpu" in where:
            return "gpu" if "gpu" in where else "cpu"
        return "cpu" if device == "cpu" else "gpu" if device is not None else None
    return device


def apple_generation(env: dict) -> int | None:
    """5 for `Apple M5 Max`, from the chip (the fingerprint's, or its macOS section's)."""
    for chip in (_str(env, "chip"), _str(env, "mac", "chip")):
        found = re.match(r"Apple M(\d{1,2})\b", chip or "")
        if found:
            return int(found.group(1))
    return None


def _knob_on(env: dict, knob: str) -> bool:
    """A knob such as MLX_ENABLE_TF32: the bool the MLX backend records, else the variable as MLX reads it
    (`atoi`, on when unset); a value of another type is malformed and counts as off (no match)."""
    recorded = env.get(knob)
    if isinstance(recorded, bool):
        return recorded
    variables = env.get("env")
    raw = variables.get(knob) if isinstance(variables, dict) else None
    if raw is None:
        return True
    found = re.match(r"\s*[+-]?\d{1,9}", raw) if isinstance(raw, str) else None
    return bool(found and int(found.group(0)) != 0)


def applies(a: Advisory, env) -> bool:
    """Does the fingerprint `env` fall under advisory `a`? Unknown or malformed fields never match."""
    if not isinstance(env, dict) or library_of(env) != a.library:
        return False
    versions = env.get("versions")
    if not isinstance(versions, dict) or not in_range(versions.get(a.library), a.versions):
        return False
    if device_of(env) != a.device:
        return False
    if a.chip_min is not None and (apple_generation(env) or 0) < a.chip_min:
        return False
    if a.dtypes is not None and (_str(env, "dtype") or "fp32") not in a.dtypes:
        return False
    return a.knob is None or _knob_on(env, a.knob)


def matching(env) -> list[Advisory]:
    return [a for a in ADVISORIES if applies(a, env)]


def advise(envs: dict[str, dict | None]) -> list[dict]:
    """Every match, per backend (or cell) label: what report.json, check.json and matrix.json record."""
    return [{"backend": label, "id": a.id, "text": a.text(env["versions"][a.library]), "link": a.link,
             "effects": list(a.effects), "condition": a.condition, "table_version": TABLE_VERSION}
            for label, env in envs.items() for a in matching(env)]


def verdict_effects(verdict: str, figures: dict | None = None) -> tuple[str, ...]:
    """What could have produced a verdict; a numeric divergence of native runs (same sampler, same seed)
    can also come from the sampler's own arithmetic."""
    effects = VERDICT_EFFECTS.get(verdict, ())
    if verdict == "NUMERIC_DIVERGENCE" and (figures or {}).get("numeric_cause") == "native":
        effects += (NATIVE_TOKENS,)
    return effects


def explaining(found: list[dict], backends: tuple[str, ...], effects: tuple[str, ...]) -> list[dict]:
    """The recorded matches of `backends` whose effect is one of `effects`."""
    return [m for m in found if m["backend"] in backends and isinstance(m.get("effects"), list)
            and set(m["effects"]) & set(effects)]


def sentence(found: list[dict]) -> str:
    """What a verdict says when a known issue could explain it."""
    if not found:
        return ""
    items = "; ".join(f"{m['backend']}: {m['text']}" for m in found)
    return f" A known issue could explain this ({items})."


def table() -> list[dict]:
    """The table as data (for docs and `--json`)."""
    return [{**asdict(a), "range": a.range_text} for a in ADVISORIES]
