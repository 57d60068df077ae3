"""Across the context: did the runs reach the step where the model's attention window starts to slide?

A Moshi LM attends to at most `context` past positions (its config's `context`; 3000 steps, 240 s,
for Moshi 7B). PyTorch moshi keeps them in a ring of `context` entries and masks keys to
`pos_q - pos_k < context` (moshi/modules/transformer.py, `RingKVCache`, `_sa_block`'s attn_bias), so
step `context` (counting from 0) is the first whose attention drops a key. Bugs of a cache that wraps
or a window that slides (off by one, wrong order after rotation) can only show from that step on: a
run of fewer steps cannot see them, and every compare and check says so.
"""

from __future__ import annotations

from dataclasses import dataclass

PAST_CONTEXT_MARGIN = 50  # steps past the boundary that a run asked to cover it should make


@dataclass(frozen=True)
class ContextCoverage:
    """The model's context length (None when its config records none) against the steps that ran."""

    length: int | None
    steps: int

    @property
    def crossed(self) -> bool | None:
        """True when some step attended a sliding window (step index >= length); None when unknown."""
        return None if self.length is None else self.steps > self.length

    @property
    def steps_to_cross(self) -> int | None:
        """The --steps that covers the boundary with a margin."""
        return None if self.length is None else self.length + PAST_CONTEXT_MARGIN

    @property
    def note(self) -> str:
        if self.length is None:
            return "the model's config records no context length: whether cache-wrap bugs are covered is unknown"
        if self.crossed:
            return (f"context {self.length} crossed: steps {self.length} to {self.steps - 1} attend a sliding "
                    f"window of {self.length} steps, so cache-wrap bugs are covered")
        return (f"context {self.length} not reached: cache-wrap bugs are not covered; "
                f"--steps {self.steps_to_cross}")

    def to_dict(self) -> dict:
        return {"length": self.length, "steps": self.steps, "crossed": self.crossed,
                "steps_to_cross": self.steps_to_cross, "note": self.note}


def context_length(meta: dict) -> int | None:
    """The context length recorded in a trace's meta (`model.config.context`) or in a model config itself."""
    config = meta.get("model", {}).get("config") if isinstance(meta.get("model"), dict) else meta
    value = config.get("context") if isinstance(config, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def context_crossed(meta: dict, steps: int) -> ContextCoverage:
    """Did `steps` steps of the model that `meta` describes (a trace's meta or a config) cross its context?"""
    return ContextCoverage(context_length(meta), int(steps))

