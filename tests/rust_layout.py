"""Write an xbackend run exactly as a Rust Moshi app would have logged it (test helper).

- `write_session`: moshi-backend's `SessionSummary` JSON and the `.safetensors` with moshi-core's
  `State` arrays (`text_tokens(false)` i64 [T], `audio_tokens(false)` i64 [T, gen + input], -1 for
  UNGENERATED), written the way `State::step_` fills them (xbackend.testing.rust.steps_to_session).
- `write_verbose_log`: what `MIMI_VERBOSE=1` prints per step: `text_ids [..]`, `audio_ids  [..] ..`
  (the model's inputs as `State::step_` builds them), `logits:` and a tensor, then
  `sampled {token} logits {slice}:` and a tensor per depformer slice.
- `write_token_lines`: an app's own lines, `Step s text token: t` after every step and
  `Step s audio tokens: [..]` with `State::last_audio_tokens()` once it is Some.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xbackend.testing.rust import steps_to_session


def rust_config(model, acoustic_delay: int) -> dict:
    return {"generated_audio_codebooks": model.dep_q, "input_audio_codebooks": model.n_user,
            "audio_vocab_size": int(model.config["card"]) + 1, "acoustic_delay": acoustic_delay,
            "text_pad_token": int(model.config["existing_text_padding_id"]), "text_eop_token": 0,
            "text_start_token": int(model.config["text_card"])}


def write_session(path: Path, tokens: np.ndarray, user: np.ndarray, cfg: dict, seed: int, settings,
                  transcript: str = "", pad_mult=None) -> Path:
    """`path` is the .json; the .safetensors goes beside it, as moshi-backend writes them."""
    from safetensors.numpy import save_file

    text, audio = steps_to_session(np.asarray(tokens, dtype=np.int64), np.asarray(user, dtype=np.int64), cfg)
    summary = {"text_temperature": settings.temp_text, "text_topk": settings.top_k_text,
               "audio_temperature": settings.temp_audio, "audio_topk": settings.top_k_audio, "max_steps": 4500,
               "audio_seed": seed, "text_seed": seed, "pad_mult": pad_mult, "repetition_penalty": None,
               "email": None, "user_feedback": None, "last_step_idx": int(tokens.shape[0]),
               "transcript": transcript, "addr": "127.0.0.1:1234", "lm_model_file": "tiny/model.safetensors",
               "mimi_model_file": "tiny/codec.safetensors", **cfg}
    path.write_text(json.dumps(summary, indent=2))
    save_file({"text": text, "audio": audio}, str(path.with_suffix(".safetensors")))
    return path


def _tensor(n: int) -> list[str]:
    return [f"[[[ 0.1250, -1.5000, ..., 0.3750]]]", f"Tensor[[1, 1, {n}], f32]"]


def write_verbose_log(path: Path, tokens: np.ndarray, user: np.ndarray, cfg: dict, text_vocab: int,
                      audio_vocab: int) -> Path:
    gen, d = cfg["generated_audio_codebooks"], cfg["acoustic_delay"]
    pad = cfg["audio_vocab_size"] - 1
    lines = ["2026-11-26T08:00:00.000Z  INFO moshi: starting the inference loop"]
    for s in range(tokens.shape[0]):
        prev_text = cfg["text_start_token"] if s == 0 else int(tokens[s - 1, 0])
        ids = []
        for cb in range(gen + user.shape[1]):
            if cb == 0:
                ids.append(pad if s == 0 else int(tokens[s - 1, 1]))
            elif cb < gen:
                ids.append(pad if s <= d else int(tokens[s - 1, 1 + cb]))
            elif cb == gen:
                ids.append(pad if s == 0 else int(user[s - 1, 0]))
            else:
                ids.append(pad if s <= d else int(user[s - d - 1, cb - gen]))
        lines.append(f"text_ids [{prev_text}]")
        lines.append("audio_ids " + "".join(f" [{x}]" for x in ids))
        lines += ["logits:"] + _tensor(text_vocab)
        for c in range(gen):
            lines.append(f"sampled {int(tokens[s, 1 + c])} logits {c}:")
            lines += _tensor(audio_vocab)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_token_lines(path: Path, tokens: np.ndarray, cfg: dict) -> Path:
    """The frame layout: after step s, last_audio_tokens() is row s - d (codebook 0 sampled at
    step s - d, the others at step s), None while s < d."""
    d = cfg["acoustic_delay"]
    lines = []
    for s in range(tokens.shape[0]):
        lines.append(f"[2026-11-26 08:00:{s % 60:02d}] DEBUG app::moshi MOSHI_DEBUG: Step {s} text token: {int(tokens[s, 0])}")
        if s >= d:
            frame = [int(tokens[s - d, 1])] + [int(x) for x in tokens[s, 2:]]
            lines.append(f"[2026-11-26 08:00:{s % 60:02d}] DEBUG app::moshi MOSHI_DEBUG: Step {s} audio tokens: "
                         f"[{', '.join(map(str, frame))}]")
        lines.append(f"[2026-11-26 08:00:{s % 60:02d}] INFO app::ws sent 1920 samples")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sampled_lines(path: Path, tokens: np.ndarray) -> Path:
    """An app that logs each step's depformer output (the sampled layout), every step."""
    lines = []
    for s in range(tokens.shape[0]):
        lines.append(f"I0000 moshi.rs:42] MOSHI_DEBUG: Step {s} text token: {int(tokens[s, 0])}")
        lines.append(f"I0000 moshi.rs:43] MOSHI_DEBUG: Step {s} audio tokens: [{', '.join(str(int(x)) for x in tokens[s, 1:])}]")
    path.write_text("\n".join(lines) + "\n")
    return path
