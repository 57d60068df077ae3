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


GRAMMAR = "NAME[:DEVICE][:DTYPE][:QUANT]"


@pytest.mark.parametrize("bad, needles", [
    ("", ["Cannot read backend spec ''", GRAMMAR]),
    (":", ["Cannot read backend spec ':'", GRAMMAR]),
    ("cpu:", ["Cannot read backend spec 'cpu:'", GRAMMAR]),
    ("a:b:c:d:e", ["Cannot read backend spec 'a:b:c:d:e'", GRAMMAR]),
    ("cpu:fp8", ["Unknown part 'fp8' in backend spec 'cpu:fp8'", "dtypes fp32, fp16, bf16, fp64", GRAMMAR]),
    ("mlx:tpu", ["Unknown part 'tpu' in backend spec 'mlx:tpu'", "devices are cpu, gpu", GRAMMAR]),
    ("cpu:cpu:cpu", ["Unknown part 'cpu' in backend spec 'cpu:cpu:cpu'", GRAMMAR]),  # a device only comes first
    ("mlx:bf16:gpu", ["Unknown part 'gpu' in backend spec 'mlx:bf16:gpu'", GRAMMAR]),
    ("mlx:gpu:q8:q4", ["Backend spec 'mlx:gpu:q8:q4' names two quants (q8 and q4)", GRAMMAR]),
    ("mlx:fp16:bf16", ["Backend spec 'mlx:fp16:bf16' names two dtypes (fp16 and bf16)", GRAMMAR]),
])
def test_bad_specs_name_the_part_and_the_grammar(bad, needles):
    with pytest.raises(XBackendError) as err:
        parse_spec(bad)
    assert err.value.exit_code == 2
    for needle in needles:
        assert needle in str(err.value)


def test_parse_list():
    assert [str(s) for s in parse_specs("cpu, mlx:cpu,mps")] == ["cpu", "mlx:cpu", "mps"]
    with pytest.raises(XBackendError):
        parse_specs(" , ")
