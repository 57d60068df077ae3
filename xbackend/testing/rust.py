"""Rust session fixtures: a run's tokens written the way moshi-core's `State::step_` fills its buffers, so tests
can make session logs without the Rust app."""

from __future__ import annotations

import numpy as np


def steps_to_session(tokens: np.ndarray, user: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `xbackend.rust.logs.session_to_steps`: what moshi-core's State holds after `tokens.shape[0]` steps (-1 = UNGENERATED)."""
    steps, gen, d = tokens.shape[0], cfg["generated_audio_codebooks"], cfg["acoustic_delay"]
    audio = np.full((steps, gen + user.shape[1]), -1, dtype=np.int64)
    audio[:, 0] = tokens[:, 1]
    for s in range(steps):  # the saturating_sub write order: row 0 keeps the last early write
        audio[max(s - d, 0), 1:gen] = tokens[s, 2:]
    audio[:, gen:] = user
    return tokens[:, 0].astype(np.int64), audio
