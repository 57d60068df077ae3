"""Speed of xbackend.CandleSampler on Moshi-7B vocabularies: one text draw over 32,000 logits and
eight audio draws over 2,048 per step, top-k 250, temperature 0.8 (the Rust CLI's settings).

    python scripts/bench_candle.py [--steps 200] [--rounds 3] [--json FILE]

Prints steps/s (the median of the rounds) and the time per text and per audio draw. The logits
are random normal, scaled like a trained model's (std 3 for text, 2 for audio); one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xbackend.samplers.candle import CandleSampler  # noqa: E402
from xbackend.testing.figures import FIGURES, machine, write_figures  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=250)
    ap.add_argument("--json", default=str(FIGURES / "bench-candle.json"),
                    help="figures file (default: the one docs/performance.md quotes)")
    args = ap.parse_args()
    started = machine()
    rng = np.random.default_rng(0)
    text = (rng.standard_normal((args.steps + 1, 32000)) * 3).astype(np.float32)
    audio = (rng.standard_normal((args.steps + 1, 8, 2048)) * 2).astype(np.float32)
    rates, text_ms, audio_ms = [], [], []
    for _ in range(args.rounds):
        ts, aus = CandleSampler(299792458, args.top_k, 0.8), CandleSampler(299792458, args.top_k, 0.8)
        ts.sample(text[0])
        for c in range(8):
            aus.sample(audio[0, c])
        t_text = t_audio = 0.0
        start = time.perf_counter()
        for s in range(1, args.steps + 1):
            t0 = time.perf_counter()
            ts.sample(text[s])
            t1 = time.perf_counter()
            for c in range(8):
                aus.sample(audio[s, c])
            t_text += t1 - t0
            t_audio += time.perf_counter() - t1
        wall = time.perf_counter() - start
        rates.append(args.steps / wall)
        text_ms.append(1000 * t_text / args.steps)
        audio_ms.append(1000 * t_audio / args.steps / 8)
    result = {"steps_per_s": round(statistics.median(rates), 1), "rounds": [round(r, 1) for r in rates],
              "text_draw_ms": round(statistics.median(text_ms), 3), "audio_draw_ms": round(statistics.median(audio_ms), 3),
              "steps": args.steps, "top_k": args.top_k}
    print(f"CandleSampler, Moshi-7B vocabularies (text 32000 + 8 x audio 2048, k {args.top_k}): "
          f"{result['steps_per_s']} steps/s (median of {args.rounds} rounds: {result['rounds']}); "
          f"text draw {result['text_draw_ms']} ms, audio draw {result['audio_draw_ms']} ms")
    write_figures(args.json, result, started=started)
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
