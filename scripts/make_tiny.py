#!/usr/bin/env python
"""Build the bundled reference assets: a tiny Moshi LM and a tiny Mimi codec.

Why this exists: every backend test and demo needs a model that (a) has exactly the structure of
Moshi 7B (16 streams in, 8 generated, delays, per-step depformer weights, RMSNorm, SiLU gating,
RoPE), (b) is small enough to commit and to run on a laptop CPU, (c) is stored in the *published*
checkpoint layout that both `moshi` (PyTorch) and `moshi_mlx` load, and (d) gives logits that look
trained (peaked text, moderately spread audio), because random weights give near-uniform
distributions on which sampler or numerical differences between backends are invisible.

Everything here is deterministic (fixed seeds, one CPU thread), so re-running it rewrites
byte-identical files on the same library versions:

    /tmp/venvA/bin/python scripts/make_tiny.py                 # codec + LM + checks + README
    /tmp/venvA/bin/python scripts/make_tiny.py --make-prompt   # first regenerate hello.wav
    /tmp/venvA/bin/python scripts/make_tiny.py --verify        # only check the committed files

Outputs (paths relative to the repository root):
    reference/prompts/hello.wav              (only with --make-prompt; otherwise read)
    reference/codecs/tiny/{config.json,model.safetensors}
    reference/models/tiny/{config.json,model.safetensors,README.md}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# moshi compiles its RMSNorm/gating kernels lazily with torch.compile; on CPU that is slow and
# needs a C compiler. Eager mode gives the same numbers, so turn compilation off before import.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moshi.models import loaders  # noqa: E402
from moshi.models.lm import LMGen, LMModel  # noqa: E402
from moshi.models.lm_utils import _delay_sequence  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ROOT / "reference" / "prompts" / "hello.wav"
CODEC_DIR = ROOT / "reference" / "codecs" / "tiny"
MODEL_DIR = ROOT / "reference" / "models" / "tiny"

SEED = 1234
GEN_SEED = 299792458  # seed of the documented LMGen measurement
SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # one 12.5 Hz step at 24 kHz
PROMPT_TEXT = "Hello, can you hear me?"
MAX_FILE_BYTES = 2_000_000

# --- Configurations ---------------------------------------------------------------------------

# Tiny sizes, Moshi 7B structure (same keys as moshi.models.loaders._lm_kwargs).
# dim 40 (not 64) keeps the float32 checkpoint under 2 MB: 16 input embeddings of 257 x dim
# dominate the size. dim != depformer_dim and text_card != card on purpose, so a backend that
# transposes a projection or mixes up the text and audio vocabularies fails loudly.
# Head dims are 8 (main) and 16 (depformer), and 2 * int(4.125 * dim) // 3 == 11 * dim // 4
# for dim % 8 == 0, so PyTorch's and MLX's gating hidden sizes agree (110 and 88).
LM_CONFIG = dict(loaders._lm_kwargs)
LM_CONFIG.update(
    dim=40,
    text_card=320,
    card=256,
    num_heads=5,
    num_layers=2,
    depformer_dim=32,
    depformer_dim_feedforward=int(4.125 * 32),
    depformer_num_heads=2,
    depformer_num_layers=1,
)

# Mimi's default config with a narrow SEANet, a one-layer transformer and 8 x 256-entry codebooks.
MIMI_CONFIG = copy.deepcopy(loaders._mimi_config)
MIMI_CONFIG["seanet"].update(dimension=32, n_filters=4)
MIMI_CONFIG["transformer"].update(
    d_model=32, num_heads=2, num_layers=1, dim_feedforward=128,
    input_dimension=32, output_dimensions=[32],
)
MIMI_CONFIG["quantizer"].update(dimension=16, n_q=8, bins=LM_CONFIG["card"],
                                input_dimension=32, output_dimension=32)

# Synthetic training data (see `synthetic_codes`).
PAD, EPAD = 3, 0  # moshi's text padding and end-of-padding ids
N_WORDS = 64
WORD0 = 16  # first-piece ids 16..79, second-piece ids 80..143
AUDIO_SIGMA = [0.8 + 0.2 * k for k in range(8)]  # noise of audio codebook k, in code steps


def seed_everything(seed: int = SEED) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# --- Prompt -----------------------------------------------------------------------------------

def make_prompt(path: Path = PROMPT) -> None:
    """Speak PROMPT_TEXT with espeak-ng and store it as 24 kHz mono 16-bit WAV.

    espeak-ng writes 22.05 kHz; sox resamples without dither (so the result is repeatable). If sox
    is missing, numpy's FFT resampling is used instead.
    """
    if shutil.which("espeak-ng") is None:
        raise SystemExit("--make-prompt needs espeak-ng (apt-get install espeak-ng)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), PROMPT_TEXT], check=True)
        if shutil.which("sox"):
            subprocess.run(["sox", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
                            str(path)], check=True)
        else:
            data, rate = sf.read(str(raw), dtype="float64", always_2d=True)
            mono = data.mean(axis=1)
            n_out = int(round(len(mono) * SAMPLE_RATE / rate))
            spec = np.fft.rfft(mono)[: n_out // 2 + 1]
            out = np.fft.irfft(spec, n=n_out) * (n_out / len(mono))
            sf.write(str(path), np.clip(out, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    info = sf.info(str(path))
    assert info.samplerate == SAMPLE_RATE and info.channels == 1 and info.duration <= 3.0, info
    print(f"prompt: wrote {path.relative_to(ROOT)} ({info.duration:.2f} s)")


def load_prompt() -> np.ndarray:
    data, rate = sf.read(str(PROMPT), dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE, f"{PROMPT} must be {SAMPLE_RATE} Hz, run with --make-prompt"
    return data.mean(axis=1)


# --- Codec ------------------------------------------------------------------------------------

def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Plain Lloyd k-means (float64, deterministic given `rng`). Returns centroids and counts.

    An empty cluster is moved onto the point worst served by its centroid, so all k codes end up
    in use, which is what makes the codes of a real utterance varied.
    """
    x = x.astype(np.float64)
    centroids = x[rng.choice(len(x), size=k, replace=False)].copy()
    for _ in range(iters):
        d = sq_dists(x, centroids)
        assign = d.argmin(1)
        counts = np.bincount(assign, minlength=k)
        for c in np.flatnonzero(counts == 0):
            worst = d[np.arange(len(x)), assign].argmax()
            centroids[c] = x[worst]
            assign[worst] = c
            d[worst] = 0.0
            counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        nonzero = counts > 0
        centroids[nonzero] = sums[nonzero] / counts[nonzero, None]
    counts = np.bincount(sq_dists(x, centroids).argmin(1), minlength=k)
    return centroids, counts


