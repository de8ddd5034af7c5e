"""Model-parallel partitions: our split/merge equals SAT's partition, for float and quantized tensors."""
import pytest
import torch
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear

from sat_quant import get_format
from sat_quant.parallel import merge, split


@pytest.fixture(scope="module", autouse=True)
def sat_model_parallel():
    from sat.arguments import _simple_init
    _simple_init(model_parallel_size=1, seed=1234)


@pytest.mark.parametrize("stride", [1, 3, (2, 1, 1)])
@pytest.mark.parametrize("parts", [2, 4])
def test_column_split_matches_sat_partition(stride, parts):
    layer = ColumnParallelLinear(128, 384, bias=True, stride=stride)
    with torch.no_grad():
        layer.bias.normal_()
    sat_weights, sat_biases = layer.partition(new_model_parallel_size=parts)
    ours = split(layer.weight.detach(), ("column", stride), parts)
    assert all(torch.equal(a, b) for a, b in zip(ours, sat_weights))
    assert all(torch.equal(a, b) for a, b in zip(split(layer.bias.detach(), ("column", stride), parts), sat_biases))
    assert torch.equal(merge(ours, ("column", stride)), layer.weight.detach())


@pytest.mark.parametrize("parts", [2, 4])
def test_row_split_matches_sat_partition(parts):
    layer = RowParallelLinear(512, 64, bias=True)
    sat_weights, _ = layer.partition(new_model_parallel_size=parts)
    ours = split(layer.weight.detach(), ("row", 1), parts)
    assert all(torch.equal(a, b) for a, b in zip(ours, sat_weights))
    assert torch.equal(merge(ours, ("row", 1)), layer.weight.detach())


@pytest.mark.parametrize("fmt_name", ["int4", "nf4", "fp4", "int8"])
@pytest.mark.parametrize("how,stride", [("column", 3), ("row", 1)])
def test_split_quantized_equals_quantizing_each_partition(fmt_name, how, stride):
    """Splitting packed codes and scales gives exactly what quantizing each rank's float partition gives,
    so no rank ever needs another rank's weights and resharding never dequantizes."""
    fmt = get_format(fmt_name)
    w = torch.randn(384, 512) * 0.05
    full = fmt.quantize(w, fmt.spec(384, 512, group_size=64))
    w_parts = split(w, (how, stride), 2)
    for rank, w_part in enumerate(w_parts):
        spec = fmt.spec(*w_part.shape, group_size=64)
        if fmt_name == "int8" and how == "row":  # a row shard's scale covers the whole row (all-reduced max)
            expected = fmt.quantize(w_part, spec, row_absmax=w.abs().amax(1))
            kinds = {"qweight": ("row", 1), "scale": ("row-replicated", 1)}
        else:
            expected = fmt.quantize(w_part, spec)
            kinds = {name: (how, stride) for name in expected}
        for name, tensor in full.items():
            assert torch.equal(split(tensor, kinds[name], 2)[rank], expected[name]), name
    for name, tensor in full.items():
        kind = ("row-replicated", 1) if (fmt_name == "int8" and how == "row" and name == "scale") else (how, stride)
        assert torch.equal(merge(split(tensor, kind, 2), kind), tensor)
