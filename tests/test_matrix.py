"""`xbackend matrix`: machines simulated from real captures of the bundled model (fingerprints edited,
digests untouched), one of them with other logits (cpu:bf16's traces under the cpu label)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xbackend.analysis import metrics
from xbackend.analysis.matrix import MatrixReport, flat_env, separating
from xbackend.matrix import run_matrix
from xbackend.store.trace import load_trace

from .helpers import assert_clean_error, needs_tiny, run_cli

pytestmark = needs_tiny
STEPS = 6


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """One compare (cpu, cpu:bf16) and one baseline of the same settings, captured once for the module."""
    from xbackend.check import create_baseline
    from xbackend.compare import CompareRequest, run_compare

    root = tmp_path_factory.mktemp("captured")
    req = CompareRequest(backends=("cpu", "cpu:bf16"), steps=STEPS, repeats=1, arbiter="none", decode_audio=False)
    run_compare(req, root / "run")
    create_baseline(req, root / "baseline")
    return root


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def fingerprints(run: Path):
    """Every env fingerprint a run directory records: report.json's and each trace's meta.json."""
    return [run / "report.json", *sorted(run.glob("traces/*/*/meta.json"))]


def machine(captured: Path, dst: Path, chip: str, tf32: str | None = "0", other_logits: bool = False,
            env: dict | None = None) -> Path:
    """A copy of the captured run directory as if made on another Mac: chip, macOS and MLX_ENABLE_TF32
    edited in every fingerprint; `other_logits` puts cpu:bf16's native-0 under the cpu label."""
    shutil.copytree(captured / "run", dst)

    def fake(e: dict) -> None:
        e.update(chip=chip, os="Darwin 25.1.0", mac={"macos": "26.1", "chip": chip}, **(env or {}))
        e["env"] = {k: v for k, v in e.get("env", {}).items() if k != "MLX_ENABLE_TF32"}
        if tf32 is not None:
            e["env"]["MLX_ENABLE_TF32"] = tf32

    edit_json(dst / "report.json", lambda r: [fake(b["env"]) for b in r["backends"]])
    for meta in sorted(dst.glob("traces/*/*/meta.json")):
        edit_json(meta, lambda m: fake(m["env"]))
    if other_logits:
        cpu, bf16 = dst / "traces" / "cpu" / "native-0", dst / "traces" / "cpu_bf16" / "native-0"
        own = json.loads((cpu / "meta.json").read_text())
        theirs = json.loads((bf16 / "meta.json").read_text())
        shutil.rmtree(cpu)
        shutil.copytree(bf16, cpu)  # the data files and their digests, unchanged
        theirs.update(spec=own["spec"], backend=own["backend"], env=own["env"])
        (cpu / "meta.json").write_text(json.dumps(theirs))
    return dst


@pytest.fixture
def fleet(captured, tmp_path):
    """Five Macs: four agree bitwise (MLX_ENABLE_TF32=0 on each, chips M3 to M4 Pro); the M5 has it unset
    and other cpu logits."""
    return [machine(captured, tmp_path / "m1", "Apple M4"), machine(captured, tmp_path / "m2", "Apple M4"),
            machine(captured, tmp_path / "m3", "Apple M3 Max"), machine(captured, tmp_path / "m4", "Apple M4 Pro"),
            machine(captured, tmp_path / "m5", "Apple M4", tf32=None, other_logits=True)]


