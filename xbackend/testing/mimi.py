"""A full-size Mimi with random weights, for tests and benchmarks (never committed: 385 MB).

`get_mimi(None)` gives the released architecture with random SEANet and transformer weights, but
a random quantizer encodes everything to one code. As for the bundled tiny codec, the codebooks
get real spread from the encoder's own latents: each stage's 2048 codewords are drawn from a
Gaussian fitted (per dimension) to what that stage quantizes (the projected latent for the first,
the running residual for the others), measured on a few seconds of varied audio. Codes then vary
from frame to frame, and codewords are not copies of one another (no built-in near-ties).
Saved in the published layout (`in_proj_weight`), which PyTorch, moshi_mlx and rustymimi all load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..capture.models import to_published_layout
from ..codecs.base import SAMPLE_RATE


def training_audio(seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """Varied audio: the bundled prompt, a chirp, noise bursts and a few tones (float32, 24 kHz)."""
    from ..capture.prompt import DEFAULT_PROMPT, read_audio

    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    speech = read_audio(DEFAULT_PROMPT)
    x = 0.3 * np.sin(2 * np.pi * (100 + 900 * t / seconds) * t)
    x += 0.2 * np.sin(2 * np.pi * 220 * t) * (t % 0.5 < 0.25)
    x += 0.1 * rng.standard_normal(n) * (t % 0.7 < 0.2)
    x[: min(n, speech.shape[0])] += speech[:n]
    return x.astype(np.float32)


def random_mimi(path: str | Path, seed: int = 0) -> Path:
    """Write a released-shape Mimi (32 codebooks of 2048 x 256) with random weights and spread codebooks."""
    import torch
    from moshi.models.loaders import get_mimi
    from moshi.utils.compile import no_compile
    from safetensors.torch import save_file

    path = Path(path)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mimi = get_mimi(None, device="cpu", num_codebooks=32)
    audio = torch.from_numpy(training_audio(seed=seed)).view(1, 1, -1)
    with torch.no_grad(), no_compile():
        latent = mimi._encode_to_unquantized_latent(audio)  # [1, 512, frames]
        q = mimi.quantizer
        first = q.rvq_first.input_proj(latent)[0].T.double().numpy()
        rest = q.rvq_rest.input_proj(latent)[0].T.double().numpy()
    _fill(q.rvq_first.vq.layers[0], first, rng)
    residual = rest
    for layer in q.rvq_rest.vq.layers:
        centroids = _fill(layer, residual, rng)
        d = (residual ** 2).sum(1)[:, None] - 2 * residual @ centroids.T + (centroids ** 2).sum(1)[None]
        residual = residual - centroids[d.argmin(1)]
    state = to_published_layout(mimi.state_dict(), concatenate=lambda xs, axis: torch.cat(xs, dim=axis))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def _fill(layer, data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Codewords ~ N(mean, std) of `data` per dimension, written as moshi's EMA codebook state."""
    import torch

    cb = layer._codebook
    centroids = data.mean(0) + data.std(0) * rng.standard_normal((cb.embedding_sum.shape[0], data.shape[1]))
    cb.cluster_usage.fill_(1.0)
    cb.embedding_sum.copy_(torch.from_numpy(centroids).float())
    cb._initialized.fill_(1.0)
    cb.register_buffer("_embedding", None, persistent=False)
    return centroids.astype(np.float32).astype(np.float64)
