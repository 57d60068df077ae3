import pytest

from xbackend.errors import XBackendError
from xbackend.spec import BackendSpec, parse_spec, parse_specs


@pytest.mark.parametrize("text,expected", [
    ("cpu", BackendSpec("cpu")),
    ("cpu:fp64", BackendSpec("cpu", dtype="fp64")),
    ("cuda:bf16", BackendSpec("cuda", dtype="bf16")),
    ("mps:fp16", BackendSpec("mps", dtype="fp16")),
    ("mlx", BackendSpec("mlx")),
    ("mlx:cpu", BackendSpec("mlx", device="cpu")),
    ("mlx:gpu:bf16", BackendSpec("mlx", device="gpu", dtype="bf16")),
    ("mlx:q8", BackendSpec("mlx", quant="q8")),
    ("MLX:CPU:Q4", BackendSpec("mlx", device="cpu", quant="q4")),
    ("cuda:1:bf16", BackendSpec("cuda", device="1", dtype="bf16")),
    ("mlx:gpu:bf16:q8", BackendSpec("mlx", device="gpu", dtype="bf16", quant="q8")),
    ("mlx:bf16:q4", BackendSpec("mlx", dtype="bf16", quant="q4")),
    ("mlx:cpu:q8", BackendSpec("mlx", device="cpu", quant="q8")),
])
def test_parse(text, expected):
    spec = parse_spec(text)
    assert spec == expected
    assert parse_spec(str(spec)) == spec


def test_tier_is_quant_then_dtype():
    assert parse_spec("mlx:q4").tier == "q4"
    assert parse_spec("cpu:fp64").tier == "fp64"
    assert parse_spec("cpu").tier == "fp32"


def test_shipped_mlx_configuration_keeps_device_dtype_and_quant():
    """moshi_mlx on Metal runs bf16 weights quantized to q8: not the same tier as fp32 + q8."""
    import xbackend

    spec = xbackend.parse_spec("mlx:gpu:bf16:q8")
    assert (spec.device, spec.dtype, spec.quant) == ("gpu", "bf16", "q8")
    assert str(spec) == "mlx:gpu:bf16:q8" and spec.tier == "q8"
    assert str(parse_spec("mlx:bf16:q8")) == "mlx:bf16:q8" != str(parse_spec("mlx:q8"))
    assert str(parse_spec("mlx:q8:bf16")) == "mlx:bf16:q8"  # one canonical label


@pytest.mark.parametrize("bad", ["", ":", "cpu:", "cpu:fp8", "mlx:tpu", "a:b:c:d:e", "cpu:cpu:cpu", "mlx:gpu:q8:q4",
                                 "mlx:fp16:bf16", "mlx:bf16:gpu"])
def test_bad_specs_name_the_grammar(bad):
    with pytest.raises(XBackendError) as err:
        parse_spec(bad)
    assert "spec" in str(err.value)


def test_parse_list():
    assert [str(s) for s in parse_specs("cpu, mlx:cpu,mps")] == ["cpu", "mlx:cpu", "mps"]
    with pytest.raises(XBackendError):
        parse_specs(" , ")
