"""A backend's runs in a process of their own (`python -m xbackend.capture.worker JOBFILE`).

`compare`, `repeat` and `check` start one worker per backend, so a crash, a hang or a NaN in
one backend cannot take the others down. A worker loads its model once and runs every run of its
job on it (native repeats, portable, forced, arbiter: any list of requests). It reports on stdout,
one JSON object a line: `start`, `step`, `done` or `failed` for each run. The events go out on the
process's original stdout, which the worker takes for itself at start: fd 1 then points at stderr, so
whatever a plugin or library prints (at import, in a hook) can never pass for an event.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import XBackendError
from ..store.files import write_file

STEP_EVERY = 0.25  # seconds between step events, so progress bars move without flooding the pipe


@dataclass(frozen=True)
class RunOutcome:
    name: str
    out: str
    status: str  # ok | failed | timeout | skipped
    error: str | None = None
    exit_code: int = 0


_EVENTS = None  # the protocol stream, once take_stdout() has run


def take_stdout() -> None:
    """Keep the original stdout for events only and point fd 1 (and so sys.stdout) at stderr."""
    global _EVENTS
    import os

    sys.stdout.flush()
    _EVENTS = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)


def emit(**event) -> None:
    out = _EVENTS or sys.stdout
    out.write(json.dumps(event) + "\n")
    out.flush()


def request_to_json(req) -> dict:
    return asdict(req)


def request_from_json(data: dict):
    from .run import CaptureRequest
    from ..samplers import SamplingSettings

    return CaptureRequest(**dict(data, settings=SamplingSettings.from_dict(data["settings"])))


def worker_main(job_file: str, sessions: dict | None = None) -> int:
    """Run a job's runs in order; each backend and model is loaded once, by its first run (or by a
    prepared worker's `preload`: `sessions`), for all of them."""
    from ..backends import load_plugin
    from .run import check_request, open_backend, run_loaded

    job = json.loads(Path(job_file).read_text())
    try:
        for plugin in job.get("plugins", []):
            load_plugin(plugin)
    except XBackendError as exc:
        first = job["runs"][0]["name"] if job["runs"] else "?"
        emit(event="failed", name=first, error=str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    # a plugin may replace the very backend a prepared worker preloaded: then nothing preloaded is used
    sessions = {} if job.get("plugins") else dict(sessions or {})
    for index, run in enumerate(job["runs"]):
        emit(event="start", name=run["name"])
        last = [0.0]

        def progress(done: int, total: int, name=run["name"]) -> None:
            now = time.monotonic()
            if now - last[0] >= STEP_EVERY or done == total:
                last[0] = now
                emit(event="step", name=name, step=done, total=total)

        try:
            req = request_from_json(run["request"])
            check_request(req)
            key = (req.backend, req.model, req.model_config)
            if index == 0 and key not in sessions:
                sessions.clear()  # preloaded for another model than the job's: never two models at once
            if key not in sessions:
                sessions[key] = open_backend(*key)
            run_loaded(sessions[key], req, run["out"], progress=progress)
        except XBackendError as exc:
            emit(event="failed", name=run["name"], error=str(exc), exit_code=exc.exit_code)
            return exc.exit_code
        emit(event="done", name=run["name"])
    return 0


def prepare_worker(spec: str, preload: tuple[str, str | None] | None = None) -> subprocess.Popen:
    """Start a worker that imports `spec`'s libraries now and waits for its job file on stdin.

    `compare` starts the next backend's worker while the current one runs, so importing torch or
    mlx overlaps model work instead of adding to it. That one loads nothing before its job arrives:
    two models in memory at once could exceed a Mac's. The first worker, with no model beside it,
    is given `preload` (model, model config) and loads it while the parent encodes the prompt."""
    model = [preload[0], preload[1] or ""] if preload else []
    return subprocess.Popen([sys.executable, "-m", "xbackend.capture.worker", "--wait", spec, *model], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_job(spec: str, model: str | None = None, model_config: str | None = None) -> tuple[str, dict]:
    """A prepared worker: import the backend's library (best effort) and load `model` if given, then
    read the job file's path. A load that fails is raised by the first run that uses it."""
    sessions: dict[tuple, object] = {}
    try:
        from ..backends import create_backend

        available = create_backend(spec).unavailable_reason() is None  # imports torch/moshi or mlx/moshi_mlx
    except Exception:  # noqa: BLE001 - a plugin's name, or a broken install: the job will say so
        available = False
    if available and model:
        from .run import open_backend

        key = (spec, model, model_config or None)
        try:
            sessions[key] = session = open_backend(*key)
            session.preload()
            failed = session.failure is not None
        except Exception:  # noqa: BLE001 - a model that does not resolve: the first run resolves it again and says why
            sessions.clear()
            failed = True
        emit(event="preloaded", name=spec, load_s=round(sessions[key].load_s, 4) if sessions else None,
             failed=failed)
    return sys.stdin.readline().strip(), sessions


def run_worker(job: dict, job_file: Path, timeout: float,
               on_event: Callable[[dict], None] | None = None, module: str = "xbackend.capture.worker",
               prepared: subprocess.Popen | None = None) -> list[RunOutcome]:
    """Run `job` in a worker process (`prepared` by `prepare_worker`, or a new `python -m module
    JOBFILE`, speaking the events above); each run gets `timeout` seconds, after which the process
    is killed."""
    write_file(job_file, json.dumps(job, indent=2).encode())
    if prepared is not None and prepared.poll() is None:
        proc = prepared
        try:
            proc.stdin.write(f"{job_file}\n")
            proc.stdin.close()
        except OSError:  # it died while waiting: the crash is reported below like any other
            pass
    else:
        proc = subprocess.Popen([sys.executable, "-m", module, str(job_file)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    stderr: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    outcomes: dict[str, RunOutcome] = {}
    names = {r["name"] for r in job["runs"]}
    # `timeout` also bounds the time before the first run starts (plugins loading) and between runs
    current, deadline = None, time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            stuck = current or next((r["name"] for r in job["runs"] if r["name"] not in outcomes), None)
            if stuck is not None:
                why = "no end of run" if current else "no run started: the worker hung loading plugins or libraries"
                outcomes[stuck] = RunOutcome(stuck, _out(job, stuck), "timeout", f"timed out after {timeout:g} s ({why})", 3)
            current = None
            break
        if line is None:
            break
        event = _event(line)
        if event is None or event["name"] not in names:
            continue  # not an event of this job
        name = event["name"]
        if event["event"] == "start":
            current, deadline = name, time.monotonic() + timeout
        elif event["event"] == "done":
            outcomes[name] = RunOutcome(name, _out(job, name), "ok")
            current, deadline = None, time.monotonic() + timeout
        elif event["event"] == "failed":
            code = event.get("exit_code")
            outcomes[name] = RunOutcome(name, _out(job, name), "failed", str(event.get("error"))[:2000],
                                        code if isinstance(code, int) and not isinstance(code, bool) else 3)
            current, deadline = None, time.monotonic() + timeout
        if on_event:
            on_event(event)
    proc.wait()
    died = None
    if current is None and not outcomes and job["runs"]:
        current = job["runs"][0]["name"]  # it died before its first run began (at spawn, or loading plugins)
        died = "before its first run started"
    if current is not None and current not in outcomes:  # the process died inside a run: a crash
        tail = [x.strip() for x in stderr if x.strip()]
        why = tail[-1][:300] if tail else "no message"
        outcomes[current] = RunOutcome(current, _out(job, current), "failed",
                                       f"worker process {_death(proc.returncode)}{' ' + died if died else ''} "
                                       f"({why})", 3)
    cause = next((o for o in outcomes.values() if o.status != "ok"), None)
    result = []
    for run in job["runs"]:
        note = (f"not run: the worker stopped after {cause.name} {cause.status} ({(cause.error or '')[:160]})"
                if cause else f"not run: the worker process {_death(proc.returncode)} before it")
        result.append(outcomes.get(run["name"]) or RunOutcome(run["name"], run["out"], "skipped", note, 3))
        if on_event and run["name"] not in outcomes:
            on_event({"event": "skipped", "name": run["name"]})
    return result


def _event(line: str) -> dict | None:
    """One protocol line as an event: an object with a known `event` and a string `name`, else None."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or event.get("event") not in ("start", "step", "done", "failed") \
            or not isinstance(event.get("name"), str):
        return None
    return event


def _death(returncode: int | None) -> str:
    """How a worker process ended, in words: `killed by SIGKILL`, `exited with code 0`."""
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _out(job: dict, name: str) -> str:
    return next(r["out"] for r in job["runs"] if r["name"] == name)


if __name__ == "__main__":
    take_stdout()
    sys.exit(worker_main(*_wait_for_job(*sys.argv[2:5])) if sys.argv[1] == "--wait" else worker_main(sys.argv[1]))
