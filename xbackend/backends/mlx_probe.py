"""Recording moshi_mlx's mapped modules step by step, for `locate`.

MLX has no hooks: each mapped module is replaced in its parent (`layers[i]`, `self.gating`) by a
recording module that calls it; the originals are put back on exit. Captures stay lazy and are
evaluated once per step (`mx.eval` on all of them), then copied to the host. Keys attended are the
keys handed to `mx.fast.scaled_dot_product_attention` (after moshi_mlx's own context trimming),
patched only while a step of this probe runs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import XBackendError
from .modulemap import ModuleEntry
from .probe import Probe


def _parent(root, path: str):
    """(object holding the last part, last part as a list index or attribute name). A module that a
    plugin wrapped (`on_load`) is looked through: a wrapper without the part, holding one module, holds it."""
    obj = root
    parts = path.split(".")
    for part in parts[:-1]:
        obj = _get(*_holder(obj, part))
    return _holder(obj, parts[-1])


def _holder(obj, part: str):
    if isinstance(obj, list):
        return obj, int(part)
    while part not in obj:
        inside = [v for v in obj.values() if isinstance(v, dict) and hasattr(v, "children")]
        if len(inside) != 1:
            raise XBackendError(f"moshi_mlx module {type(obj).__name__} has no {part!r}",
                                asked="locate records the modules of moshi_mlx's Lm, by the names load_pytorch_weights "
                                "fills", fix="a plugin that replaces modules must keep the inner one as its only child")
        obj = inside[0]
    return obj, part


def _get(obj, key):
    return obj[key] if isinstance(key, int) else getattr(obj, key)


def _set(obj, key, value) -> None:
    if isinstance(key, int):
        obj[key] = value
    else:
        setattr(obj, key, value)


class MlxProbe(Probe):
    def __init__(self, lm, entries: list[ModuleEntry], on_device: Callable):
        super().__init__(entries, lambda e: e.mlx_name)
        self.lm, self.on_device = lm, on_device
        self._installed: list[tuple] = []
        self._sdpa = None

    def __enter__(self) -> MlxProbe:
        tap = _tap_class()
        for path in self.paths:  # deepest first: a layer is wrapped after its parts
            entry = next(e for e in self.entries if e.mlx_name == path)  # one MLX module per entry
            parent, key = _parent(self.lm, path)
            inner = _get(parent, key)
            _set(parent, key, tap(inner, self, entry))
            self._installed.append((path, inner))
        return self

    def __exit__(self, *exc) -> None:
        for path, inner in reversed(self._installed):
            parent, key = _parent(self.lm, path)
            _set(parent, key, inner)
        self._installed = []

    def begin(self, step: int, keep: bool, record_inputs: bool = False, feed: dict | None = None) -> None:
        import mlx.core as mx

        super().begin(step, keep, record_inputs, feed)
        self._sdpa = mx.fast.scaled_dot_product_attention
        inner = self._sdpa

        def counting(q, k, v, *args, **kwargs):
            if self.keep and self.current_attention is not None:
                self.keys[self.current_attention] = int(k.shape[2])
            return inner(q, k, v, *args, **kwargs)

        mx.fast.scaled_dot_product_attention = counting

    def end(self) -> None:
        import mlx.core as mx

        if self._sdpa is not None:
            mx.fast.scaled_dot_product_attention = self._sdpa
            self._sdpa = None
        with self.on_device():
            mx.eval(list(self.outputs.values()) + list(self.inputs.values()))
        self.outputs = {k: _host(v) for k, v in self.outputs.items()}
        self.inputs = {k: _host(v) for k, v in self.inputs.items()}


def _host(x) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32))


_TAP = None


def _tap_class():
    """The recording module (an `nn.Module`, so that its parent keeps it as a child); made once."""
    global _TAP
    if _TAP is not None:
        return _TAP
    import mlx.core as mx
    import mlx.nn as nn

    class Tap(nn.Module):
        def __init__(self, inner, probe: MlxProbe, entry: ModuleEntry):
            super().__init__()
            self.inner = inner
            self._probe, self._entry = probe, entry

        def __call__(self, xs, *args, **kwargs):
            probe, entry = self._probe, self._entry
            fed = probe.fed(entry)
            if fed is not None:
                xs = mx.array(fed).astype(xs.dtype).reshape(xs.shape)
            if probe.record_inputs:
                probe.inputs[entry.name] = xs
            attention = entry.kind == "attention"
            if attention:
                probe.current_attention = entry.name
            out = self.inner(xs, *args, **kwargs)
            if attention:
                probe.current_attention = None
                cache = kwargs.get("cache", args[0] if args else None)
                if probe.keep and hasattr(cache, "offset"):
                    probe.last_position[entry.name] = int(cache.offset) - 1
            if probe.keep:
                probe.outputs[entry.name] = out
            return out

    _TAP = Tap
    return Tap
