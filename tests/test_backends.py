"""The backend registry: plugins register through the hook the built-ins use, and unregister."""

import pytest

import xbackend
from xbackend.backends import BUILTIN_NAMES, create_backend, registered, unregister_backend
from xbackend.backends.base import Backend
from xbackend.errors import XBackendError


class Named(Backend):
    """A backend that never runs: enough to see which factory the registry used."""

    library = "test"


def test_register_then_unregister_a_plugin(registry):
    xbackend.register_backend("Named", lambda spec: Named(spec))
    assert "named" in registered()
    made = create_backend("named:bf16")
    assert isinstance(made, Named) and made.label == "named:bf16" and made.spec.dtype == "bf16"
    unregister_backend("named")
    assert "named" not in registered()
    with pytest.raises(XBackendError, match="Unknown backend 'named'"):
        create_backend("named")


def test_unregistering_a_builtin_name_restores_the_builtin(registry):
    xbackend.register_backend("cpu", lambda spec: Named(spec))
    assert isinstance(create_backend("cpu"), Named)
    unregister_backend("cpu")
    restored = create_backend("cpu")
    assert not isinstance(restored, Named) and restored.library == "torch" and restored.extra == "torch"
    assert set(BUILTIN_NAMES) <= set(registered())


def test_the_registry_fixture_leaves_nothing_behind():
    from .helpers import registry_scope

    before = set(registered())
    with registry_scope():
        xbackend.register_backend("leak", lambda spec: Named(spec))
        xbackend.register_backend("mlx", lambda spec: Named(spec))
    assert set(registered()) == before and create_backend("mlx").library == "mlx"


def test_load_plugin_registers_through_the_same_hook(tmp_path, registry):
    plugin = tmp_path / "plug.py"
    plugin.write_text("import xbackend\nxbackend.register_backend('fromfile', xbackend.wrap_backend('cpu', "
                      "on_logits=lambda run, step, stream, x: x))\n")
    xbackend.load_plugin(plugin)
    made = create_backend("fromfile")
    assert made.library == "torch" and made.on_logits is not None
    with pytest.raises(XBackendError, match="does not exist"):
        xbackend.load_plugin(tmp_path / "nope.py")
