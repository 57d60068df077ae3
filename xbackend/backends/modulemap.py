"""Which module of moshi (PyTorch) is which module of moshi_mlx: the map `locate` records through.

Derived from `moshi_mlx.models.lm.Lm.load_pytorch_weights`, the converter that loads one
checkpoint into both: the main transformer keeps its names (`transformer.layers.{i}.norm1`,
`.self_attn`, `.norm2`, `.gating`, `out_norm`, `text_linear`); the depformer does not. PyTorch runs
one depformer transformer whose weights are picked per codebook (weights-per-step:
`depformer.layers.{l}.gating.{w}`, `self_attn.in_projs.{w}`, `depformer_in.{w}`, with
`w = schedule[k]` or `k`), while MLX runs one transformer per codebook
(`depformer.slices.{k}.transformer.layers.{l}`, `.linear_in`, `.linear_out`).

Names. A module's `name` is its PyTorch path; a module run once per generated codebook k drops
its per-codebook index and carries the stream instead: `depformer.layers.1.gating@audio3`
(PyTorch `depformer.layers.1.gating.3`, MLX `depformer.slices.3.transformer.layers.1.gating`),
`depformer_in@audio3`, `linears@audio3`. Entries are in execution order within a step (text first,
then codebook 0, 1, ...), which is the order "first" and the amplifier read.
"""

from __future__ import annotations

from dataclasses import dataclass

# Parts of a transformer layer, in the order a step runs them; the layer's own output comes last.
LAYER_PARTS = ("norm1", "self_attn", "norm2", "gating")
# What each kind of module is, for the isolated mode: all of them take one activation as input.
KINDS = {"norm1": "norm", "norm2": "norm", "self_attn": "attention", "gating": "gating", "": "block",
         "out_norm": "norm", "text_linear": "linear", "depformer_in": "linear", "linears": "linear"}


@dataclass(frozen=True)
class ModuleEntry:
    name: str  # PyTorch path, `@audio{k}` for the depformer's per-codebook modules
    torch_name: str  # the PyTorch module that runs (hooks go here)
    mlx_name: str  # the moshi_mlx module that runs (wrappers go here)
    kind: str  # norm | attention | gating | block | linear
    stream: str  # text, or audio{k} for the depformer's modules
    order: int  # execution order within a step
    after: int | None  # the module whose output feeds this one (LEMON's previous layer), None for the first

    def to_dict(self) -> dict:
        return {"module": self.name, "torch_name": self.torch_name, "mlx_name": self.mlx_name, "kind": self.kind,
                "stream": self.stream}


def module_map(config: dict) -> list[ModuleEntry]:
    """Every mapped module of the model `config` (an LMModel config.json), in execution order."""
    rows: list[tuple] = []  # (name, torch, mlx, kind, stream, after-name)

    def layer(prefix_t: str, prefix_m: str, suffix: str, stream: str, prev: str | None, wps: int | None) -> str:
        last = prev
        for part in LAYER_PARTS:
            torch_part = f"{part}.{wps}" if part == "gating" and wps is not None else part
            name = f"{prefix_t}.{part}{suffix}"
            rows.append((name, f"{prefix_t}.{torch_part}", f"{prefix_m}.{part}", KINDS[part], stream, last))
            last = name
        name = f"{prefix_t}{suffix}"
        rows.append((name, prefix_t, prefix_m, "block", stream, last))
        return name

    prev = None
    for i in range(int(config["num_layers"])):
        prev = layer(f"transformer.layers.{i}", f"transformer.layers.{i}", "", "text", prev, None)
    rows.append(("out_norm", "out_norm", "out_norm", "norm", "text", prev))
    rows.append(("text_linear", "text_linear", "text_linear", "linear", "text", "out_norm"))
    dep_q = int(config.get("dep_q", 0))
    if dep_q and int(config.get("depformer_num_layers", 0)):
        schedule = config.get("depformer_weights_per_step_schedule")
        per_step = bool(config.get("depformer_weights_per_step", False))
        multi = bool(config.get("depformer_multi_linear", False))
        for k in range(dep_q):
            w = schedule[k] if schedule else k
            at, slice_ = f"@audio{k}", f"depformer.slices.{k}"
            rows.append((f"depformer_in{at}", f"depformer_in.{w if multi else 0}", f"{slice_}.linear_in", "linear",
                         f"audio{k}", "out_norm"))
            prev = f"depformer_in{at}"
            for l_ in range(int(config["depformer_num_layers"])):
                prev = layer(f"depformer.layers.{l_}", f"{slice_}.transformer.layers.{l_}", at, f"audio{k}", prev,
                             w if per_step else None)
            rows.append((f"linears{at}", f"linears.{k}", f"{slice_}.linear_out", "linear", f"audio{k}", prev))
    index = {row[0]: i for i, row in enumerate(rows)}
    return [ModuleEntry(name, t, m, kind, stream, i, index.get(after) if after else None)
            for i, (name, t, m, kind, stream, after) in enumerate(rows)]