def sq_dists(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [N, K], clipped at 0 against rounding."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None]
    return np.maximum(d, 0.0)


def set_codebook(vq_layer, centroids: np.ndarray, counts: np.ndarray) -> None:
    """Write k-means results into a moshi EuclideanCodebook the way its EMA training would.

    The codebook stores `embedding_sum` and `cluster_usage` and derives the centroids as their
    ratio; `_initialized` marks the k-means init as done; the cached `_embedding` must be dropped.
    """
    cb = vq_layer._codebook
    usage = torch.from_numpy(np.maximum(counts, 1)).float()
    cb.cluster_usage.copy_(usage)
    cb.embedding_sum.copy_(torch.from_numpy(centroids).float() * usage[:, None])
    cb._initialized.fill_(1.0)
    cb.register_buffer("_embedding", None, persistent=False)


def prompt_variants(wav: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Time-shifted, rescaled copies of the prompt: enough latent frames to fit 256 centroids."""
    shifts = range(0, FRAME_SIZE, 48)
    gains = [0.5, 0.71, 1.0, 1.41]
    n = len(wav) + FRAME_SIZE
    out = np.zeros((len(shifts) * len(gains), 1, n), np.float32)
    i = 0
    for s in shifts:
        for g in gains:
            out[i, 0, s: s + len(wav)] = g * wav * (1 + 0.05 * rng.standard_normal())
            i += 1
    return torch.from_numpy(out)


def build_codec(wav: np.ndarray):
    """Random-init tiny Mimi whose quantizer codebooks are k-means fits of the prompt's latents.

    A random quantizer maps everything to code 0. Mimi's split RVQ quantizes the latent twice:
    `rvq_first` (1 "semantic" codebook) and `rvq_rest` (7 acoustic stages, each on the residual
    of the previous), each behind its own 1x1 input projection. We fit them in that order.
    """
    seed_everything()
    rng = np.random.default_rng(SEED)
    mimi = loaders.get_mimi(None, MIMI_CONFIG)
    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(prompt_variants(wav, rng))  # [B, 32, T]
    q = mimi.quantizer
    bins = MIMI_CONFIG["quantizer"]["bins"]
    with torch.no_grad():
        first = q.rvq_first.input_proj(latent).permute(0, 2, 1).reshape(-1, 16).numpy()
        rest = q.rvq_rest.input_proj(latent).permute(0, 2, 1).reshape(-1, 16).numpy()
    print(f"codec: fitting codebooks on {len(first)} latent frames")
    centroids, counts = kmeans(first, bins, rng)
    set_codebook(q.rvq_first.vq.layers[0], centroids, counts)
    residual = rest.astype(np.float64)
    for layer in q.rvq_rest.vq.layers:
        centroids, counts = kmeans(residual, bins, rng)
        set_codebook(layer, centroids, counts)
        assign = sq_dists(residual, centroids).argmin(1)
        residual = residual - centroids[assign]
    return mimi


def save_codec(mimi) -> None:
    CODEC_DIR.mkdir(parents=True, exist_ok=True)
    (CODEC_DIR / "config.json").write_text(json.dumps(MIMI_CONFIG, indent=2) + "\n")
    state = {k: v.detach().contiguous().clone() for k, v in mimi.state_dict().items()}
    save_file(state, str(CODEC_DIR / "model.safetensors"), metadata={"format": "pt"})


def load_codec():
    config = json.loads((CODEC_DIR / "config.json").read_text())
    return loaders.get_mimi(CODEC_DIR / "model.safetensors", mimi_config=config)


def check_codec(mimi, wav: np.ndarray) -> dict:
    """Encode the prompt, decode it back; report code variety and output sanity."""
    x = torch.from_numpy(wav)[None, None]
    with torch.no_grad():
        codes = mimi.encode(x)  # [1, 8, T]
        audio = mimi.decode(codes)
    codes = codes[0].numpy()
    frames = codes.shape[1]
    rows = []
    for k, row in enumerate(codes):
        values, counts = np.unique(row, return_counts=True)
        rows.append({"codebook": k, "distinct": int(len(values)), "top_code": int(values[counts.argmax()]),
                     "top_share": float(counts.max() / frames)})
    n_params = sum(p.numel() for p in mimi.parameters())
    report = {
        "frames": frames,
        "samples_in": int(x.shape[-1]),
        "samples_out": int(audio.shape[-1]),
        "expected_out": frames * FRAME_SIZE,
        "finite": bool(torch.isfinite(audio).all()),
        "rms_out": float(audio.pow(2).mean().sqrt()),
        "params": n_params,
        "codebooks": rows,
    }
    print(f"codec: {n_params} params; prompt -> {frames} frames; decoded {report['samples_out']} samples "
          f"(expected {report['expected_out']}), finite={report['finite']}")
    for r in rows:
        print(f"  codebook {r['codebook']}: {r['distinct']:2d}/{frames} distinct codes, "
              f"most common {r['top_code']} ({100 * r['top_share']:.0f}%)")
    assert report["finite"] and report["samples_out"] == report["expected_out"]
    assert all(r["distinct"] > 1 for r in rows)
    return report


def user_codes(mimi, wav: np.ndarray, steps: int) -> torch.Tensor:
    """The prompt's codes, padded to `steps` frames with the codes of silence. [8, steps]."""
    with torch.no_grad():
        codes = mimi.encode(torch.from_numpy(wav)[None, None])[0]
        silence = mimi.encode(torch.zeros(1, 1, 4 * FRAME_SIZE))[0, :, -1:]
    pad = silence.expand(-1, max(0, steps - codes.shape[1]))
    return torch.cat([codes, pad], dim=1)[:, :steps]


# --- Synthetic data for the LM ----------------------------------------------------------------

def discrete_noise(rng: np.random.Generator, sigma: float, size) -> np.ndarray:
    return np.rint(rng.normal(0.0, sigma, size)).astype(np.int64)


def synthetic_codes(rng: np.random.Generator, batch: int, steps: int) -> torch.Tensor:
    """Sequences [B, 17, T] with learnable structure, shaped like Moshi's streams.

    text: ~80% PAD (3). A word is announced by EPAD (0) after 9-14 PADs, then spoken as one or two
        pieces; the next word follows from the previous one (w -> 5w + 7 mod 64) 80% of the time.
    audio0: on a word piece, jumps to a code given by that piece; otherwise drifts by +3 per step.
    audio k >= 1: the code of codebook k-1 at the same step, shifted by 17k.
    All audio codes get rounded-Gaussian noise whose width grows with k (0.8 to 2.2 code steps),
    like the finer, less predictable levels of a real RVQ.
    user audio (rows 9..16): uniform random; the model learns to ignore them.
    """
    card = LM_CONFIG["card"]
    codes = np.zeros((batch, 17, steps), np.int64)
    for b in range(batch):
        text = np.full(steps, PAD, np.int64)
        t = int(rng.integers(0, 12))
        word = int(rng.integers(N_WORDS))
        while t < steps:
            text[t] = EPAD
            pieces = [WORD0 + word] + ([WORD0 + N_WORDS + word] if word % 3 == 0 else [])
            for i, p in enumerate(pieces):
                if t + 1 + i < steps:
                    text[t + 1 + i] = p
            t += 1 + len(pieces) + int(rng.integers(9, 15))
            word = (5 * word + 7) % N_WORDS if rng.random() < 0.8 else int(rng.integers(N_WORDS))
        codes[b, 0] = text
        a0 = np.zeros(steps, np.int64)
        prev = int(rng.integers(card))
        noise = discrete_noise(rng, AUDIO_SIGMA[0], steps)
        for t in range(steps):
            base = 37 * int(text[t]) + 11 if text[t] >= WORD0 else prev + 3
            prev = a0[t] = (base + noise[t]) % card
        codes[b, 1] = a0
        for k in range(1, 8):
            codes[b, 1 + k] = (codes[b, k] + 17 * k + discrete_noise(rng, AUDIO_SIGMA[k], steps)) % card
        codes[b, 9:] = rng.integers(0, card, (8, steps))
    return torch.from_numpy(codes)


# --- LM ---------------------------------------------------------------------------------------

def masked_ce(logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the positions LMModel.forward marks valid (the others hold NaN)."""
    return torch.nn.functional.cross_entropy(logits[mask].float(), target[mask])


def train_lm(steps: int, batch: int = 8, seq: int = 256, lr: float = 3e-3) -> LMModel:
    """Short Adam fit of LMModel.forward on synthetic sequences (text + 8 generated audio CBs)."""
    seed_everything()
    rng = np.random.default_rng(SEED)
    model = LMModel(device="cpu", dtype=torch.float32, **LM_CONFIG)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    dep_q = LM_CONFIG["dep_q"]
    t0 = time.time()
    for step in range(steps):
        codes = synthetic_codes(rng, batch, seq)
        out = model(codes)
        text_loss = masked_ce(out.text_logits, out.text_mask, codes[:, :1])
        audio_loss = masked_ce(out.logits, out.mask, codes[:, 1:1 + dep_q])
        loss = text_loss + audio_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"lm: step {step:4d} text CE {text_loss.item():.3f} audio CE {audio_loss.item():.3f} "
                  f"({time.time() - t0:.0f} s)")
    model.eval()
    return model


def published_state(model: LMModel) -> dict[str, torch.Tensor]:
    """The state dict in the layout of Kyutai's released checkpoints.

    moshi's StreamingMultiheadAttention keeps one Linear per depformer step (`in_projs.N`,
    `out_projs.N`); the released files hold them concatenated along dim 0 in step order as
    `in_proj_weight` / `out_proj.weight` (the main transformer has a single step). moshi's
    `_load_hook` splits them back, and moshi_mlx's `load_pytorch_weights` reads only this form.
    Everything else (RMSNorm `.alpha` [1, 1, dim], `gating[.N].linear_in/out`) is unchanged.
    """
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        for part, target in ((".self_attn.in_projs.", ".self_attn.in_proj_weight"),
                             (".self_attn.out_projs.", ".self_attn.out_proj.weight")):
            if part in key:
                prefix, rest = key.split(part)
                index = int(rest.split(".")[0])
                assert rest == f"{index}.weight", key
                grouped.setdefault(prefix + target, {})[index] = value
                break
        else:
            out[key] = value
    for key, parts in grouped.items():
        out[key] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
    return {k: v.detach().float().contiguous().clone() for k, v in sorted(out.items())}


def save_lm(model: LMModel) -> None:
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    (MODEL_DIR / "config.json").write_text(json.dumps(LM_CONFIG, indent=2) + "\n")
    save_file(published_state(model), str(MODEL_DIR / "model.safetensors"), metadata={"format": "pt"})
    size = (MODEL_DIR / "model.safetensors").stat().st_size
    print(f"lm: wrote model.safetensors ({size} bytes, float32)")
    assert size <= MAX_FILE_BYTES, size


def load_lm() -> LMModel:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    return loaders.get_moshi_lm(MODEL_DIR / "model.safetensors", lm_kwargs=config, dtype=torch.float32)


def stream_stats(model: LMModel, user: torch.Tensor, steps: int = 200) -> dict[str, tuple[float, float]]:
    """Mean entropy (nats, temperature 1) and mean top-1 probability of each generated stream,
    over `steps` free-running LMGen steps (default sampling settings, seed GEN_SEED)."""
    torch.manual_seed(GEN_SEED)
    records: dict[str, list[torch.Tensor]] = {"text": []}
    records.update({f"audio{k}": [] for k in range(model.dep_q)})
    original = model.forward_depformer

    def recording_depformer(cb_index, sequence, transformer_out):
        logits = original(cb_index, sequence, transformer_out)
        records[f"audio{cb_index}"].append(logits.float().reshape(-1, logits.shape[-1]))
        return logits

    model.forward_depformer = recording_depformer  # LMGen calls it through the instance
    try:
        gen = LMGen(model, on_text_logits_hook=lambda lg: records["text"].append(
            lg.float().reshape(-1, lg.shape[-1])))
        with gen.streaming(1):
            for t in range(steps):
                gen.step(user[None, :, t: t + 1])
    finally:
        del model.forward_depformer
    stats = {}
    for name, rows in records.items():
        probs = torch.cat(rows).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        stats[name] = (float(entropy.mean()), float(probs.max(-1).values.mean()))
    return stats


def verify_mlx(steps: int = 20) -> tuple[dict[str, float], float]:
    """Load the checkpoint into PyTorch (get_moshi_lm) and moshi_mlx (load_pytorch_weights,
    strict) in float32 on CPU, drive both step by step with the same teacher-forced tokens
    (main transformer, then each depformer slice). Returns the max |logit diff| per stream and
    the largest |logit| seen (to judge the diff against)."""
    import mlx.core as mx
    from moshi_mlx import models as mlx_models

    mx.set_default_device(mx.cpu)
    config = json.loads((MODEL_DIR / "config.json").read_text())
    torch_lm = load_lm()
    mlx_cfg = mlx_models.LmConfig.from_config_dict(config)
    mlx_lm = mlx_models.Lm(mlx_cfg)
    mlx_lm.set_dtype(mx.float32)
    mlx_lm.load_pytorch_weights(str(MODEL_DIR / "model.safetensors"), mlx_cfg, strict=True)

    # Teacher-forced tokens: a synthetic sequence, delayed as LMModel.forward does it. Input at
    # step s is column s; the depformer's token inputs at step s are column s + 1 (text, audio0..6).
    rng = np.random.default_rng(SEED + 1)
    codes = synthetic_codes(rng, 1, steps + 2)
    initial = torch_lm._get_initial_token()
    delayed = torch.cat([initial, _delay_sequence(config["delays"], codes, initial)], dim=2)[0]

    names = ["text"] + [f"audio{k}" for k in range(config["dep_q"])]
    worst = {n: 0.0 for n in names}
    largest = 0.0
    for c in mlx_lm.transformer_cache:
        c.reset()
    with torch.no_grad(), torch_lm.streaming(1):
        for s in range(steps):
            col = delayed[:, s]
            dep_in = delayed[: config["dep_q"], s + 1]
            # PyTorch
            t_out, t_text = torch_lm.forward_text(col[None, :, None])
            t_logits = [t_text.reshape(-1)]
            with torch_lm.depformer.streaming(1):
                for k in range(config["dep_q"]):
                    lg = torch_lm.forward_depformer(k, dep_in[k].view(1, 1, 1), t_out)
                    t_logits.append(lg.reshape(-1))
            # MLX
            tok = [mx.array([[int(v)]]) for v in col]
            xs = mlx_lm.text_emb(tok[0])
            for k, emb in enumerate(mlx_lm.audio_embs):
                xs = xs + emb(tok[1 + k])
            m_out = mlx_lm.out_norm(mlx_lm.transformer(xs, cache=mlx_lm.transformer_cache))
            m_logits = [mlx_lm.text_linear(m_out).reshape(-1)]
            for c in mlx_lm.depformer_cache:
                c.reset()
            for k, sl in enumerate(mlx_lm.depformer.slices):
                x = sl.linear_in(m_out) + sl.emb(mx.array([[int(dep_in[k])]]))
                x = sl.transformer(x, cache=mlx_lm.depformer_cache)
                m_logits.append(sl.linear_out(x).reshape(-1))
            for name, a, b in zip(names, t_logits, m_logits):
                b = np.array(b.astype(mx.float32))
                worst[name] = max(worst[name], float(np.abs(a.numpy() - b).max()))
                largest = max(largest, float(np.abs(b).max()))
    print(f"verify: PyTorch vs MLX, {steps} teacher-forced steps, max |logit| {largest:.1f}")
    for name in names:
        print(f"  {name:7s} max abs diff {worst[name]:.2e}")
    assert max(worst.values()) < 1e-4, worst
    return worst, largest


# --- README -----------------------------------------------------------------------------------

def write_readme(trained: dict, random_init: dict, mlx_diff: dict, codec: dict, n_params: int,
                 max_logit: float) -> None:
    size = (MODEL_DIR / "model.safetensors").stat().st_size
    codec_size = (CODEC_DIR / "model.safetensors").stat().st_size
    vocab = {"text": LM_CONFIG["text_card"], **{f"audio{k}": LM_CONFIG["card"] for k in range(8)}}
    lines = [
        "# tiny: a Moshi-shaped reference model",
        "",
        f"A {n_params / 1e6:.2f}M-parameter language model with exactly the structure of Moshi 7B (16 audio",
        "codebooks in, text + 8 codebooks generated, delays, per-step depformer weights, RMSNorm,",
        "SiLU gating, RoPE) and a matching tiny Mimi codec (`reference/codecs/tiny`). Small enough",
        "to run anywhere; trained just enough that its distributions look like a real model's.",
        "",
        "Everything is produced by one deterministic script (fixed seeds, one CPU thread):",
        "",
        "```",
        "python scripts/make_tiny.py                # reads reference/prompts/hello.wav",
        "python scripts/make_tiny.py --make-prompt  # first re-speak hello.wav (espeak-ng + sox)",
        "python scripts/make_tiny.py --verify       # only re-check the committed files",
        "```",
        "",
        "## Files",
        "",
        f"- `config.json`: `LMModel` keyword arguments (the keys of moshi's `_lm_kwargs`); loads with",
        "  `moshi.models.loaders.get_moshi_lm(path, lm_kwargs=config)` and",
        "  `moshi_mlx.models.LmConfig.from_config_dict(config)`.",
        f"- `model.safetensors`: {size} bytes, float32, {n_params} parameters, in the published",
        "  checkpoint layout: attention as `self_attn.in_proj_weight` / `self_attn.out_proj.weight`",
        "  (depformer: the 8 per-step matrices concatenated along dim 0 in step order), RMSNorm",
        "  `.alpha` of shape [1, 1, dim], gating `gating.linear_in/out` (depformer",
        "  `gating.N.linear_in/out`). Loads in moshi_mlx with `Lm.load_pytorch_weights(..., strict=True)`.",
        "",
        "## Config",
        "",
        "| key | value | | key | value |",
        "|---|---|---|---|---|",
    ]
    items = [(k, json.dumps(v)) for k, v in LM_CONFIG.items()]
    half = (len(items) + 1) // 2
    for (k1, v1), right in zip(items[:half], items[half:] + [("", "")]):
        lines.append(f"| {k1} | {v1} | | {right[0]} | {right[1]} |")
    lines += [
        "",
        "Why these sizes: dim 40 (not 64) keeps the float32 file under 2 MB (the 16 input embeddings",
        "of 257 x dim dominate); dim != depformer_dim and text_card != card so a transposed projection",
        "or swapped vocabulary fails loudly; head dims are 8 (main) and 16 (depformer). For dim % 8 == 0",
        "PyTorch's gating width 2 * int(4.125 * dim) // 3 equals MLX's 11 * dim // 4 (110 here), and",
        "the depformer's 2 * 132 // 3 = 88 in both.",
        "",
        "## How it was trained",
        "",
        "Random init then AdamW on `LMModel.forward` + cross-entropy over the positions its masks mark",
        "valid, on synthetic sequences (see `synthetic_codes` in the script):",
        "",
        "- text: ~80% PAD (3); a word is announced by EPAD (0) after 9-14 PADs and spoken as one or two",
        "  pieces (ids 16..143); the next word usually follows from the previous one.",
        "- audio0 jumps to a code set by the text piece on words and drifts by +3 otherwise; codebook",
        "  k >= 1 is codebook k-1 shifted by 17k. Rounded-Gaussian noise of width 0.8..2.2 code steps",
        "  (growing with k) keeps audio distributions moderately spread.",
        "- user codebooks (rows 9..16): uniform random.",
        "",
        "## Measured behaviour",
        "",
        f"200 free-running steps of `moshi.models.lm.LMGen` (default sampling: text temp 0.7 top-k 25,",
        f"audio temp 0.8 top-k 250), `torch.manual_seed({GEN_SEED})`, float32 CPU, user input = the",
        "tiny codec's codes of `reference/prompts/hello.wav` padded with the codes of silence.",
        "Entropy is of softmax(logits) at temperature 1, in nats; top-1 is the mean largest probability.",
        "",
        "| stream | vocab | log(vocab) | entropy (trained) | top-1 (trained) | entropy (random init) | top-1 (random init) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (ent, top) in trained.items():
        r_ent, r_top = random_init[name]
        lines.append(f"| {name} | {vocab[name]} | {math.log(vocab[name]):.2f} | {ent:.2f} | {top:.3f} "
                     f"| {r_ent:.2f} | {r_top:.3f} |")
    lines += [
        "",
        "A randomly initialised model of the same config (same seed) is near-uniform: entropy close to",
        "log(vocab) and top-1 near 1/vocab, so it cannot tell samplers or backends apart.",
        "",
        "## PyTorch vs MLX",
        "",
        "The checkpoint loaded by `get_moshi_lm` (float32) and by moshi_mlx `Lm.load_pytorch_weights`",
        "(strict, float32, `mx.cpu`), driven for 20 steps with the same teacher-forced tokens through",
        "the main transformer and each depformer slice, gives these max abs logit differences",
        f"(logits reach |{max_logit:.0f}|, so this is float32 rounding, ~1e-6 relative):",
        "",
    ]
    if mlx_diff:
        lines += [
            "| stream | " + " | ".join(mlx_diff) + " |",
            "|---" * (len(mlx_diff) + 1) + "|",
            "| max abs diff | " + " | ".join(f"{v:.1e}" for v in mlx_diff.values()) + " |",
        ]
    else:
        lines.append("(not checked in this run: it was made with `--no-verify`)")
    lines += [
        "",
        "## Codec (`reference/codecs/tiny`)",
        "",
        "`get_mimi(None, mimi_config)` with moshi's default `_mimi_config` except: SEANet dimension 32,",
        "n_filters 4; a one-layer transformer (d_model 32, 2 heads, feed-forward 128); quantizer",
        f"dimension 16, n_q 8, bins {MIMI_CONFIG['quantizer']['bins']} (= the LM's card). "
        f"{codec['params']} parameters, {codec_size} bytes.",
        "Load with `get_mimi(path, mimi_config=json.load(config.json))`.",
        "",
        "The convolutions and transformer keep their random init (it is a test codec, not a good one);",
        "the codebooks are k-means fits (numpy, deterministic) to the encoder latents of time-shifted,",
        "rescaled copies of hello.wav: first `rvq_first`'s codebook, then `rvq_rest`'s 7 stages one by",
        "one on the residuals, stored as `embedding_sum` = centroid x usage, `cluster_usage` = usage,",
        "`_initialized` = 1, as moshi's EuclideanCodebook keeps them.",
        "",
        f"Encoding hello.wav ({codec['samples_in']} samples) gives {codec['frames']} frames; decoding",
        f"them gives {codec['samples_out']} samples ({codec['frames']} x 1920), all finite "
        f"(RMS {codec['rms_out']:.3f}).",
        "",
        "| codebook | distinct codes | most common code | its share |",
        "|---|---|---|---|",
    ]
    for r in codec["codebooks"]:
        lines.append(f"| {r['codebook']} | {r['distinct']} / {codec['frames']} | {r['top_code']} "
                     f"| {100 * r['top_share']:.0f}% |")
    lines += [
        "",
        "## Prompt (`reference/prompts/hello.wav`)",
        "",
        f'espeak-ng 1.51 saying "{PROMPT_TEXT}" (`espeak-ng -v en-us -s 160 -w raw.wav "..."`), resampled',
        "by `sox -D raw.wav -r 24000 -c 1 -b 16 hello.wav`: 24 kHz mono 16-bit, under 3 s.",
        "`scripts/make_tiny.py --make-prompt` redoes exactly this.",
        "",
    ]
    (MODEL_DIR / "README.md").write_text("\n".join(lines))
    print(f"readme: wrote {(MODEL_DIR / 'README.md').relative_to(ROOT)}")


def print_stats(title: str, stats: dict) -> None:
    print(title)
    for name, (ent, top) in stats.items():
        print(f"  {name:7s} entropy {ent:.2f} nats  top-1 {top:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-prompt", action="store_true", help="regenerate hello.wav with espeak-ng first")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps for the LM fit")
    parser.add_argument("--verify", action="store_true",
                        help="write nothing: re-check the committed codec, LM stats and PyTorch-vs-MLX logits")
    parser.add_argument("--no-verify", action="store_true", help="skip the PyTorch-vs-MLX logit check")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.make_prompt and not args.verify:
        make_prompt()
    wav = load_prompt()

    if not args.verify:
        save_codec(build_codec(wav))
    codec = load_codec()
    codec_report = check_codec(codec, wav)

    if not args.verify:
        save_lm(train_lm(args.steps))
    model = load_lm()
    user = user_codes(codec, wav, 200)
    trained = stream_stats(model, user)
    print_stats("lm: trained, 200 LMGen steps", trained)
    seed_everything()
    random_model = LMModel(device="cpu", dtype=torch.float32, **LM_CONFIG).eval()
    random_init = stream_stats(random_model, user)
    print_stats("lm: random init, 200 LMGen steps", random_init)

    mlx_diff, max_logit = ({}, 0.0) if args.no_verify else verify_mlx()
    if not args.verify:
        n_params = sum(p.numel() for p in model.parameters())
        write_readme(trained, random_init, mlx_diff, codec_report, n_params, max_logit)


if __name__ == "__main__":
    main()
