"""The known-issue table: every entry fires on its crafted fingerprint and on none of its near misses,
and a verdict or check that a match could explain says so."""

from __future__ import annotations

import copy

import pytest

from xbackend.advisories import (ADVISORIES, EFFECTS, LOGITS, TABLE_VERSION, advise, applies, explaining, in_range,
                                 matching, table, verdict_effects)
from xbackend.compare import with_known_issues
from xbackend.analysis.explain import explain
from xbackend.results import CompareReport, Verdict


def torch_mps(version: str, **extra) -> dict:
    return {"library": "torch", "device": "mps", "dtype": "fp32", "chip": "Apple M2 Pro",
            "versions": {"torch": version, "mlx": "0.30.1"}, "env": {}, **extra}


def mlx_gpu(version: str, chip: str = "Apple M5 Max", **extra) -> dict:
    return {"library": "mlx", "device": "mlx", "mlx_device": "Device(gpu, 0)", "dtype": "fp32", "chip": chip,
            "versions": {"mlx": version, "torch": "2.8.0"}, "env": {}, **extra}


def without(env: dict, *path: str) -> dict:
    env = copy.deepcopy(env)
    d = env
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]
    return env


def changed(env: dict, value, *path: str) -> dict:
    env = copy.deepcopy(env)
    d = env
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    return env


TORCH_ALWAYS = {"torch-mps-index-put-nondeterministic"}  # every torch version on MPS (no fixed release known)
# advisory id -> (its crafted fingerprint, the exact set that fingerprint matches, near misses it must not match)
CASES = {
    "torch-mps-exponential-negative-zero": (
        torch_mps("2.13.0"), {"torch-mps-exponential-negative-zero"} | TORCH_ALWAYS,
        [torch_mps("2.14.0"), torch_mps("2.12.1"), torch_mps("2.13.0", device="cpu"), torch_mps("2.13.0", device="cuda"),
         torch_mps("2.13.0", library="mlx"), without(torch_mps("2.13.0"), "versions", "torch")]),
    "torch-2.8-mps-linear-noncontiguous": (
        torch_mps("2.8.0"), {"torch-2.8-mps-linear-noncontiguous"} | TORCH_ALWAYS,
        [torch_mps("2.9.0"), torch_mps("2.9.1+cpu"), torch_mps("2.7.1"), torch_mps("2.8.0", device="cpu"),
         changed(torch_mps("2.8.0"), 2.8, "versions", "torch")]),
    "torch-mps-index-put-nondeterministic": (
        torch_mps("2.15.0"), TORCH_ALWAYS,
        [torch_mps("2.15.0", device="cpu"), torch_mps("2.15.0", library="plugin"), changed(torch_mps("2.15.0"),
                                                                                             "nonsense", "versions", "torch")]),
    "mlx-m5-tf32-default": (
        mlx_gpu("0.30.0"), {"mlx-m5-tf32-default", "mlx-metal-not-bitwise-repeatable"},
        [mlx_gpu("0.29.4"), mlx_gpu("0.31.2", chip="Apple M4 Max"), mlx_gpu("0.31.2", chip="Intel Xeon"),
         mlx_gpu("0.31.2", MLX_ENABLE_TF32=False), mlx_gpu("0.31.2", env={"MLX_ENABLE_TF32": "0"}),
         mlx_gpu("0.31.2", dtype="bf16"), mlx_gpu("0.31.2", mlx_device="Device(cpu, 0)"),
         mlx_gpu("0.31.2", env={"MLX_ENABLE_TF32": 1})]),
    "mlx-metal-not-bitwise-repeatable": (
        mlx_gpu("0.26.5", chip="Apple M1"), {"mlx-metal-not-bitwise-repeatable"},
        [mlx_gpu("0.26.5", mlx_device="Device(cpu, 0)"), without(mlx_gpu("0.26.5"), "versions", "mlx"),
         mlx_gpu("0.26.5", library="torch")]),
}


def test_every_entry_has_a_case_and_the_table_is_versioned():
    assert set(CASES) == {a.id for a in ADVISORIES}
    assert TABLE_VERSION == 1 and all(row["link"] and row["range"] for row in table())
    assert all(a.effects and set(a.effects) <= set(EFFECTS) for a in ADVISORIES)


@pytest.mark.parametrize("ident", sorted(CASES))
def test_each_entry_fires_on_its_fingerprint_and_on_no_near_miss(ident):
    env, exact, misses = CASES[ident]
    assert {a.id for a in matching(env)} == exact
    for miss in misses:
        assert ident not in {a.id for a in matching(miss)}, miss


