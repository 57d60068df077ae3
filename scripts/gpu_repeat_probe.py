"""Why is the 7B-shaped bf16 model not bitwise repeatable on CUDA? Run-to-run checks per knob.

Builds the random bf16 model once, then for each scaled_dot_product_attention backend (default,
math, efficient, cudnn, flash) and each capture path runs two native captures and prints the
first step whose logits differ. Environment knobs (CUBLAS_WORKSPACE_CONFIG) need a fresh
process: run this script again under them.

    python scripts/gpu_repeat_probe.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
from bench import SEED, capture_loaded, random_7b  # noqa: E402
from gpu_validate import identical  # noqa: E402

from xbackend import Sampler, create_backend  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--sdp", default="default,math,efficient,cudnn,flash")
    p.add_argument("--paths", default="device,host")
    p.add_argument("--work", default="/tmp/xbackend-probe")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    backend = create_backend(f"cuda:{args.dtype}")
    backend.lm, model = random_7b("cuda", args.dtype)
    codes = np.random.default_rng(0).integers(0, 2048, size=(model.n_user, args.steps)).astype(np.int64)
    env = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE")}
    for sdp in args.sdp.split(","):
        for path in args.paths.split(","):
            backend.path_choice = path
            runs = []
            try:
                for i in range(2):
                    with sdpa_kernel([backends[sdp]]) if sdp in backends else _null():
                        ms, tr = capture_loaded(backend, model, codes, Sampler("native", SEED), args.steps,
                                                Path(args.work) / f"{sdp}-{path}-{i}", warmup=10)
                    runs.append((ms, tr))
                same = identical(runs[0][1], runs[1][1])
                row = {"tag": args.tag, "env": env, "sdp": sdp, "path": path, "ms_per_step": runs[0][0],
                       "first_logits_difference": same["first_logits_difference"], "identical": same["identical"]}
            except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                row = {"tag": args.tag, "env": env, "sdp": sdp, "path": path,
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(json.dumps(row), flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
