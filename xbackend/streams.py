"""Moshi's token streams, as every module names them: `text`, then `audio0` .. `audio{dep_q-1}`, and the text
stream's padding token."""

from __future__ import annotations

from collections.abc import Mapping

TEXT = "text"
TEXT_PADDING_ID = 3  # moshi's `existing_text_padding_id` in Kyutai's models, where a trace does not record one


def stream_names(dep_q: int) -> list[str]:
    """The generated streams of a model with `dep_q` audio codebooks: text first, then one per codebook."""
    return [TEXT] + [f"audio{i}" for i in range(dep_q)]


def text_padding_id(meta: Mapping) -> int:
    """The model's text padding token for a trace's meta.json (`model.config.existing_text_padding_id`), the
    one reading of it: `TEXT_PADDING_ID` when unrecorded or not an integer."""
    model = meta.get("model") if isinstance(meta.get("model"), Mapping) else {}
    config = model.get("config") if isinstance(model.get("config"), Mapping) else {}
    pad = config.get("existing_text_padding_id")
    return pad if isinstance(pad, int) and not isinstance(pad, bool) else TEXT_PADDING_ID
