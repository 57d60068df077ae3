"""What a module probe keeps for one step, whatever the framework (torch_probe, mlx_probe).

Per step: each mapped module's output (only on steps of the window, `keep`), its input (only when
asked, for feeding another backend: `record_inputs`), and for attention modules the keys attended
and the last cache position. With `feed`, a module's input is replaced by the given array (the
reference's input of that module at that step): the isolated mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .modulemap import ModuleEntry


@dataclass(frozen=True)
class ProbeStep:
    step: int
    outputs: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    keys: dict[str, int]  # attention module -> keys attended (measured at the attention call)
    last_position: dict[str, int]  # attention module -> position of the newest cached key


class Probe:
    def __init__(self, entries: list[ModuleEntry], path_of: Callable[[ModuleEntry], str]):
        self.entries = entries
        self._table = {(path_of(e), e.stream): e for e in entries}
        self.paths = sorted({path_of(e) for e in entries}, key=lambda p: (-p.count("."), p))  # deepest first
        self.step, self.keep, self.record_inputs, self.feed = -1, False, False, None
        self.current_attention: str | None = None
        self._clear()

    def _clear(self) -> None:
        self.outputs, self.inputs, self.keys, self.last_position = {}, {}, {}, {}

    def entry(self, path: str, stream: str) -> ModuleEntry | None:
        return self._table.get((path, stream))

    def fed(self, entry: ModuleEntry) -> np.ndarray | None:
        return None if self.feed is None else self.feed.get(entry.name)

    def begin(self, step: int, keep: bool, record_inputs: bool = False, feed: dict | None = None) -> None:
        self.step, self.keep, self.record_inputs, self.feed = step, keep, record_inputs, feed
        self.current_attention = None
        self._clear()

    def end(self) -> None:
        """After the step: the arrays are on the host (framework probes convert before this)."""

    def take(self) -> ProbeStep:
        """The step's records, then forget them: only one step is held."""
        out = ProbeStep(self.step, self.outputs, self.inputs, self.keys, self.last_position)
        self._clear()
        return out
