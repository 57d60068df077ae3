"""Typed requests (xbackend/requests.py): `to_argv()` parsed back by the real CLI is the same request, and
report.md's Reproduce line is that argv for the request report.json recorded."""

from __future__ import annotations

import importlib
import shlex
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from xbackend.cli import app
from xbackend.requests import CaptureRequest, CompareRequest
from xbackend.samplers import SamplingSettings

runner = CliRunner()


class Built(Exception):
    """Raised by the stand-in for the command's work: the request it was given is all the test needs."""


def parsed(argv: list[str], monkeypatch, module: str, name: str):
    """The request the real command builds from `argv` (`xbackend ...`), caught before any work starts."""
    seen = []

    def record(req, *args, **kwargs):
        seen.append(req)
        raise Built

    monkeypatch.setattr(importlib.import_module(module), name, record)  # (`xbackend.capture` is also a function)
    assert argv[0] == "xbackend"
    result = runner.invoke(app, argv[1:])
    assert isinstance(result.exception, Built), (result.output, result.exception)
    assert len(seen) == 1
    return seen[0]


def every_field_set(req, defaults, unflagged: tuple[str, ...]) -> None:
    """The example sets every field away from its default, so a field the argv drops cannot pass unseen."""
    for f in fields(req):
        if f.name not in unflagged:
            assert getattr(req, f.name) != getattr(defaults, f.name), f.name


FULL_COMPARE = CompareRequest(
    backends=("cpu", "mlx:cpu:bf16"), model="/data/ckpt dir/model.safetensors", model_config="/data/config.json",
    prompt="prompt_codes.npy", seed=7, steps=33, repeats=3, timeout=12.5, alignment="upstream",
    settings=SamplingSettings(temp_text=0.6, top_k_text=11, temp_audio=0.9, top_k_audio=0),
    plugins=("flip.py", "more/other.py"), codec="mlx:cpu", arbiter="none", sampler="candle", prompt_frames=4,
    compile="off")


def test_every_compare_field_round_trips_through_the_cli(monkeypatch):
    every_field_set(FULL_COMPARE, CompareRequest(backends=()), unflagged=("decode_audio",))
    assert parsed(FULL_COMPARE.to_argv(), monkeypatch, "xbackend.compare", "run_compare") == FULL_COMPARE


@pytest.mark.parametrize("req", [
    CompareRequest(backends=("cpu", "cpu:bf16"), sampler="portable"),
    CompareRequest(backends=("cpu", "cpu:bf16"), sampler="candle", settings=SamplingSettings(0.8, 250, 0.8, 250)),
    CompareRequest(backends=("cpu", "cpu:fp16"), sampler="candle", settings=SamplingSettings(0.7, 25, 0.8, 250),
                   arbiter="cpu:fp64", timeout=1e-3),
], ids=["defaults", "candle-defaults", "candle-with-lmgen-settings"])
def test_compare_round_trips_whatever_the_sampler_defaults(req, monkeypatch):
    """The CLI fills unset settings from the sampler's defaults (candle: the Rust CLI's): all four are written."""
    assert parsed(req.to_argv(), monkeypatch, "xbackend.compare", "run_compare") == req


def test_every_capture_field_round_trips_through_the_cli(monkeypatch):
    req = CaptureRequest(backend="mlx:cpu", model="/m/model.safetensors", model_config="/m/config.json",
                         prompt="codes.npy", seed=3, steps=9, sampler="forced:/runs/a trace", alignment="upstream",
                         settings=SamplingSettings(0.5, 3, 1.5, 0), prompt_frames=2, compile="on")
    every_field_set(req, CaptureRequest(backend="cpu"), unflagged=("run_index",))
    assert parsed(req.to_argv(), monkeypatch, "xbackend.capture.run", "capture") == req


def test_the_reproduce_line_is_the_recorded_request(monkeypatch):
    """report.md's Reproduce line, parsed by the CLI, is the request that ran. It used to drop --sampler,
    --codec and --timeout: a `--sampler candle` comparison reproduced as a portable one."""
    from xbackend.report import reproduce_command
    from xbackend.results import CompareReport

    prompt = {"source": "/home/me/secret/codes.npy", "kind": "codes", "digest": "d", "frames": 4, "fed_frames": 33}
    report = CompareReport(request=FULL_COMPARE.to_record(FULL_COMPARE.model, "abc", prompt), reference="cpu",
                           backends=(), codec={"spec": FULL_COMPARE.codec})
    line = reproduce_command(report)
    assert "/home/me" not in line
    assert parsed(shlex.split(line), monkeypatch, "xbackend.compare", "run_compare") == FULL_COMPARE


def test_a_report_without_timeout_or_codec_reproduces_with_the_defaults(monkeypatch):
    """An older report.json (no timeout recorded, audio not decoded) still gives a command that runs."""
    from xbackend.report import reproduce_command
    from xbackend.results import CompareReport

    record = CompareRequest(backends=("cpu", "flip")).to_record("tiny", None, {"source": None})
    del record["timeout"], record["sampler"]
    want = CompareRequest(backends=("cpu", "flip"), sampler="portable")
    line = reproduce_command(CompareReport(request=record, reference="cpu", backends=()))
    assert parsed(shlex.split(line), monkeypatch, "xbackend.compare", "run_compare") == want
