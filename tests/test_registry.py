"""The one `Registry` (xbackend/registry.py) behind backends and codecs: the same semantics for both."""

import sys
import textwrap

import pytest

import xbackend
from xbackend.backends import BACKENDS, create_backend
from xbackend.codecs import BUILTIN_CODECS, REGISTRY as CODECS, create_codec, registered_codecs, unregister_codec
from xbackend.codecs.base import Codec
from xbackend.errors import XBackendError


class Named(Codec):
    """A codec that never runs: enough to see which factory the registry used."""

    library = "test"


def test_unregistering_a_builtin_codec_restores_the_builtin(registry):
    """Codecs used to pop the name: a plugin that wrapped `torch` and cleaned up left no `torch` codec at all."""
    xbackend.register_codec("torch", lambda spec: Named(spec))
    assert isinstance(create_codec("torch"), Named)
    unregister_codec("torch")
    restored = create_codec("torch:cpu")
    assert type(restored).__name__ == "TorchCodec" and restored.label == "torch:cpu"
    assert set(BUILTIN_CODECS) == {"torch", "mlx", "candle"} and set(BUILTIN_CODECS) <= set(registered_codecs())


def test_a_plugin_codec_disappears_when_unregistered(registry):
    xbackend.register_codec("Named", lambda spec: Named(spec))
    made = create_codec("named:bf16")
    assert isinstance(made, Named) and made.label == "named:bf16" and made.spec.dtype == "bf16"
    unregister_codec("named")
    assert "named" not in registered_codecs()
    with pytest.raises(XBackendError) as err:
        create_codec("named")
    assert str(err.value) == ("Unknown codec 'named'. Note: registered codecs are candle, mlx, torch. "
                              "Fix: name one of them, or load a plugin with --plugin FILE.py.")


@pytest.mark.parametrize("registry_, create, group", [(CODECS, create_codec, "xbackend.codecs"),
                                                     (BACKENDS, create_backend, "xbackend.backends")],
                         ids=["codecs", "backends"])
def test_entry_points_register_third_party_factories(registry_, create, group, tmp_path, monkeypatch, registry):
    """An installed distribution's entry point registers under its name, once, on first use (codecs gained
    the `xbackend.codecs` group; `xbackend.backends` is unchanged)."""
    (tmp_path / "third_party_xb.py").write_text(textwrap.dedent("""
        from xbackend.backends.base import Backend
        from xbackend.codecs.base import Codec

        class ThirdBackend(Backend):
            library = "third"

        class ThirdCodec(Codec):
            library = "third"

        def backend(spec):
            return ThirdBackend(spec)

        def codec(spec):
            return ThirdCodec(spec)
    """))
    info = tmp_path / "third_party_xb-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-xb\nVersion: 1.0\n")
    attr = "codec" if group == "xbackend.codecs" else "backend"
    (info / "entry_points.txt").write_text(f"[{group}]\nthird = third_party_xb:{attr}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_, "_entry_points_loaded", False)
    made = create("third:fp16")
    assert made.library == "third" and made.label == "third:fp16"
    assert "third" in registry_.names()
    registry_.unregister("third")
    sys.modules.pop("third_party_xb", None)


def test_wrapping_keeps_the_requested_device_and_dtype(registry):
    seen = []
    xbackend.register_codec("flipper", xbackend.wrap_codec("torch:cpu", lambda point, frames, x: x))
    made = create_codec("flipper:fp64")
    seen.append((type(made).__name__, made.spec.name, made.spec.device, made.spec.dtype, made.label))
    assert seen == [("TorchCodec", "torch", "cpu", "fp64", "flipper:fp64")]
    assert made.on_activation is not None
