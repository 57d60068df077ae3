"""Load once per backend per command: a run on a model that other runs used first is bitwise the
run a fresh process makes (logits, tokens, margins, digests), for PyTorch and MLX, native sampler
included; and a compare loads each backend's model exactly once."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from xbackend.capture.run import CaptureRequest, open_backend, run_loaded
from xbackend.compare import CompareRequest, run_compare
from xbackend.store.trace import load_trace

from .helpers import ROOT, have, needs_tiny, run_cli

STEPS = 24
SEED = 299792458

pytestmark = needs_tiny


def assert_bitwise(a, b):
    assert a.steps == b.steps == STEPS
    assert a.digests == b.digests
    for s in a.streams:
        assert np.array_equal(a.logits(s).view(np.uint32), b.logits(s).view(np.uint32)), s
    assert np.array_equal(a.tokens, b.tokens)
    assert np.array_equal(a.margins.view(np.uint32), b.margins.view(np.uint32))


def fresh(tmp_path, name: str, backend: str, sampler: str, seed: int = SEED):
    """The same run as `xbackend capture` makes it, in a process of its own."""
    proc = run_cli("capture", "--backend", backend, "--sampler", sampler, "--seed", str(seed),
                   "--steps", str(STEPS), "--out", str(tmp_path / name))
    assert proc.returncode == 0, proc.stderr
    return load_trace(tmp_path / name)


def sequence_on_one_model(tmp_path, backend: str):
    """native, portable, native with another seed, greedy, then native and portable again: one load."""
    session = open_backend(backend)
    plan = [("native", SEED), ("portable", SEED), ("native", 7), ("greedy", SEED), ("native", SEED),
            ("portable", SEED)]
    traces = []
    for i, (sampler, seed) in enumerate(plan):
        req = CaptureRequest(backend=backend, sampler=sampler, seed=seed, steps=STEPS)
        traces.append(run_loaded(session, req, tmp_path / f"seq-{i}-{sampler}-{seed}"))
    return session, traces


@pytest.mark.parametrize("backend", [
    "cpu",
    pytest.param("mlx:cpu", marks=[pytest.mark.mlx, pytest.mark.skipif(not have("moshi_mlx"),
                                                                         reason="moshi_mlx not installed")]),
])
def test_runs_on_a_reused_model_are_the_fresh_process_runs(tmp_path, backend):
    session, seq = sequence_on_one_model(tmp_path, backend)
    assert session.runs == 6 and session.loaded
    assert [t.meta["model_reused"] for t in seq] == [False] + [True] * 5
    assert seq[0].meta["load_s"] > 0 and all(t.meta["load_s"] == 0 for t in seq[1:])
    native, portable = fresh(tmp_path, "fresh-native", backend, "native"), fresh(tmp_path, "fresh-portable", backend,
                                                                                 "portable")
    assert not native.meta["model_reused"]
    assert_bitwise(seq[0], native)  # first run on the loaded model
    assert_bitwise(seq[4], native)  # after four other runs, one with another seed: the RNG is re-seeded
    assert_bitwise(seq[1], portable)
    assert_bitwise(seq[5], portable)
    # the other seed really drew other tokens: the equalities above are not vacuous
    assert not np.array_equal(seq[2].tokens, seq[0].tokens)


def test_compare_loads_each_backend_once(tmp_path):
    report = run_compare(CompareRequest(backends=("cpu", "cpu"), steps=12, repeats=3, decode_audio=False,
                                        arbiter="none"), tmp_path / "run").to_dict()
    t = report["timing"]
    # per backend: 3 native repeats and the portable run; the second also its forced run
    assert t["runs"] == 9 and t["loads"] == 2
    assert t["model_load_s"] > 0 and t["model_steps_s"] > 0
    assert t["other_s"] == pytest.approx(t["wall_s"] - t["model_steps_s"] - t["model_load_s"], abs=2e-3)
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "traces").glob("*/*/meta.json"))]
    assert sorted(m["model_reused"] for m in metas) == [False] * 2 + [True] * 7
    assert all(m["status"] == "complete" for m in metas)
    assert report["verdicts"][0]["verdict"] == "IDENTICAL"
    words = {(r["backend"], r["run"]): r for r in report["words"]["runs"]}
    assert len(words) == 9 and words[("cpu", "native-0")]["text"]
    assert words[("cpu#2", "native-2")]["text"] == words[("cpu", "native-0")]["text"]
    assert words[("cpu#2", "native-2")]["first_divergence"] is None


def test_prepared_workers_never_outlive_the_command(tmp_path, monkeypatch):
    """The next backend's worker starts early; one prepared for a backend that never runs is killed."""
    from xbackend import compare
    from xbackend.capture import worker

    started = []

    def spy(spec, preload=None):
        proc = worker.prepare_worker(spec, preload)
        started.append((spec, proc))
        return proc

    monkeypatch.setattr(compare, "prepare_worker", spy)
    report = run_compare(CompareRequest(backends=("mps", "cpu", "cpu"), steps=8, repeats=1, arbiter="none"),
                         tmp_path / "run").to_dict()
    # the first backend's worker is started before anyone knows mps cannot run here; then, while
    # cpu runs (in a worker of its own), the worker of cpu#2
    assert [s for s, _ in started] == ["mps", "cpu"]
    assert all(p.poll() is not None for _, p in started)
    assert [b["status"] for b in report["backends"]] == ["unavailable", "ok", "ok"]
    # each backend's audio was decoded (in a thread, while the next backend ran)
    assert sorted(report["audio"]) == ["cpu", "cpu#2"]
    assert all((tmp_path / "run" / path).is_file() for path in report["audio"].values())
    assert report["timing"]["loads"] == 2 and report["timing"]["workers_s"] > report["timing"]["model_steps_s"]


