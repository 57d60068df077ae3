"""How fast `diff` reads traces: the plain read of both traces' logits files against the full
metrics over them, each from a cold page cache where the OS allows (scripts/bench.py prints it)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..analysis.metrics import BLOCK_STEPS, logits_file, step_metrics
from ..store.trace import Trace

_READ_BUFFER = 32 << 20


def trace_files(trace: Trace) -> list[Path]:
    return [logits_file(trace, s) for s in trace.streams]


def drop_page_cache(paths: Iterable[Path]) -> bool:
    """Ask the kernel to forget cached pages of `paths` (cold-ish reads); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_files(paths: Iterable[Path]) -> int:
    """Read files start to end into one reused buffer (the baseline the metrics race); returns bytes."""
    buf = memoryview(bytearray(_READ_BUFFER))
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


@dataclass(frozen=True)
class Throughput:
    """Plain read of both traces' logits files vs the full metrics over them."""

    steps: int
    bytes: int  # logits bytes the metrics read (both traces)
    read_bytes: int  # bytes of the plain read (whole files)
    cold: bool
    read_s: float
    diff_s: float
    diff_cpu_s: float  # CPU seconds of this process (all threads) during the metrics

    @property
    def read_mb_s(self) -> float:
        return self.read_bytes / self.read_s / 1e6

    @property
    def diff_mb_s(self) -> float:
        return self.bytes / self.diff_s / 1e6

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.diff_s

    @property
    def ratio(self) -> float:
        """Metrics speed over read speed in MB/s (1.0: as fast as reading)."""
        return self.diff_mb_s / self.read_mb_s

    def to_dict(self) -> dict:
        return {"steps": self.steps, "bytes": self.bytes, "read_bytes": self.read_bytes, "cold": self.cold,
                "read_s": self.read_s, "diff_cpu_s": self.diff_cpu_s,
                "diff_s": self.diff_s, "read_mb_s": self.read_mb_s, "diff_mb_s": self.diff_mb_s,
                "steps_per_s": self.steps_per_s, "ratio": self.ratio}


def read_throughput(*traces: Trace, cold: bool = True) -> tuple[float, int]:
    """(seconds, bytes) to read the traces' logits files, after dropping them from the page cache."""
    paths = [p for t in traces for p in trace_files(t)]
    if cold:
        drop_page_cache(paths)
    start = time.perf_counter()
    nbytes = read_files(paths)
    return time.perf_counter() - start, nbytes


def bench_diff(a: Trace, b: Trace, *, cold: bool = True, block: int = BLOCK_STEPS,
               workers: int | None = None) -> Throughput:
    """Time a plain read of both traces' logits, then `step_metrics` over them, each cold-ish."""
    paths = trace_files(a) + trace_files(b)
    n = min(a.steps, b.steps)
    read_s, read_bytes = read_throughput(a, b, cold=cold)
    dropped = drop_page_cache(paths) if cold else False
    start, cpu = time.perf_counter(), time.process_time()
    step_metrics(a, b, block=block, workers=workers)
    diff_s, diff_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    row = sum(a.meta["vocab"]) * (a.logits_itemsize + b.logits_itemsize)
    return Throughput(steps=n, bytes=n * row, read_bytes=read_bytes, cold=dropped, read_s=read_s, diff_s=diff_s,
                      diff_cpu_s=diff_cpu_s)