def test_five_machines_two_groups_name_the_boundary_and_the_separating_field(fleet, tmp_path):
    out = tmp_path / "matrix"
    proc = run_cli("matrix", *map(str, fleet), "--out", str(out), "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a cell diverged: needs attention, like check
    result = MatrixReport.from_dict(json.loads(proc.stdout))
    assert MatrixReport.from_dict(result.to_dict()) == result
    assert result.reference == "m1" and result.backends == ("cpu", "cpu:bf16")

    groups = result.groups_of("cpu")
    assert [g.machines for g in groups] == [("m1", "m2", "m3", "m4"), ("m5",)]
    assert groups[0].separated_by == {"env.MLX_ENABLE_TF32": "0"}  # chips vary inside the first group: not a boundary
    assert groups[1].separated_by == {"env.MLX_ENABLE_TF32": "(not recorded)"}
    assert [g.machines for g in result.groups_of("cpu:bf16")] == [("m1", "m2", "m3", "m4", "m5")]

    ref = load_trace(fleet[0] / "traces" / "cpu" / "native-0")
    odd = load_trace(fleet[4] / "traces" / "cpu" / "native-0")
    step, stream = metrics.first_token_divergence(ref, odd)
    cell = result.cell("m5", "cpu")
    assert cell.status == "diverged" and cell.group == 1
    assert (cell.first_divergence.step, cell.first_divergence.stream) == (step, stream)
    assert cell.first_bitwise_difference == metrics.bitwise_equal_steps(ref, odd) == 0
    assert cell.max_abs == pytest.approx(metrics.same_input_drift(ref, odd)["max_abs"], rel=0, abs=0)
    assert cell.max_abs > 100 * cell.tolerance  # bf16 rounding against fp32: measured 0.38 here, tolerance 1e-5
    assert all(result.cell(m, "cpu").status == "identical" for m in ("m2", "m3", "m4"))
    assert all(result.cell(m, "cpu").max_abs == 0.0 for m in ("m2", "m3", "m4"))
    assert result.cell("m1", "cpu").status == "reference" and result.cell("m3", "cpu").env["chip"] == "Apple M3 Max"
    assert any("group 1: m5 parts from it" in line and f"tokens at step {step}, {stream}" in line
               and "every machine in it has env.MLX_ENABLE_TF32 = (not recorded)" in line for line in result.answer)

    md = (out / "report.md").read_text()
    assert "| m5 " in md and "env.MLX_ENABLE_TF32 = (not recorded)" in md and "![matrix](matrix.png)" in md
    assert (out / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "matrix.json").read_text())
    assert written["schema"] == "xbackend.matrix/1" and written["cells"] == json.loads(proc.stdout)["cells"]

    agree = run_cli("matrix", *map(str, fleet[:4]))
    assert agree.returncode == 0, agree.stdout + agree.stderr
    assert "cpu: all 4 machines agree bitwise over 6 steps" in agree.stdout

    other_ref = run_matrix(fleet, reference="m5")
    assert other_ref.cell("m1", "cpu").status == "diverged" and other_ref.groups_of("cpu")[0].machines == ("m5",)


def test_a_baseline_and_an_unpacked_bundle_are_machines_too(captured, fleet, tmp_path):
    from xbackend.report import write_report

    made = write_report(fleet[1])
    with tarfile.open(made.bundle) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    bundle = tmp_path / "unpacked" / "xbackend-bundle"
    result = run_matrix([fleet[0], captured / "baseline", bundle])
    kinds = {m["name"]: m["kind"] for m in result.machines}
    assert kinds == {"m1": "run", "baseline": "baseline", "xbackend-bundle": "bundle"}
    assert result.cell("baseline", "cpu").status == "identical"  # the same CPU, seed and settings: bitwise
    bundled = result.cell("xbackend-bundle", "cpu")
    assert bundled.status == "identical" and 0 < bundled.steps <= STEPS


def test_a_known_issue_on_a_diverged_cell_says_so(captured, tmp_path):
    fleet = [machine(captured, tmp_path / "a", "Apple M2"),
             machine(captured, tmp_path / "b", "Apple M2", other_logits=True,
                     env={"device": "mps", "versions": {"torch": "2.8.0"}})]
    proc = run_cli("matrix", *map(str, fleet), "--json")
    assert proc.returncode == 1, proc.stderr
    result = MatrixReport.from_dict(json.loads(proc.stdout))
    ids = {a["id"] for a in result.advisories if a["backend"] == "b/cpu"}
    assert "torch-2.8-mps-linear-noncontiguous" in ids and not [a for a in result.advisories if a["backend"].startswith("a/")]
    assert [k["id"] for k in result.cell("b", "cpu").known_issues] == ["torch-2.8-mps-linear-noncontiguous"]
    assert result.cell("b", "cpu:bf16").known_issues == ()  # flagged, but nothing diverged there to explain
    text = run_cli("matrix", *map(str, fleet))
    assert "known issue: b/cpu: torch 2.8.0 on MPS: F.linear wrong on non-contiguous inputs, pytorch#161640" in text.stdout


