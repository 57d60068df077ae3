"""The Mac-only decisions, checked on any machine: what the environment record holds on macOS,
which MPS condition failed, how device errors at load are classed, and what installs on which Mac."""

import os
import platform
import stat
import sys
from pathlib import Path

import pytest

from xbackend import env
from xbackend.errors import BackendFailed, BackendUnavailable, XBackendError

from .helpers import ROOT, have, needs_tiny

needs_torch = pytest.mark.skipif(not (have("torch") and have("moshi")), reason="torch or moshi not installed")


def _tool(folder: Path, name: str, script: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_mac(tmp_path, monkeypatch):
    """A macOS machine's answers from sysctl and ioreg (found through PATH: /usr/sbin is absent here)."""
    _tool(tmp_path, "sysctl", 'case "$2" in machdep.cpu.brand_string) echo "Apple M2 Pro";;\n'
                              'hw.memsize) echo 34359738368;; *) exit 1;; esac\n')
    _tool(tmp_path, "ioreg", 'echo \'  | "gpu-core-count" = 19\'\n')
    monkeypatch.setattr(env, "SYSCTL", (str(tmp_path / "absent-sysctl"),))
    monkeypatch.setattr(env, "IOREG", (str(tmp_path / "absent-ioreg"),))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "mac_ver", lambda *a: ("14.6.1", ("", "", ""), "arm64"))
    return tmp_path


def test_environment_record_on_macos(fake_mac, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_FAST_MATH", "1")
    monkeypatch.setenv("PYTORCH_MPS_PREFER_METAL", "1")
    fp = env.fingerprint()
    assert fp["mac"] == {"macos": "14.6.1", "chip": "Apple M2 Pro", "gpu_cores": 19, "memory_bytes": 34359738368}
    assert fp["chip"] == "Apple M2 Pro"
    assert fp["env"]["PYTORCH_MPS_FAST_MATH"] == "1" and fp["env"]["PYTORCH_MPS_PREFER_METAL"] == "1"


def test_sysctl_is_found_by_path_first(fake_mac, monkeypatch):
    (fake_mac / "sbin").mkdir()
    by_path = _tool(fake_mac / "sbin", "sysctl", "echo from-sbin\n")
    monkeypatch.setattr(env, "SYSCTL", (str(by_path),))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert env.sysctl("machdep.cpu.brand_string") == "from-sbin"
    monkeypatch.setattr(env, "SYSCTL", ("/nonexistent/sysctl",))
    assert env.sysctl("hw.memsize") is None and env.mac_gpu_cores() is None  # nothing found: recorded as unknown


def test_linux_record_has_no_mac_block():
    if sys.platform == "darwin":
        pytest.skip("this is a Mac")
    assert "mac" not in env.fingerprint()


@needs_torch
def test_mps_unavailable_says_which_condition_failed(monkeypatch):
    import torch

    from xbackend.backends.torch_backend import mps_unavailable

    if torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    here = mps_unavailable(torch)
    if sys.platform != "darwin":
        assert platform.system() in here and platform.machine() in here and "is_built() " in here
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert "needs Apple silicon; this Mac is x86_64" in mps_unavailable(torch)
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    monkeypatch.setattr(platform, "mac_ver", lambda *a: ("13.6.7", ("", "", ""), "arm64"))
    assert "needs macOS 14 or newer for MPS; this is macOS 13.6.7" in mps_unavailable(torch)
    monkeypatch.setattr(platform, "mac_ver", lambda *a: ("15.1", ("", "", ""), "arm64"))
    assert "virtual machine" in mps_unavailable(torch) and "is_available() False" in mps_unavailable(torch)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    assert "built without MPS" in mps_unavailable(torch)


# --- device errors while loading ----------------------------------------------------------------

OOM = ("MPS backend out of memory (MPS allocated: 17.41 GB, other allocations: 1.02 GB, max allowed: 18.13 GB). "
       "Tried to allocate 500.00 MB on private pool.")
BF16 = "MPS BFloat16 is only supported on MacOS 14 or newer"


@needs_torch
@needs_tiny
@pytest.mark.parametrize("exc,kind,words", [
    (RuntimeError(OOM), BackendFailed, "MPS backend out of memory"),
    (TypeError(BF16), BackendUnavailable, "only supported on MacOS 14"),
])
def test_device_errors_at_load_are_the_backend_failing(tmp_path, monkeypatch, exc, kind, words):
    """What MPS says while weights are loaded is exit 3 in its own words, not "bad checkpoint" (exit 2).
    (The device's messages, verbatim from torch's MPS allocator and dtype check, raised where it raises them.)"""
    from moshi.models import loaders

    from xbackend import CaptureRequest, capture

    def device_says(*args, **kwargs):
        raise exc

    monkeypatch.setattr(loaders, "get_moshi_lm", device_says)
    with pytest.raises(kind) as err:
        capture(CaptureRequest(backend="cpu", steps=2), tmp_path / "t")
    assert err.value.exit_code == 3 and words in str(err.value) and "does not fit" not in str(err.value)


@needs_torch
@needs_tiny
def test_a_checkpoint_that_does_not_fit_is_still_bad_input(tmp_path):
    import json
    import shutil

    from xbackend import CaptureRequest, capture
    from xbackend.capture.models import resolve_model

    tiny = resolve_model("tiny")
    shutil.copy(tiny.weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**tiny.config, "depformer_dim_feedforward": 96}))
    with pytest.raises(XBackendError) as err:
        capture(CaptureRequest(backend="cpu", model=str(tmp_path), steps=2), tmp_path / "t")
    assert err.value.exit_code == 2 and "does not fit its config" in str(err.value) and "size mismatch" in str(err.value)


# --- what installs where ------------------------------------------------------------------------

def _requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        reqs += group
    return reqs


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_mlx_installs_on_apple_silicon_and_linux_only():
    """MLX publishes no x86-64 macOS wheels: requiring it on an Intel Mac fails the whole install."""
    packaging = pytest.importorskip("packaging.requirements")
    machines = {"intel-mac": {"sys_platform": "darwin", "platform_machine": "x86_64", "platform_system": "Darwin"},
                "apple-silicon": {"sys_platform": "darwin", "platform_machine": "arm64", "platform_system": "Darwin"},
                "linux": {"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux"}}
    wanted: dict[str, set] = {m: set() for m in machines}
    for text in _requirements():
        req = packaging.Requirement(text)
        if req.name.replace("-", "_") not in ("mlx", "moshi_mlx"):
            continue
        for machine, marker_env in machines.items():
            if req.marker is None or req.marker.evaluate(dict(marker_env, extra="")) or \
                    any(req.marker.evaluate(dict(marker_env, extra=e)) for e in ("mlx", "all")):
                wanted[machine].add(req.name.replace("-", "_"))
    assert wanted["intel-mac"] == set()
    assert wanted["apple-silicon"] == {"mlx", "moshi_mlx"} and wanted["linux"] == {"mlx", "moshi_mlx"}
