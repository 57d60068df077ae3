"""`pip install xbackend` (no extras) reads what others recorded: report, diff and inspect on a run
directory and its bundle, in a fresh virtual environment that has no torch, moshi or mlx."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from .helpers import ROOT, needs_tiny, run_cli, synthetic_run

pytestmark = pytest.mark.slow
FRAMEWORKS = ("torch", "moshi", "mlx", "moshi-mlx", "moshi_mlx")
OFFLINE = ("Could not fetch URL", "NewConnectionError", "Network is unreachable", "Temporary failure in name resolution")


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """A fresh venv (no system site-packages) with xbackend installed from a copy of the sources."""
    tmp = tmp_path_factory.mktemp("core")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "xbackend", src / "xbackend", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          str(src)], capture_output=True, text=True, timeout=900)
    if pip.returncode != 0 and any(s in pip.stdout + pip.stderr for s in OFFLINE):
        pytest.skip(f"no package registry reachable here: {pip.stderr.strip().splitlines()[-1]}")
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    print(f"core install: {time.perf_counter() - started:.1f} s, {len(installed)} packages: {sorted(installed)}")
    return venv, installed


def xb(venv, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "200"
    return subprocess.run([str(venv / "bin" / "xbackend"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_core_has_no_framework(core, tmp_path):
    venv, installed = core
    assert "xbackend" in installed and "numpy" in installed
    assert not installed & set(FRAMEWORKS), installed & set(FRAMEWORKS)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr


def test_backends_name_the_extra(core, tmp_path):
    venv, _ = core
    proc = xb(venv, "backends", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["spec"]: r for r in json.loads(proc.stdout)["backends"]}
    assert not rows["cpu"]["available"] and "pip install 'xbackend[torch]'" in rows["cpu"]["reason"]
    assert not rows["mlx:cpu"]["available"] and "pip install 'xbackend[mlx]'" in rows["mlx:cpu"]["reason"]
    assert "pip install 'xbackend[torch]'" in xb(venv, "backends", cwd=tmp_path).stdout


def test_report_diff_and_inspect_a_bundle(core, tmp_path):
    venv, _ = core
    run = synthetic_run(tmp_path / "run", vocab=(64,) + (32,) * 8)
    proc = xb(venv, "report", str(run), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout)
    assert (run / "report.md").is_file() and len(files["plots"]) == 2
    with tarfile.open(files["bundle"]) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    bundle = tmp_path / "x" / "xbackend-bundle"
    assert "## Verdicts" in (bundle / "report.md").read_text()

    cpu, mps = (next((bundle / "traces" / name).glob("portable.steps*")) for name in ("cpu", "mps"))
    proc = xb(venv, "diff", str(cpu), str(mps), "--json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # the planted divergence, inside the bundle's window
    start = json.loads((cpu / "meta.json").read_text())["trimmed_from"]["start"]
    assert json.loads(proc.stdout)["first_divergence"]["step"] == 30 - start

    proc = xb(venv, "inspect", str(mps), "--against", str(cpu), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["against"]["first_divergence"]["step"] == 30 - start


def test_matrix_of_machines(core, tmp_path):
    """CI artifacts of several machines, aggregated where no framework is installed."""
    venv, _ = core
    run = synthetic_run(tmp_path / "m1", steps=20, vocab=(64,) + (32,) * 8)
    request = json.loads((run / "report.json").read_text())["request"]
    for meta in run.glob("traces/*/*/meta.json"):  # the synthetic traces name a model and prompt of their own
        edited = {**json.loads(meta.read_text()), "model": {"name": "moshiko-7b", "digest": request["model_digest"]}}
        edited["prompt"] = {**edited["prompt"], "digest": request["prompt"]["digest"]}
        meta.write_text(json.dumps(edited))
    shutil.copytree(run, tmp_path / "m2")
    meta = tmp_path / "m2" / "traces" / "mps" / "native-0" / "meta.json"
    edited = json.loads(meta.read_text())
    edited["env"] = {**(edited.get("env") or {}), "chip": "Apple M5"}
    meta.write_text(json.dumps(edited))
    proc = xb(venv, "matrix", str(tmp_path / "m1"), str(tmp_path / "m2"), "--out", str(tmp_path / "fleet"), "--json",
              cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert {c["status"] for c in result["cells"] if c["machine"] == "m2"} == {"identical"}
    assert next(c for c in result["cells"] if c["machine"] == "m2" and c["backend"] == "mps")["env"]["chip"] == "Apple M5"
    assert (tmp_path / "fleet" / "matrix.png").is_file() and (tmp_path / "fleet" / "report.md").is_file()


@needs_tiny
def test_check_a_recorded_run_against_a_baseline(core, tmp_path):
    """Recorded where the backends run (here, with torch), checked where none is installed."""
    venv, _ = core
    base, run = tmp_path / "base", tmp_path / "run"
    made = run_cli("baseline", "create", "--backends", "cpu", "--steps", "4", "--repeats", "2", "--out", str(base))
    assert made.returncode == 0, made.stderr
    assert run_cli("check", "--baseline", str(base), "--out", str(run)).returncode == 0
    proc = xb(venv, "check", "--baseline", str(base), "--run", str(run), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and {c["check"] for c in result["checks"]} == {"logits", "tokens", "repeatability"}


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [readme[1]] and "'.[all,test]'" in readme[1] and "'.[all]'" in readme[0]