def test_machines_that_ran_other_backends(captured, tmp_path):
    """A machine without a backend (no mps on a hosted VM) shows it as missing, and needs no attention for it."""
    full, cpu_only = machine(captured, tmp_path / "full", "Apple M4"), machine(captured, tmp_path / "cpu-only", "Intel")

    def drop(r):
        r["backends"] = [b for b in r["backends"] if b["name"] == "cpu"]
        r["traces"] = {"cpu": r["traces"]["cpu"]}
    edit_json(cpu_only / "report.json", drop)
    shutil.rmtree(cpu_only / "traces" / "cpu_bf16")
    result = run_matrix([full, cpu_only])
    assert result.exit_code == 0 and result.cell("cpu-only", "cpu:bf16").status == "missing"
    assert result.cell("cpu-only", "cpu").status == "identical"
    swapped = run_matrix([full, cpu_only], reference="cpu-only")
    assert swapped.backends == ("cpu", "cpu:bf16") and swapped.cell("full", "cpu:bf16").status == "missing"
    assert any(line.startswith("cpu:bf16: no run on the reference machine cpu-only") for line in swapped.answer)


@pytest.mark.parametrize("key, value, needle", [
    ("seed", 7, "its seed is 7"),
    ("steps", STEPS - 1, f"its steps is {STEPS - 1}"),
    ("settings", {"temp_text": 0.5, "top_k_text": 25, "temp_audio": 0.8, "top_k_audio": 250}, "sampling settings"),
    ("model_digest", "0000000000000000", "its model digest is 0000000000000000"),
])
def test_a_machine_run_differently_is_refused_naming_the_field(captured, tmp_path, key, value, needle):
    a, b = machine(captured, tmp_path / "a", "Apple M4"), machine(captured, tmp_path / "b", "Apple M4")
    edit_json(b / "report.json", lambda r: r["request"].__setitem__(key, value))
    for meta in sorted(b.glob("traces/*/*/meta.json")):  # consistent with its own traces: a real other run
        if key == "seed":
            edit_json(meta, lambda m: m.update(seed=value, sampler={**m["sampler"], "seed": value}))
        if key == "settings":
            edit_json(meta, lambda m: m.update(settings=value))
        if key == "model_digest":
            edit_json(meta, lambda m: m["model"].update(digest=value))
    assert_clean_error(run_cli("matrix", str(a), str(b)), 2, "was not run like", needle)


def test_bad_inputs_one_line_exit_2(captured, tmp_path):
    a, b = machine(captured, tmp_path / "a", "Apple M4"), machine(captured, tmp_path / "b", "Apple M4")
    assert_clean_error(run_cli("matrix", str(a), str(tmp_path / "nope")), 2, "is not a directory")
    assert_clean_error(run_cli("matrix", str(a), str(b), "--reference", "c"), 2, "is not one of the machines", "a, b")
    assert_clean_error(run_cli("matrix", str(a), str(b), "--out", str(a / "sub")), 2, "overlaps the input")
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    assert_clean_error(run_cli("matrix", str(a), str(archive)), 2, "unpack it first")
    assert_clean_error(run_cli("matrix", str(a), str(tmp_path)), 2, "holds neither report.json nor baseline.json")

    seeded = machine(captured, tmp_path / "seeded", "Apple M4")  # a trace claiming another seed than its directory
    edit_json(seeded / "traces" / "cpu" / "native-0" / "meta.json", lambda m: m.update(seed=5))
    assert_clean_error(run_cli("matrix", str(a), str(seeded)), 2, "records seed 5")

    tampered = machine(captured, tmp_path / "tampered", "Apple M4")
    logits = tampered / "traces" / "cpu" / "native-0" / "logits-text.bin"
    raw = bytearray(logits.read_bytes())
    raw[0] ^= 1
    logits.write_bytes(bytes(raw))
    assert_clean_error(run_cli("matrix", str(a), str(tampered)), 2, "do not match its digest")

    linked = machine(captured, tmp_path / "linked", "Apple M4")
    shutil.rmtree(linked / "traces" / "cpu" / "native-0")
    (linked / "traces" / "cpu" / "native-0").symlink_to(a / "traces" / "cpu" / "native-0")
    assert_clean_error(run_cli("matrix", str(a), str(linked)), 2, "symbolic link")

    escaping = machine(captured, tmp_path / "escaping", "Apple M4")
    edit_json(escaping / "report.json", lambda r: r["traces"].__setitem__("cpu", "../a/traces/cpu"))
    assert_clean_error(run_cli("matrix", str(a), str(escaping)), 2, "must stay inside")

    odd = machine(captured, tmp_path / "odd", "Apple M4")
    edit_json(odd / "traces" / "cpu" / "native-0" / "meta.json", lambda m: m.update(env=["not", "an", "object"]))
    assert_clean_error(run_cli("matrix", str(a), str(odd)), 2, "env")


