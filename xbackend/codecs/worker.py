"""One codec's runs in a process of its own (`python -m xbackend.codecs.worker JOBFILE`).

Speaks `xbackend.capture.worker`'s events (`start`, `step`, `done`, `failed` a run) so `run_worker` gives
the codec stage the same isolation as `compare`: a crash, a hang or NaN in one codec is that
codec's failure, and every finished run's array is already on disk (written atomically, one file
a run, timings in `meta.json`).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import BackendFailed, XBackendError
from ..capture.models import CodecRef
from ..store.files import write_file, write_json
from ..capture.worker import STEP_EVERY, emit, take_stdout

OPERATIONS = ("encode", "encode_steps", "decode", "decode_steps")


def save_array(path: Path, array: np.ndarray) -> None:
    """Write a .npy atomically and through no link: a run killed mid-write leaves no half file."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_file(path, buf.getvalue())


def worker_main(job_file: str) -> int:
    from ..backends import load_plugin
    from . import create_codec, require_codec
    from .base import check_codebooks

    job = json.loads(Path(job_file).read_text())
    for plugin in job.get("plugins", []):
        load_plugin(plugin)
    ref = CodecRef(Path(job["weights"]), job.get("config"))
    meta_path = Path(job["meta"])
    meta: dict = {"codec": job["label"], "status": "running", "runs": {}}
    codec = None
    for run in job["runs"]:
        name = run["name"]
        emit(event="start", name=name)
        last = [0.0]

        def progress(done: int, total: int, name=name) -> None:
            now = time.monotonic()
            if now - last[0] >= STEP_EVERY or done == total:
                last[0] = now
                emit(event="step", name=name, step=done, total=total)

        try:
            if codec is None:
                started = time.perf_counter()
                codec = require_codec(create_codec(job["spec"]))
                codec.label = job["label"]
                codec.check(ref, check_codebooks(ref, job["n_codebooks"]))
                codec.load(ref, job["n_codebooks"])
                meta.update(env=codec.env(), load_s=round(time.perf_counter() - started, 4),
                            known_issues=list(codec.known_issues), hook_points=list(codec.hook_points))
            source = np.load(run["input"], allow_pickle=False)
            op = run["op"]
            if op not in OPERATIONS:
                raise XBackendError(f"Unknown codec operation {op!r}")
            started = time.perf_counter()
            try:
                result = getattr(codec, op)(source, progress)
            except XBackendError:
                raise
            except Exception as exc:
                text = str(exc).strip().splitlines()
                raise BackendFailed(f"Codec {codec.label} crashed in {op} ({type(exc).__name__}: "
                                    f"{text[0][:200] if text else ''})") from exc
            seconds = time.perf_counter() - started
            save_array(Path(run["out"]), result)
            meta["runs"][run["key"]] = {"op": op, "seconds": round(seconds, 4), "out": Path(run["out"]).name}
            write_json(meta_path, meta)
        except XBackendError as exc:
            meta.update(status="failed", error=str(exc), failed_run=run["key"])
            write_json(meta_path, meta)
            emit(event="failed", name=name, error=str(exc), exit_code=exc.exit_code)
            return exc.exit_code
        emit(event="done", name=name)
    meta["status"] = "complete"
    write_json(meta_path, meta)
    return 0


if __name__ == "__main__":
    take_stdout()
    sys.exit(worker_main(sys.argv[1]))
