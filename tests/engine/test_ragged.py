"""Ragged input sizes: a layer whose in_features is not a multiple of the group is stored zero-padded to whole
groups (docs/FORMAT.md). CogAgent's EVA2-CLIP-L ``mlp.w3`` (in 2730 = 2*3*5*7*13) is the case users hit."""
import pytest
import torch

from sat_quant import QuantConfig, QuantLinear, get_format
from sat_quant.engine.backends import BACKENDS
from sat_quant.engine.formats import FORMATS, LayerSpec
from sat_quant.engine.replace import quantize_
from sat_quant.errors import CheckpointError
from sat_quant.io.parallel import packed_kinds, split
from tests.engine.test_backends import RTOL

GROUPED = sorted(name for name, fmt in FORMATS.items() if fmt.grouped)


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _padded_spec(spec: LayerSpec) -> LayerSpec:
    return LayerSpec(spec.format, spec.out_features, spec.padded_in_features, spec.group_size)


def test_every_4bit_format_is_grouped():
    assert {"int4", "int4c", "nf4", "fp4"} <= set(GROUPED)


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("k,group", [(90, 32), (2730, 64), (2730, 128), (45, 32)])
def test_ragged_layer_is_the_zero_padded_layer_cut_back(name, k, group):
    """Quantizing [N, K] equals quantizing the weight with zero columns appended, bit for bit; dequantize gives
    the original [N, K] back; the stored shapes and byte counts are those of whole groups."""
    fmt = get_format(name)
    spec = fmt.spec(64, k, group)
    padded = _padded_spec(spec)
    assert spec.padded_in_features == -(-k // group) * group and spec.padding == spec.padded_in_features - k > 0
    w = _weight(64, k)
    tensors = fmt.quantize(w, spec)
    scaled = fmt.input_scale_tensor
    if scaled is None:
        reference = fmt.quantize(torch.nn.functional.pad(w, (0, spec.padding)), padded)
    else:  # int4cs: t belongs to the real columns (the pad columns' inputs are zero: their t is 1 and unused)
        t = fmt.input_scale(tensors)
        reference = fmt.quantize(torch.nn.functional.pad(w, (0, spec.padding)), padded,
                                 col_scale=torch.nn.functional.pad(t, (0, spec.padding), value=1.0))
        assert torch.equal(reference[scaled][:k], tensors[scaled])
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[t], reference[t]) for t in tensors if t != scaled)
    for t, (shape, dtype) in fmt.layout(spec).items():
        assert tuple(tensors[t].shape) == tuple(shape) and tensors[t].dtype == dtype
    assert fmt.layout(spec)["qweight"][0] == (64, spec.padded_in_features // 2)
    # the estimator and the report count the padded bytes (int4cs's column scale has one value per real column)
    assert fmt.nbytes(spec) == fmt.nbytes(padded) - (spec.padding if scaled else 0)  # int4cs: 1 byte per column
    back = fmt.dequantize(tensors, spec)
    assert back.shape == (64, k)
    assert torch.equal(back, fmt.dequantize(reference, padded)[:, :k])
    assert torch.equal(fmt.dequantize(reference, padded)[:, k:], torch.zeros(64, spec.padding))  # pad decodes to 0
    assert ((back - w).norm() / w.norm()).item() < 0.15


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_backend_runs_a_ragged_layer_like_the_reference(name, dtype):
    """Each backend that can run the format on this CPU pads the activations itself; its output matches the
    reference (dequantize + F.linear on the unpadded weight), and running it loses nothing when saving."""
    fmt = get_format(name)
    spec = fmt.spec(128, 2730, 64)
    neutral = fmt.quantize(_weight(128, 2730), spec)
    x = torch.randn(2, 3, 2730, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = BACKENDS["reference"].linear(x.float(), fmt, spec, dict(neutral))  # kernels cache casts in their dict
    ran = []
    for backend in BACKENDS.values():
        if backend.unsupported_reason(fmt, spec, torch.device("cpu")) is not None:
            continue
        kernel = backend.prepare(fmt, spec, neutral)
        y = backend.linear(x, fmt, spec, kernel)
        assert y.dtype == dtype and y.shape == (2, 3, 128)
        tol = RTOL.get(backend.name, {}).get(dtype, 2e-3 if dtype != torch.bfloat16 else 1.6e-2)
        assert (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item() + 1e-6, backend.name
        back = backend.to_neutral(fmt, spec, kernel)
        assert all(torch.equal(back[t], neutral[t]) for t in neutral), backend.name
        ran.append(backend.name)
    # a fast kernel, not only the reference, runs the ragged layer (int4/int4c: torch's int4 kernel)
    assert "reference" in ran and len(ran) >= 2, ran


@pytest.mark.parametrize("k", [2730, 104, 100, 96])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_runs_any_width_at_any_row_count(k, rows):
    """int8 has no groups, so CogAgent's w3 (2730 columns) is stored unpadded; torch's AVX-512 int8 kernel reads
    K in steps of 16 with no tail (NaN, wrong sums at 104, a segfault at 2730): sat_quant pads for it."""
    fmt = get_format("int8")
    layer = QuantLinear(fmt.spec(64, k), bias=False)
    layer.quantize_weight_(_weight(64, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = layer(x)
    ref = x.float() @ layer.dequantized_weight(torch.float32).t()
    assert (y.float() - ref).abs().max() <= 1.6e-2 * ref.abs().max()
    assert all(torch.equal(a, b) for a, b in zip(layer.neutral_tensors().values(),
                                                 fmt.quantize(_weight(64, k), layer.spec).values()))


@pytest.mark.parametrize("name", GROUPED)
def test_quant_linear_on_a_ragged_layer_state_dict_round_trip_and_gradients(name):
    linear = torch.nn.Linear(90, 64)
    with torch.no_grad():
        linear.weight.copy_(_weight(64, 90))
    model = torch.nn.Sequential(linear)
    report = quantize_(model, QuantConfig(bits=4, format=name, group_size=32))
    layer = model[0]
    assert isinstance(layer, QuantLinear) and layer.spec.padding == 6 and report.rows[name].layers == 1
    assert layer.weight.shape == (64, 90) and report.rows[name].bytes_after == get_format(name).nbytes(layer.spec)
    x = torch.randn(5, 90, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert x.grad.shape == (5, 90)
    # the packed tensors load into a fresh layer and give the same output
    state = layer.state_dict()
    assert tuple(state["qweight"].shape) == (64, 48)
    fresh = QuantLinear(layer.spec, bias=True)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("name", ["int4", "int4c"])
def test_gptq_on_a_ragged_layer(name):
    """Calibration Hessians are [in, in]: the padded columns saw no input and keep code ``zero`` (decode to 0)."""
    fmt = get_format(name)
    spec = fmt.spec(32, 90, 32)
    w = _weight(32, 90)
    x = torch.randn(512, 90, generator=torch.Generator().manual_seed(2))
    h = x.t() @ x / len(x)
    tensors = fmt.quantize(w, spec, hessian=h)
    rtn = fmt.quantize(w, spec)
    out_err = lambda t: ((x @ fmt.dequantize(t, spec).t() - x @ w.t()).norm() / (x @ w.t()).norm()).item()
    assert out_err(tensors) < out_err(rtn)
    full = fmt.dequantize(tensors, _padded_spec(spec))
    assert torch.equal(full[:, 90:], torch.zeros(32, spec.padding))


def test_row_parallel_packed_tensors_of_a_ragged_layer_refuse_to_split():
    """A whole row-parallel layer stored padded cannot be cut into model-parallel parts: the cut would land
    inside a group. Resharding says so in one sentence instead of writing wrong shards."""
    fmt = get_format("int4")
    spec = fmt.spec(64, 120, 32)  # 120 -> 128: 4 groups, evenly divisible, yet each rank's 60 columns need 64
    kinds = packed_kinds(("row", 1), fmt, spec, "dense.")
    tensors = fmt.quantize(_weight(64, 120), spec)
    with pytest.raises(CheckpointError, match="zero-padded to whole groups"):
        split(tensors["qweight"], kinds["dense.qweight"], 2)
    assert split(tensors["qweight"], kinds["dense.qweight"], 1)[0] is tensors["qweight"]
    column = packed_kinds(("column", 1), fmt, spec, "dense.")  # rows of a column layer split as usual
    assert [t.shape[0] for t in split(tensors["qweight"], column["dense.qweight"], 2)] == [32, 32]