def test_separating_fields_need_one_value_per_group_and_distinct_values():
    envs = {"a": {"chip": "M4", "os": "15"}, "b": {"chip": "M4", "os": "14"}, "c": {"chip": "M5", "os": "15"}}
    assert separating([["a", "b"], ["c"]], envs) == {"chip": ["M4", "M5"]}
    assert separating([["a"], ["b"], ["c"]], envs) == {}  # chip M4 twice, os 15 twice: neither tells all three apart
    assert separating([["a"], ["c"]], envs) == {"chip": ["M4", "M5"]}


def test_flat_env_is_bounded():
    nested = {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}, "long": "x" * 10_000, "list": [1, 2], **{f"k{i}": i for i in range(300)}}
    flat = flat_env(nested)
    assert len(flat) <= 256 and all(len(v) <= 120 for v in flat.values())
    assert "a.b.c.d.e.f" not in flat and "list" not in flat
    assert np.all([isinstance(v, str) for v in flat.values()])


# --------------------------------------------------------------------------- known issues through check and report
# (here, on the same captures: a fingerprint claiming PyTorch 2.8.0 on MPS, the F.linear entry's)

MPS_28 = {"device": "mps", "versions": {"torch": "2.8.0"}}


def test_check_records_known_issues_and_a_failed_check_they_could_explain_says_so(captured, tmp_path):
    run = machine(captured, tmp_path / "run", "Apple M2", other_logits=True, env=MPS_28)
    proc = run_cli("check", "--baseline", str(captured / "baseline"), "--run", str(run), "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert {a["id"] for a in result["advisories"] if a["backend"] == "cpu"} >= {"torch-2.8-mps-linear-noncontiguous"}
    assert not [a for a in result["advisories"] if a["backend"].endswith("(baseline)")]  # the baseline ran on Linux
    logits = next(c for c in result["checks"] if c["backend"] == "cpu" and c["check"] == "logits")
    assert logits["status"] == "fail" and logits["figures"]["max_abs"] > 100 * logits["figures"]["tolerance"]
    assert "A known issue could explain this (cpu: torch 2.8.0 on MPS: F.linear wrong" in logits["message"]
    passed = [c for c in result["checks"] if c["status"] == "pass"]
    assert passed and not any("known issue" in c["message"] for c in passed)
    text = run_cli("check", "--baseline", str(captured / "baseline"), "--run", str(run))
    assert "known issue: cpu: torch 2.8.0 on MPS: F.linear wrong on non-contiguous inputs, pytorch#161640" in text.stdout

    plain = run_cli("check", "--baseline", str(captured / "baseline"), "--run", str(captured / "run"), "--json")
    assert plain.returncode == 0 and json.loads(plain.stdout)["advisories"] == []


def test_report_lists_known_issues_and_the_verdicts_they_could_explain(captured, tmp_path):
    run = machine(captured, tmp_path / "run", "Apple M2", env=MPS_28)
    proc = run_cli("report", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["advisories"]
    assert {a["backend"] for a in found} == {"cpu", "cpu:bf16"}
    md = (run / "report.md").read_text()
    section = md.split("## Known issues", 1)[1].split("\n## ", 1)[0]
    assert "torch 2.8.0 on MPS: F.linear wrong on non-contiguous inputs, pytorch#161640" in section
    verdict = json.loads((run / "report.json").read_text())["verdicts"][0]
    # a flip by drift within the tier's tolerance is expected (docs/design.md, Exit codes); the known issue
    # is named all the same
    assert verdict["verdict"] == "NUMERIC_DIVERGENCE" and verdict["expected"] is True
    # an expected verdict needs no known cause (the check test below has one that needs attention explained)
    assert "could be explained by" not in section
    plain = machine(captured, tmp_path / "plain", "Apple M2")
    assert run_cli("report", str(plain)).returncode == 0 and "## Known issues" not in (plain / "report.md").read_text()


def test_the_fleet_guide_calls_real_options():
    """The guide's fleet job (docs/release-gating.md): every `xbackend` command it runs exists and takes the options it passes."""
    from .helpers import ROOT

    section = (ROOT / "docs" / "release-gating.md").read_text().split("## One answer for the fleet", 1)[1]
    workflow = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    calls = [line.split("run: ", 1)[1].split() for line in workflow.splitlines() if "run: xbackend " in line]
    assert [c[1] for c in calls] == ["matrix"]
    for call in calls:
        helptext = run_cli(call[1], "--help", env={"COLUMNS": "200"}).stdout
        for flag in (a for a in call if a.startswith("--")):
            assert flag in helptext, (call[1], flag)
