"""Recording moshi's (PyTorch) mapped modules step by step, for `locate`.

Forward hooks on the module itself (moshi's gating calls `F.linear` on its weights, so hooks on
`gating.linear_in` would never fire; `gating` is hooked). The depformer runs one module for every
codebook, so the codebook is read from `LMModel.forward_depformer(cb_index, ...)`, wrapped on the
instance. Keys attended are counted where attention happens: the boolean mask moshi hands to
`F.scaled_dot_product_attention`, patched only while a step of this probe runs. Hooks fire only
outside CUDA graphs: the backend's `steps()` runs them off.
"""

from __future__ import annotations

import numpy as np

from .modulemap import ModuleEntry
from .probe import Probe


class TorchProbe(Probe):
    def __init__(self, lm, entries: list[ModuleEntry]):
        super().__init__(entries, lambda e: e.torch_name)
        self.lm = lm
        self.codebook: int | None = None
        self._handles: list = []
        self._saved_depformer = None
        self._sdpa = None

    def __enter__(self) -> TorchProbe:
        for torch_name in self.paths:
            module = self.lm.get_submodule(torch_name)
            self._handles.append(module.register_forward_pre_hook(self._pre(torch_name)))
            self._handles.append(module.register_forward_hook(self._post(torch_name)))
        self._saved_depformer = self.lm.__dict__.get("forward_depformer")
        inner = self.lm.forward_depformer

        def forward_depformer(cb_index, *args, **kwargs):
            self.codebook = int(cb_index)
            try:
                return inner(cb_index, *args, **kwargs)
            finally:
                self.codebook = None

        self.lm.forward_depformer = forward_depformer
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._saved_depformer is None:
            self.lm.__dict__.pop("forward_depformer", None)
        else:
            self.lm.forward_depformer = self._saved_depformer

    # --- per step --------------------------------------------------------------------------------

    def begin(self, step: int, keep: bool, record_inputs: bool = False, feed: dict | None = None) -> None:
        import torch.nn.functional as F

        super().begin(step, keep, record_inputs, feed)
        self._sdpa = F.scaled_dot_product_attention
        inner = self._sdpa

        def counting(q, k, v, attn_mask=None, *args, **kwargs):
            if self.keep and self.current_attention is not None:
                n = int(k.shape[-2]) if attn_mask is None else int(attn_mask.reshape(-1, attn_mask.shape[-1])[-1].sum())
                self.keys[self.current_attention] = n
            return inner(q, k, v, attn_mask, *args, **kwargs)

        F.scaled_dot_product_attention = counting

    def end(self) -> None:
        import torch.nn.functional as F

        if self._sdpa is not None:
            F.scaled_dot_product_attention = self._sdpa
            self._sdpa = None
        super().end()

    def _stream(self) -> str:
        return "text" if self.codebook is None else f"audio{self.codebook}"

    def _pre(self, torch_name: str):
        def hook(module, args):
            entry = self.entry(torch_name, self._stream())
            if entry is None or not args:
                return None
            x = args[0]
            fed = self.fed(entry)
            if fed is not None:
                import torch

                x = torch.from_numpy(fed).to(device=x.device, dtype=x.dtype).view_as(x)
                args = (x,) * len(args) if entry.kind == "attention" else (x, *args[1:])  # self_attn(x, x, x)
            if self.record_inputs:
                self.inputs[entry.name] = _host(x)
            if entry.kind == "attention":
                self.current_attention = entry.name
            return args if fed is not None else None
        return hook

    def _post(self, torch_name: str):
        def hook(module, args, output):
            entry = self.entry(torch_name, self._stream())
            if entry is None:
                return None
            if entry.kind == "attention":
                self.current_attention = None
                if self.keep:
                    kv = getattr(getattr(module, "_streaming_state", None), "kv_cache", None)
                    if kv is not None:
                        self.last_position[entry.name] = int(kv.end_offset.reshape(-1)[0]) - 1
            if self.keep:
                self.outputs[entry.name] = _host(output)
            return None
        return hook


def _host(x) -> np.ndarray:
    return x.detach().float().cpu().numpy().copy()
