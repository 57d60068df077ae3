"""The verdict matrix on the bundled tiny model: one `compare` per row, through the public plugin API.

Prints, per row, the verdict, whether it is expected, its step/stream, the teacher-forced drift
against the tolerance and the arbiter's ratio, as the closing notes and the README quote them.

    python scripts/verdict_matrix.py [--steps 12] [--rows cpu-bf16,roll] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from xbackend.compare import CompareRequest, run_compare
from xbackend.results import times, where

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_compare import PLUGINS as COMPARE_PLUGINS  # noqa: E402  the planted plugins the tests assert on
from tests.test_planted import PLANTED  # noqa: E402

PLUGINS = {**COMPARE_PLUGINS, **PLANTED}

ROWS = {
    "twin": ("cpu", "cpu"), "cpu-mlx": ("cpu", "mlx:cpu"), "cpu-bf16": ("cpu", "cpu:bf16"),
    "cpu-fp16": ("cpu", "cpu:fp16"), "mlx-q8": ("mlx:cpu", "mlx:q8"), "mlx-q4": ("mlx:cpu", "mlx:q4"),
    "mlx-bf16": ("mlx:cpu", "mlx:cpu:bf16"), "roll": ("cpu", "roll"), "spike": ("cpu", "spike"),
    "noise6": ("cpu", "noise6"), "cpu-q4mlx": ("cpu", "mlx:q4"), "flip": ("cpu", "flip"),
    "shift5": ("cpu", "shift5"), "logprobs": ("cpu", "logprobs"), "tail50": ("cpu", "tail50"),
    "pad-fp16": ("cpu", "padfault:fp16"), "pad-bf16": ("cpu", "padfault:bf16"), "rolleven": ("cpu", "rolleven"),
    "hole11": ("cpu", "hole11"), "glitch": ("cpu", "glitch"), "nativeonly": ("cpu", "nativeonly"),
    "seed12345": ("cpu", "seed12345"), "unseeded-ref": ("unseeded", "cpu"),
    "mlxpad-bf16": ("mlx:cpu", "mlxpad:cpu:bf16"), "mlxpad-q8": ("mlx:cpu", "mlxpad:q8"),
    "mlxpad-q4": ("mlx:cpu", "mlxpad:q4"),
}


def _n(x) -> float:
    return float('nan') if x is None else float(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--arbiter", default="auto")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="xbackend-matrix-"))
    print("| reference, other | verdict | expected | step/stream | forced max abs Δlogit | sampler-visible | "
          "max deviation / noise | tolerance | arbiter medians (other / ref) | ratio | exit | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.rows.split(","):
        ref, other = ROWS[name]
        plugins = ()
        for spec in (ref, other):
            if spec.split(":")[0] in PLUGINS:
                path = root / f"plugin_{spec.split(':')[0]}.py"
                path.write_text("import numpy as np\nimport xbackend\n" + textwrap.dedent(PLUGINS[spec.split(":")[0]]))
                plugins += (str(path),)
        started = time.perf_counter()
        report = run_compare(CompareRequest(backends=(ref, other), steps=args.steps, plugins=plugins,
                                            decode_audio=False, arbiter=args.arbiter), root / name)
        (v,) = report.verdicts
        f, a = v.figures, v.figures.get("arbiter")
        arb = "-" if not a else f"{a['backend_median']:.3g} / {a['reference_median']:.3g}"
        ratio = "-" if not a else f"{times(a['ratio'])} (closer: {a['closer']})"
        print(f"| {ref}, {v.backend} | {v.verdict} | {v.label} | {where(v.first_divergence)} | "
              f"{_n(f.get('forced_max_abs')):.3g} | {_n(f.get('visible_max')):.3g} | "
              f"{_n(f.get('concentration_max')):.3g} | {f.get('tolerance', float('nan')):g} | {arb} | {ratio} | "
              f"{report.exit_code} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