def test_compare_cli_prints_words_and_loads(tmp_path):
    proc = run_cli("compare", "--backends", "cpu,cpu", "--steps", "12", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    # one load per backend, and one for the arbiter (cpu:fp64, in the reference's worker)
    assert "3 model loads" in proc.stdout and "over 8 runs" in proc.stdout
    assert "words (tokenizer.model;" in proc.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    text = report["words"]["runs"][0]["text"]
    assert text and f"  cpu#2 native-1  {text}" in proc.stdout


def test_the_first_worker_loads_its_model_before_its_job_arrives(tmp_path):
    """compare's first worker loads while the parent encodes the prompt: the weights may be gone by the time
    the job arrives, the runs still use them, and the first trace records the load (the second reuses it)."""
    from xbackend.capture import worker
    from xbackend.capture.worker import request_to_json

    model = tmp_path / "model"
    shutil.copytree(ROOT / "reference" / "models" / "tiny", model)
    proc = worker.prepare_worker("cpu", (str(model), None))
    event = json.loads(proc.stdout.readline())
    assert event["event"] == "preloaded" and event["failed"] is False and event["load_s"] > 0
    (model / "model.safetensors").unlink()  # loaded already: no run reads the weights again
    runs = [{"name": f"cpu/native-{i}", "out": str(tmp_path / f"n{i}"),
             "request": request_to_json(CaptureRequest(backend="cpu", model=str(model), steps=3, run_index=i,
                                                       compile="off"))} for i in range(2)]
    outcomes = worker.run_worker({"plugins": [], "runs": runs}, tmp_path / "job.json", 300, prepared=proc)
    assert [o.status for o in outcomes] == ["ok", "ok"], outcomes
    metas = [load_trace(tmp_path / f"n{i}").meta for i in range(2)]
    assert [m["model_reused"] for m in metas] == [False, True]
    assert metas[0]["load_s"] == pytest.approx(event["load_s"], abs=1e-3) and metas[1]["load_s"] == 0


def test_a_preload_that_fails_is_recorded_by_the_first_run(tmp_path):
    """A load that fails ahead of the job is raised, unchanged, by the first run: its trace records it."""
    import dataclasses

    from xbackend.errors import BackendFailed
    from xbackend.capture.models import resolve_model

    session = open_backend("cpu", "tiny")
    session.model = dataclasses.replace(resolve_model("tiny"), weights=tmp_path / "gone.safetensors")
    session.preload()
    assert session.failure is not None and not session.loaded
    with pytest.raises(BackendFailed, match="crashed at step 0"):
        run_loaded(session, CaptureRequest(backend="cpu", steps=3, compile="off"), tmp_path / "n0")
    meta = json.loads((tmp_path / "n0" / "meta.json").read_text())
    assert meta["status"] == "failed" and "gone.safetensors" in meta["error"]
    assert session.failure is None  # raised once; a second run tries to load again
