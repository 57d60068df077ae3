"""The layer rule (docs/design.md, Layers): every module of `xbackend/` belongs to one layer of `LAYERS`, and no
module imports a module of a later layer, at the top of the file or inside a function. No two modules import each
other, even through others. The library never imports `xbackend.testing`. There is no exception list: a new
module goes into a layer here, and an import that breaks the rule is moved, not excused.

Importing `xbackend.a.b` also runs `xbackend/a/__init__.py`, so an import from outside a package counts as an
import of each package above the module too (the root `xbackend/__init__.py` is the public API: it is the last
layer, and it runs before anything else in any case).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xbackend"

# In order, lowest first. A name ending in ".*" is a package's modules (a more specific entry wins).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocabulary", ("xbackend.errors", "xbackend.spec", "xbackend.tolerances", "xbackend.env", "xbackend.advisories",
                    "xbackend.results", "xbackend.registry", "xbackend.streams")),
    ("samplers", ("xbackend.samplers", "xbackend.samplers.*")),
    ("requests", ("xbackend.requests",)),
    ("store", ("xbackend.store", "xbackend.store.*")),
    ("models", ("xbackend.capture", "xbackend.capture.models")),
    ("codec implementations", ("xbackend.codecs", "xbackend.codecs.base", "xbackend.codecs.torch_codec",
                               "xbackend.codecs.mlx_codec", "xbackend.codecs.candle_codec")),
    ("backends", ("xbackend.backends", "xbackend.backends.*")),
    ("capture", ("xbackend.capture.*",)),
    ("analysis", ("xbackend.analysis", "xbackend.analysis.*")),
    ("report", ("xbackend.report", "xbackend.report.*")),
    ("verbs", ("xbackend.compare", "xbackend.check", "xbackend.locate", "xbackend.matrix", "xbackend.rust",
               "xbackend.rust.*", "xbackend.codecs.*")),
    ("cli", ("xbackend.cli", "xbackend.cli.*", "xbackend.__main__", "xbackend")),
)
TESTING = "xbackend.testing"  # may import anything; nothing in the library imports it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def layer_of(name: str) -> int | None:
    """The index of `name`'s layer: an exact entry first, else the longest matching "package.*"."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry == name:
                return i
            if entry.endswith(".*") and name.startswith(entry[:-1]):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), i)
    return None if best is None else best[1]


def imports_of(name: str) -> set[str]:
    """Every `xbackend` module `name` imports, anywhere in the file, relative imports resolved."""
    package = name if is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(), str(MODULES[name]))):
        if isinstance(node, ast.Import):
            targets = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [(module, tuple(a.name for a in node.names))]
        else:
            continue
        for module, names in targets:
            if module != "xbackend" and not module.startswith("xbackend."):
                continue
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            found.update(subs)
            if len(subs) < len(names) or not names:
                found.add(module)
    # importing a.b.c from outside a.b runs a.b's (and a's) __init__ too; the root package is the exception by
    # design: it is the public API, in the last layer, and runs first whatever is imported
    for target in list(found):
        parts = target.split(".")
        for k in range(2, len(parts)):
            parent = ".".join(parts[:k])
            if not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer():
    missing = [n for n in MODULES if not n.startswith(TESTING) and layer_of(n) is None]
    assert not missing, f"modules with no layer: {missing}; add each to LAYERS in tests/test_layers.py"
    unknown = sorted({t for ts in GRAPH.values() for t in ts} - set(MODULES))
    assert not unknown, f"imports of modules that do not exist: {unknown}"


def test_no_module_imports_a_later_layer():
    bad = []
    for name, targets in GRAPH.items():
        if name.startswith(TESTING):
            continue
        mine = layer_of(name)
        for t in sorted(targets):
            theirs = layer_of(t)
            if theirs is not None and mine is not None and theirs > mine:
                bad.append(f"{name} (layer {LAYERS[mine][0]!r}) imports {t} (later layer {LAYERS[theirs][0]!r})")
    assert not bad, "upward imports; move the code down or the caller up:\n" + "\n".join(bad)


def test_the_library_never_imports_testing():
    bad = [f"{n} imports {t}" for n, ts in GRAPH.items() if not n.startswith(TESTING)
           for t in sorted(ts) if t == TESTING or t.startswith(TESTING + ".")]
    assert not bad, "xbackend.testing holds fixtures; the library must not import them:\n" + "\n".join(bad)


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v] & set(MODULES)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_rule_sees_function_level_relative_and_package_imports(tmp_path):
    """The walker itself: a function-level relative import, a `from . import module`, and the implied package."""
    assert "xbackend.store.trace" in GRAPH["xbackend.store.rundir"]  # `from .trace import ...`
    assert "xbackend.store.validate" in GRAPH["xbackend.check"]  # `from .store import validate`
    assert "xbackend.capture" in GRAPH["xbackend.backends.base"]  # implied by `from ..capture.models import`
    assert "xbackend.samplers" not in GRAPH["xbackend.samplers.candle"]  # its own package is not an import
    assert layer_of("xbackend.capture.models") < layer_of("xbackend.backends.base") < layer_of("xbackend.capture.run")
    assert layer_of("xbackend.codecs.stage") > layer_of("xbackend.codecs.base") == layer_of("xbackend.codecs")
    assert layer_of("xbackend.codecs.torch_codec") < layer_of("xbackend.backends.torch_backend")  # shared rules: env

# Phase 2 of the house (#19): no module over about 600 lines (cli, report, candle, metrics are longer today).
