"""Trace format figures for a Moshi-7B vocabulary (text 32000, 8 audio streams of 2048).

Prints, for float32 and lossless bfloat16 storage of the same logical values (bf16-rounded, as a
bf16 model computes them):
- bytes per step on disk (logits, tokens, margins, inputs, digest line), and the directory's size;
- `load_trace` time with digest verification and without (`verify=False`), and the verification
  cost per MB of stored logits (median of --repeats loads, page cache warm);
- that both traces load to the same float32 values and carry the same digests.

    python scripts/bench_trace.py --steps 600 [--json FILE]

The figures also go to FILE (default docs/figures/bench-trace.json, which docs/performance.md quotes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xbackend.testing.traces import MOSHI_7B_VOCAB, synthetic_trace  # noqa: E402
from xbackend.store.trace import load_trace  # noqa: E402
from xbackend.testing.figures import FIGURES, machine, write_figures  # noqa: E402

N_USER = 8


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=str(FIGURES / "bench-trace.json"), help="figures file")
    args = ap.parse_args()
    started, figures = machine(), {"steps": args.steps, "repeats": args.repeats, "vocab": sum(MOSHI_7B_VOCAB), "stored": {}}
    vocab = list(MOSHI_7B_VOCAB)
    print(f"vocabulary {vocab[0]} + {len(vocab) - 1} x {vocab[1]} = {sum(vocab)} logits per step, {args.steps} steps")
    with tempfile.TemporaryDirectory(prefix="xbackend-bench-trace-") as tmp:
        traces = {}
        for stored in ("float32", "bfloat16"):
            # the same bf16-valued logits both times: what a bf16 model hands to its sampler
            traces[stored] = synthetic_trace(Path(tmp) / stored, steps=args.steps, vocab=vocab, seed=3,
                                             logits_dtype="bfloat16" if stored == "bfloat16" else "float32",
                                             edit=_to_bf16 if stored == "float32" else None)
        a, b = traces["float32"], traces["bfloat16"]
        assert a.digests == b.digests, "digests must be defined over the logical values"
        assert all(np.array_equal(a.logits(s), b.logits(s)) for s in a.streams)
        print("float32 and bfloat16 traces: equal digests at every step, equal float32 values on load")
        for stored, tr in traces.items():
            files = [p for p in tr.path.iterdir() if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            logits = sum(p.stat().st_size for p in files if p.name.startswith("logits-"))
            verified = timed(lambda: load_trace(tr.path), args.repeats)
            fast = timed(lambda: load_trace(tr.path, verify=False), args.repeats)
            mb = logits / 1e6
            figures["stored"][stored] = {
                "kB_per_step": round(size / args.steps / 1e3, 1), "MB": round(size / 1e6, 1),
                "load_ms": round(fast * 1e3, 1), "load_verified_ms": round(verified * 1e3, 1),
                "verify_ms_per_MB_float32": round((verified - fast) * 1e3 / (sum(vocab) * 4 * args.steps / 1e6), 2)}
            print(f"{stored:8}: {size / args.steps / 1e3:7.1f} kB per step on disk ({size / 1e6:.1f} MB in all, "
                  f"logits {logits / args.steps / 1e3:.1f} kB/step); load {fast * 1e3:6.1f} ms without digest "
                  f"verification, {verified * 1e3:6.1f} ms with it: {(verified - fast) * 1e3 / mb:.2f} ms per MB "
                  f"of stored logits ({(verified - fast) * 1e3 / (sum(vocab) * 4 * args.steps / 1e6):.2f} ms per MB "
                  "of float32 values)")
    write_figures(args.json, figures, started=started)
    print(f"figures written to {args.json}")


def _to_bf16(step: int, stream: int, z: np.ndarray) -> np.ndarray:
    from xbackend.store.trace import round_logits

    return round_logits(z, "bfloat16")


if __name__ == "__main__":
    main()