def test_mlx_tf32_knob_as_mlx_reads_it():
    tf32 = next(a for a in ADVISORIES if a.id == "mlx-m5-tf32-default")
    base = without(mlx_gpu("0.31.2"), "env")
    assert applies(tf32, base)  # no variables recorded: unset, MLX's default is on
    for raw, on in (("1", True), (" 2x", True), ("0", False), ("-0", False), ("off", False), ("", False)):
        assert applies(tf32, {**base, "env": {"MLX_ENABLE_TF32": raw}}) is on, raw
    assert applies(tf32, {**base, "MLX_ENABLE_TF32": True, "env": {"MLX_ENABLE_TF32": "0"}})  # the backend's record wins


@pytest.mark.parametrize("bad", [None, [], "mps", {"versions": "2.8.0", "library": "torch", "device": "mps"},
                                 {"library": ["torch"], "device": "mps", "versions": {"torch": "2.8.0"}},
                                 {"library": "torch", "device": {"x": 1}, "versions": {"torch": "2.8.0"}},
                                 {"library": "mlx", "chip": 5, "mlx_device": None, "device": "gpu",
                                  "versions": {"mlx": "0.31.0"}, "dtype": 32}])
def test_malformed_fingerprints_match_nothing_and_never_raise(bad):
    found = matching(bad)
    assert all(a.id == "mlx-metal-not-bitwise-repeatable" for a in found)  # the last one: a Metal MLX run, no chip


def test_versions():
    assert in_range("2.8.0", ("2.8.0", "2.9")) and in_range("2.8.1", ("2.8.0", "2.9"))
    assert not in_range("2.9.0", ("2.8.0", "2.9")) and not in_range("2.10.0", ("2.8.0", "2.9"))
    assert in_range("0.30.0.dev2025", ("0.30.0", None)) and not in_range("0.3.0", ("0.30.0", None))
    assert not in_range(None, (None, None)) and not in_range("x", (None, None))


def test_a_verdict_a_known_issue_could_explain_says_so():
    env = torch_mps("2.8.0")
    report = CompareReport(request={}, reference="cpu", backends=(
        {"name": "cpu", "status": "ok", "env": {"library": "torch", "device": "cpu", "versions": {"torch": "2.8.0"}}},
        {"name": "mps", "status": "ok", "env": env}))
    figures = {"tolerance": 1e-3, "forced_max_abs": 0.5, "steps": 4, "within_tolerance": False}
    drifting = Verdict("mps", "cpu", "NUMERIC_DRIFT", None, figures=figures)
    found = report.known_issues(drifting)
    assert [m["id"] for m in found] == ["torch-2.8-mps-linear-noncontiguous"]
    text = explain(with_known_issues(drifting, found))
    assert text.endswith("A known issue could explain this (mps: torch 2.8.0 on MPS: F.linear wrong on "
                         "non-contiguous inputs, pytorch#161640 (fix: pytorch#161641, in 2.9)).")
    assert "known issue" not in drifting.explanation
    fine = Verdict("mps", "cpu", "NUMERIC_DRIFT", None, figures={**figures, "forced_max_abs": 1e-4,
                                                                 "within_tolerance": True})
    assert report.known_issues(fine) == []  # an expected verdict needs no explaining
    nondet = Verdict("mps", "cpu", "NONDETERMINISTIC_KERNELS", None, figures=figures)
    assert [m["id"] for m in report.known_issues(nondet)] == ["torch-mps-index-put-nondeterministic"]
    assert {m["backend"] for m in report.to_dict()["advisories"]} == {"mps"}


def test_explaining_is_limited_to_the_backends_and_effects_asked():
    found = advise({"a": torch_mps("2.8.0"), "b": mlx_gpu("0.31.0")})
    assert {m["id"] for m in explaining(found, ("b",), verdict_effects("NUMERIC_DRIFT"))} == {"mlx-m5-tf32-default"}
    assert explaining(found, ("c",), (LOGITS,)) == []
    assert explaining(found, ("a",), verdict_effects("IDENTICAL")) == []
    assert {m["id"] for m in explaining(found, ("a",), verdict_effects("NUMERIC_DIVERGENCE", {}))} == {
        "torch-2.8-mps-linear-noncontiguous"}
    # a native divergence with the same sampler on both sides may be the sampler's arithmetic (MPS exponential_)
    later = advise({"a": torch_mps("2.13.0")})
    native = {m["id"] for m in explaining(later, ("a",), verdict_effects("NUMERIC_DIVERGENCE", {"numeric_cause": "native"}))}
    assert native == {"torch-mps-exponential-negative-zero"}
    assert explaining(later, ("a",), verdict_effects("NUMERIC_DIVERGENCE", {})) == []
    assert {m["id"] for m in explaining(later, ("a",), verdict_effects("SAMPLER_DIVERGENCE"))} == {
        "torch-mps-exponential-negative-zero"}
