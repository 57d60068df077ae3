"""What `xbackend locate` costs: seconds per pass and per step, against the run's own model steps.

    python scripts/bench_locate.py RUN_DIR [--backend LABEL] [--at STEP] [--window N]

RUN_DIR is a `compare` run (e.g. `xbackend compare --backends cpu,mlx:cpu --steps 70 --out runs/x`).
Prints JSON: the locate run's seconds (loads, each pass, total), steps run, and the compare run's
mean seconds per model step for comparison. Nothing is written into RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import time

from xbackend.locate import DEFAULT_WINDOW, LocateRequest, run_locate
from xbackend.store.rundir import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--backend")
    ap.add_argument("--at", type=int)
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    args = ap.parse_args()
    started = time.perf_counter()
    result = run_locate(LocateRequest(args.run_dir, args.backend, args.at, args.window), write=False)
    wall = time.perf_counter() - started
    timing = load_run(args.run_dir).report.timing or {}
    steps = result.run["steps_run"]
    passes = result.run["seconds"]
    print(json.dumps({
        "backend": result.backend, "reference": result.reference, "step": result.step, "window": args.window,
        "modules": len(result.modules), "steps_run": steps, "wall_s": round(wall, 3),
        "load_s": result.run["load_seconds"], "pass_s": passes,
        "ms_per_step_both_backends": {m: round(1000 * s / steps, 1) for m, s in passes.items()},
        "compare_ms_per_model_step": round(1000 * timing["model_steps_s"] / max(1, timing.get("runs", 1))
                                           / max(1, load_run(args.run_dir).report.request["steps"]), 1)
        if timing.get("model_steps_s") else None,
        "first": result.first.to_dict() if result.first else None,
    }, indent=2))


if __name__ == "__main__":
    main()
