"""QuantLinear / QuantColumnParallelLinear / QuantRowParallelLinear: SAT semantics, dtype survival, state dict."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear

from sat_quant import QuantLinear, get_format
from sat_quant.engine.formats import FORMATS
from sat_quant.engine.layers import QuantColumnParallelLinear, QuantRowParallelLinear


@pytest.fixture(scope="module", autouse=True)
def sat_model_parallel():
    from sat.arguments import _simple_init
    _simple_init(model_parallel_size=1, seed=1234)


BF16_ACT_RTOL = 1.6e-2


def make_layer(fmt_name="int4", n=128, k=256, bias=True, seed=0):
    torch.manual_seed(seed)
    fmt = get_format(fmt_name)
    layer = QuantLinear(fmt.spec(n, k), bias=bias)
    w = torch.randn(n, k) * 0.05
    layer.quantize_weight_(w)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer, w


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_forward_equals_linear_with_dequantized_weight(fmt_name):
    layer, _ = make_layer(fmt_name)
    x = torch.randn(2, 5, 256)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    # CPU kernels run on bf16 activations (8 mantissa bits): 1.6% of max|y| bounds their rounding
    assert (layer(x) - expected).abs().max() <= BF16_ACT_RTOL * expected.abs().max()


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_linear_over_weight_runs_the_kernel(fmt_name):
    """Model code that reads ``.weight`` into ``F.linear`` (CogAgent's cross tower) gets the layer's kernel result,
    bitwise, with its own bias, keyword or positional; any other op sees the plain dequantized tensor."""
    layer, _ = make_layer(fmt_name, bias=False)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    bias = torch.randn(128)
    kernel = layer(x)
    assert torch.equal(F.linear(x, layer.weight), kernel)
    assert torch.equal(F.linear(input=x, weight=layer.weight, bias=bias), kernel + bias.to(torch.bfloat16))
    dense = F.linear(x, layer.dequantized_weight(torch.bfloat16))
    if fmt_name != "int8":  # int8 runs a dense bf16 GEMM over the dequantized weight too
        assert not torch.equal(kernel, dense)  # so the equality above is not dense == dense
    assert (kernel - dense).abs().max() <= BF16_ACT_RTOL * dense.abs().max()
    weight = layer.weight
    plain = layer.dequantized_weight()
    assert torch.equal(weight, plain) and weight.shape == (128, 256)
    for derived in (weight.float(), weight * 2, weight.t(), weight.detach(), weight.data, torch.cat([weight, weight]),
                    weight.reshape(torch.Size([256, 128])), torch.stack((weight, weight))):
        assert type(derived) is torch.Tensor  # nothing downstream inherits the routing
    assert torch.equal(x.float() @ weight.float().t(), x.float() @ plain.float().t())
    with pytest.raises(RuntimeError):  # a wrong width is F.linear's own error, not a kernel crash
        F.linear(torch.randn(2, 255), weight)
    buffer = io.BytesIO()
    torch.save(weight, buffer)  # saved and copied as the plain tensor, without the layer behind it
    for copied in (torch.load(io.BytesIO(buffer.getvalue())), copy.deepcopy(weight)):
        assert type(copied) is torch.Tensor and torch.equal(copied, plain)


@pytest.mark.parametrize("fmt", ["int4", "int4cs"])  # int4cs: the kernel computes (x * t) @ core^T
def test_linear_over_weight_carries_gradients_to_the_input(fmt):
    layer, _ = make_layer(fmt)
    x = torch.randn(4, 256, requires_grad=True)
    bias = torch.randn(128, requires_grad=True)
    F.linear(x, layer.weight, bias).sum().backward()
    assert torch.allclose(x.grad, layer.dequantized_weight(torch.float32).sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(bias.grad, torch.full((128,), 4.0))


def test_quantized_weight_is_frozen_and_not_a_parameter():
    layer, _ = make_layer()
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["bias"]
    assert not layer.bias.requires_grad
    assert "qweight" in layer.state_dict() and "weight" not in layer.state_dict()


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_scales_survive_model_half_and_bfloat16(fmt_name, cast):
    """SAT's get_model calls model.half()/bfloat16() after building; scales must keep full precision."""
    layer, _ = make_layer(fmt_name)
    before = {k: v.clone() for k, v in layer.neutral_tensors().items()}
    container = torch.nn.Sequential(layer)
    getattr(container, cast)()
    after = layer.neutral_tensors()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    assert layer.bias.dtype == dtype and layer.weight.dtype == dtype
    container.to("cpu")  # a device move keeps the dtype .weight reports
    assert layer.weight.dtype == dtype
    x = torch.randn(3, 256)
    y = container(x.to(dtype))
    assert y.dtype == dtype
    ref = F.linear(x, layer.dequantized_weight(torch.float32), layer.bias.float())
    assert (y.float() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_fp32_bias_with_half_input_does_not_crash():
    """--quant without --fp16 must work even when activations arrive in another dtype."""
    layer, _ = make_layer("int8")
    y = layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_state_dict_round_trip_is_bitwise(fmt_name):
    layer, _ = make_layer(fmt_name)
    fresh = QuantLinear(layer.spec, bias=True)
    result = fresh.load_state_dict(layer.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(4, 256)
    assert torch.equal(fresh(x), layer(x))


def test_loading_a_full_precision_weight_quantizes_it():
    layer, w = make_layer("int4")
    fresh = QuantLinear(layer.spec, bias=True)
    fresh.load_state_dict({"weight": w, "bias": layer.bias.detach()})
    assert all(torch.equal(a, b) for a, b in zip(fresh.neutral_tensors().values(), layer.neutral_tensors().values()))


def test_wrong_shape_or_missing_tensor_is_reported():
    layer, _ = make_layer("int4")
    fresh = QuantLinear(get_format("int4").spec(64, 256), bias=True)
    with pytest.raises(RuntimeError, match="qweight.*needs"):
        fresh.load_state_dict(layer.state_dict())
    result = fresh.load_state_dict({"bias": torch.zeros(64)}, strict=False)
    assert result.missing_keys == ["weight"]


@pytest.mark.parametrize("gather_output", [True, False])
@pytest.mark.parametrize("stride", [1, 3])
def test_column_parallel_matches_sat(gather_output, stride):
    torch.manual_seed(0)
    sat = ColumnParallelLinear(256, 384, bias=True, gather_output=gather_output, stride=stride)
    with torch.no_grad():
        sat.bias.normal_()
    fmt = get_format("int8")
    q = QuantColumnParallelLinear(fmt.spec(384, 256), input_size=256, output_size=384,
                                  gather_output=gather_output, stride=stride)
    q.load_state_dict(sat.state_dict())
    assert q.output_size_per_partition == 384 and q.stride == stride and q.gather_output == gather_output
    x = torch.randn(2, 7, 256)
    ref = F.linear(x, q.dequantized_weight(), sat.bias)
    assert (q(x) - ref).abs().max() <= BF16_ACT_RTOL * ref.abs().max()
    assert (q(x) - sat(x)).abs().max() < 0.02 * sat(x).abs().max()


@pytest.mark.parametrize("final_bias", [True, False])
def test_row_parallel_matches_sat(final_bias):
    torch.manual_seed(0)
    sat = RowParallelLinear(512, 256, bias=True, input_is_parallel=True, final_bias=final_bias)
    with torch.no_grad():
        sat.bias.normal_()
    q = QuantRowParallelLinear(get_format("int4").spec(256, 512), input_size=512, output_size=256,
                               input_is_parallel=True, final_bias=final_bias)
    q.load_state_dict(sat.state_dict())
    x = torch.randn(3, 512)
    ref = F.linear(x, q.dequantized_weight(), sat.bias)
    assert (q(x) - ref).abs().max() <= BF16_ACT_RTOL * ref.abs().max()
    assert q.input_size_per_partition == 512 and q.final_bias == final_bias
