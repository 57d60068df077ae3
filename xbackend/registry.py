"""One registry for every kind of pluggable thing (backends, codecs): a name (the first part of a spec) to a
factory `factory(spec) -> T`.

Built-ins register through the same hook plugins use; `unregister` gives a built-in name its built-in factory
back and removes any other; third parties register through an entry-point group, loaded once, on first use.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import metadata
from typing import Callable, Generic, TypeVar

from .errors import XBackendError
from .spec import BackendSpec

T = TypeVar("T")
Factory = Callable[[BackendSpec], T]


def run_spec(base: BackendSpec, requested: BackendSpec | None) -> BackendSpec:
    """What a wrapped factory runs: the wrapped spec, with the device, dtype and quantization the request names
    (`flip:bf16`, where `flip` wraps `cpu`, runs the CPU backend in bf16)."""
    requested = requested or base
    return replace(base, device=requested.device or base.device,
                   dtype=requested.dtype if requested.dtype != "fp32" else base.dtype,
                   quant=requested.quant or base.quant)


class Registry(Generic[T]):
    """Factories by lower-case name. `what` names the kind in messages ("backend", "codec"); `fix` is what a user
    who named an unknown one should do."""

    def __init__(self, what: str, group: str, builtins: dict[str, Factory], fix: str):
        self.what, self.group, self.fix = what, group, fix
        self.builtins = {name.lower(): f for name, f in builtins.items()}
        self._factories: dict[str, Factory] = dict(self.builtins)
        self._entry_points_loaded = False

    def register(self, name: str, factory: Factory) -> None:
        """Register `factory(spec) -> T` under `name` (a built-in name is replaced until unregistered)."""
        self._factories[name.lower()] = factory

    def unregister(self, name: str) -> None:
        """Undo `register(name, ...)`: a plugin's name disappears, a built-in name gets its built-in factory back."""
        name = name.lower()
        if name in self.builtins:
            self._factories[name] = self.builtins[name]
        else:
            self._factories.pop(name, None)

    def load_entry_points(self) -> None:
        """Register third-party factories from the entry-point group (once)."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            self.register(ep.name, ep.load())

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._factories)

    def factory(self, name: str) -> Factory:
        """The factory registered for `name`; an unknown name raises with the list of known ones and the fix."""
        self.load_entry_points()
        found = self._factories.get(name.lower())
        if found is None:
            raise XBackendError(f"Unknown {self.what} {name!r}",
                                asked=f"registered {self.what}s are {', '.join(self.names())}", fix=self.fix)
        return found

    def create(self, spec: BackendSpec) -> T:
        """An instance for `spec`, labelled with it."""
        made = self.factory(spec.name)(spec)
        made.label = str(spec)
        return made

    def wrap(self, base: BackendSpec, **hooks) -> Factory:
        """A factory for `base` whose instances get each given hook (`on_logits=...`, `on_activation=...`) set as
        an attribute; a hook given as None leaves the instance's own.

        The factory registered for `base` now is the one wrapped, so a plugin may re-register a built-in name
        around itself (`register("cpu", wrap("cpu", ...))`); a name not registered yet is looked up when the
        factory runs (an unknown one then raises as `create` does)."""
        self.load_entry_points()
        inner = self._factories.get(base.name.lower())

        def factory(requested: BackendSpec | None = None) -> T:
            run = run_spec(base, requested)
            made = (inner or self.factory(run.name))(run)
            made.label = str(requested or base)
            for name, value in hooks.items():
                if value is not None:
                    setattr(made, name, value)
            return made

        return factory
