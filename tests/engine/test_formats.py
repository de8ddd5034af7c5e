"""Reference quantize/dequantize of every format: round-trip error bounds, exact cases, bad shapes."""
import pytest
import torch

from sat_quant import QuantConfigError, get_format
from sat_quant.engine.backends import BACKENDS
from sat_quant.engine.formats import DEFAULT_FORMAT_FOR_BITS, FORMATS, WeightFormat, pack_nibbles, unpack_nibbles

FORMAT_NAMES = sorted(FORMATS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_nibble_packing_round_trips_and_uses_high_nibble_first():
    codes = torch.randint(0, 16, (8, 64))
    packed = pack_nibbles(codes)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed).long(), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) * 16 + int(codes[0, 1])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_layout_matches_quantized_tensors(name):
    fmt = get_format(name)
    spec = fmt.spec(96, 256)
    tensors = fmt.quantize(torch.randn(96, 256), spec)
    layout = fmt.layout(spec)
    assert set(tensors) == set(layout)
    for key, (shape, dtype) in layout.items():
        assert tuple(tensors[key].shape) == shape and tensors[key].dtype == dtype, key
    assert fmt.nbytes(spec) == sum(t.numel() * t.element_size() for t in tensors.values())


# Worst-case error per element, relative to the largest |w| in its group/row: half a quantization step.
# int8: step = absmax/127; int4: step = range/15 ≤ 2*absmax/15; nf4: largest gap of the table ≈ 0.30;
# fp4: largest gap 1/3 (between 2/3 and 1).
# int4c searches its range and may clip up to 24% of it (int4_search.DEFAULT_SHRINKS) when that lowers the
# group's total error: its bound is the clipped part of the range (up to 2 * absmax) plus half a step.
MAX_REL_ERROR = {"int8": 0.5 / 127 + 1e-6, "int4": 1.0 / 15 + 2e-3, "nf4": 0.31 / 2 + 1e-3, "fp4": 0.34 / 2 + 1e-3,
                 "int4c": 0.24 * 2 + 1.0 / 15 + 2e-3}
MAX_REL_ERROR["int4cs"] = MAX_REL_ERROR["int4c"]  # measured on W / t, the weight its int4c codes hold


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_round_trip_error_is_at_most_half_a_step(name):
    fmt = get_format(name)
    w = torch.randn(64, 512) * torch.logspace(-3, 1, 64)[:, None]  # rows with very different magnitudes
    spec = fmt.spec(64, 512)
    tensors = fmt.quantize(w, spec)
    back = fmt.dequantize(tensors, spec)
    if fmt.input_scale_tensor is not None:  # W ≈ core * t: the core's error bound holds for W / t
        t = fmt.input_scale(tensors)
        w, back = w / t, back / t
    group = spec.group_size or 512
    absmax = w.abs().reshape(64, -1, group).amax(-1, keepdim=True)
    rel = ((back - w).abs().reshape(64, -1, group) / absmax).max().item()
    assert rel <= MAX_REL_ERROR[name], rel


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_adversarial_weights(name):
    fmt = get_format(name)
    spec = fmt.spec(32, 256)
    w = torch.randn(32, 256) * 0.02
    w[0] = 0.0                       # zero row
    w[1, 7] = 50.0                   # one huge outlier
    w[2] = 3.0                       # constant row
    w[3] = -1e-4                     # tiny constant negative row
    tensors = fmt.quantize(w, spec)
    back = fmt.dequantize(tensors, spec)
    assert torch.isfinite(back).all()
    assert torch.equal(back[0], torch.zeros(256)), "a zero row must stay exactly zero"
    # the outlier sets its group's range: it is kept to half a step (int4cs: its 4-bit scale code cannot fit the
    # range exactly, so up to 1/30 of it; the others fit their scale to it)
    assert abs(back[1, 7].item() - 50.0) / 50.0 < (1 / 30 if fmt.input_scale_tensor else 0.01), "the outlier is kept"
    if fmt.input_scale_tensor is not None:
        # int4cs stores W / t: a constant row of W is not constant there, so it gets int4c's error on W / t
        t = fmt.input_scale(tensors)
        for row in (2, 3):
            core_w, core_back = w[row] / t, back[row] / t
            span = core_w.reshape(-1, spec.group_size).abs().amax(-1, keepdim=True)
            assert ((core_back - core_w).reshape(-1, spec.group_size).abs() <= span * MAX_REL_ERROR[name]).all()
        return
    assert torch.allclose(back[2], w[2], rtol=1e-3), "a constant row is reproduced"
    assert torch.allclose(back[3], w[3], rtol=2e-3, atol=1e-7)


def test_4bit_codes_match_bitsandbytes():
    import bitsandbytes.functional as bnbf
    w = torch.randn(64, 256)
    for name in ("nf4", "fp4"):
        fmt = get_format(name)
        spec = fmt.spec(64, 256)
        ours = fmt.quantize(w, spec)
        packed, state = bnbf.quantize_4bit(w, blocksize=spec.group_size, quant_type=name)
        assert torch.equal(ours["qweight"].reshape(-1), packed.reshape(-1))
        assert torch.equal(ours["absmax"].reshape(-1), state.absmax)
        assert torch.equal(fmt.dequantize(ours, spec), bnbf.dequantize_4bit(packed, state))


def test_bits_per_param():
    assert get_format("int4").bits_per_param(get_format("int4").spec(4096, 4096)) == pytest.approx(4 + 24 / 128)
    assert get_format("nf4").bits_per_param(get_format("nf4").spec(4096, 4096)) == pytest.approx(4.5)
    assert get_format("int8").bits_per_param(get_format("int8").spec(4096, 4096)) == pytest.approx(8 + 32 / 4096)
    # int4c: 4-bit codes, an 8-bit scale and a 4-bit zero per group of 64, an fp16 scale per row
    assert get_format("int4c").bits_per_param(get_format("int4c").spec(4096, 4096)) == pytest.approx(
        4 + 12 / 64 + 16 / 4096)
    assert get_format("int4c").bits_per_param(get_format("int4c").spec(4096, 4096)) <= 4.3


@pytest.mark.parametrize("name", ["int4", "int4c", "nf4", "fp4"])
def test_group_that_does_not_divide_in_features_is_zero_padded(name):
    spec = get_format(name).spec(64, 96, group_size=128, where="mlp.fc")  # one group, 32 zero columns
    assert (spec.num_groups, spec.padded_in_features, spec.padding) == (1, 128, 32)
    assert get_format(name).layout(spec)["qweight"][0] == (64, 64)
    with pytest.raises(QuantConfigError, match="positive even number"):
        get_format(name).spec(64, 96, group_size=33, where="mlp.fc")


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(QuantConfigError, match="int4.*int8.*nf4"):
        get_format("int3")


# -- better int4 values: search and GPTQ (sat_quant.engine.formats.int4_search) ----------------------------------

def _group_errors(fmt, spec, w, tensors, weight=None):
    err = (fmt.dequantize(tensors, spec) - w) ** 2
    if weight is not None:
        err = err * weight
    return err.reshape(w.shape[0], -1, spec.group_size).sum(-1)


@pytest.mark.parametrize("name", ["int4", "int4c"])
def test_search_never_loses_to_round_to_nearest_in_any_group(name):
    # the search scores the round-to-nearest range among its candidates and keeps a refit only if it is
    # better, so no group may get worse; heavy-tailed weights (Student-t) give clipping something to win
    fmt = get_format(name)
    spec = fmt.spec(128, 512, 64)
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((128, 512)) * 0.02
    rtn = _group_errors(fmt, spec, w, fmt.quantize(w, spec, search=False))
    searched = _group_errors(fmt, spec, w, fmt.quantize(w, spec, search=True))
    assert (searched <= rtn * (1 + 1e-5) + 1e-12).all()
    assert searched.sum() < 0.97 * rtn.sum()  # measured 0.95 (both formats): clipping tails pays on heavy tails


def test_int4c_layout_details():
    fmt = get_format("int4c")
    spec = fmt.spec(8, 192, 64)  # 3 groups: an odd count, the zero-points are padded to whole bytes
    w = torch.randn(8, 192)
    t = fmt.quantize(w, spec)
    assert t["zero"].shape == (8, 2) and int((t["zero"][:, 1] & 15).max()) == 0
    from sat_quant.engine.formats.int4c import group_scales, group_zeros
    scales, zeros = group_scales(t), group_zeros(t, 3)
    # the row's largest group scale is code 255, i.e. row_scale itself, and dequantize is (q - zero) * scale
    assert int(t["scale"].max(dim=1).values.min()) >= 200
    q = unpack_nibbles(t["qweight"]).float().reshape(8, 3, 64)
    expected = ((q - zeros.float()[..., None]) * scales[..., None]).reshape(8, 192)
    assert torch.equal(fmt.dequantize(t, spec), expected)


def _calibration(k: int, n_tokens: int = 2048):
    """Inputs with a few outlier channels, like a transformer's LayerNorm outputs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_tokens, k, generator=gen)
    x[:, :4] *= 20.0
    return x


@pytest.mark.parametrize("name", ["int4", "int4c"])
def test_gptq_lowers_the_layer_output_error(name):
    fmt = get_format(name)
    spec = fmt.spec(64, 256, 64)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    x = _calibration(256)
    hessian = x.T @ x / x.shape[0]
    test_x = _calibration(256, 512) + 0.1 * torch.randn(512, 256)

    def output_error(tensors):
        return ((test_x @ (fmt.dequantize(tensors, spec) - w).T) ** 2).mean().item()

    rtn = output_error(fmt.quantize(w, spec, search=False))
    gptq = output_error(fmt.quantize(w, spec, hessian=hessian))
    assert gptq < 0.6 * rtn  # measured ~0.3-0.4 on these inputs: error feedback moves error off hot channels
    t = fmt.quantize(w, spec, hessian=hessian)
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == fmt.layout(spec)


def test_gptq_with_identity_hessian_equals_rounding_to_nearest_on_its_grid():
    # with H = I no column's error can be pushed anywhere useful: GPTQ must pick the nearest code everywhere
    from sat_quant.engine.formats.int4_search import _codes, gptq_codes
    w = torch.randn(16, 128) * 0.02
    scale = (w.abs().reshape(16, 2, 64).amax(-1) / 7.5).clamp(min=1e-8)
    zero = torch.full((16, 2), 8.0)
    codes = gptq_codes(w, torch.eye(128), 64, scale, zero, damp=0.0)
    assert torch.equal(codes, _codes(w.reshape(16, 2, 64), scale, zero).to(torch.uint8).reshape(16, 128))


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_declared_abilities_match_what_the_format_does(fmt_name):
    """What a format declares on its class (read by backends, calibration, model-parallel splitting and inspect)
    is what its layout and arithmetic actually do."""
    fmt = FORMATS[fmt_name]
    spec = fmt.spec(64, 256, None)
    layout = fmt.layout(spec)
    assert fmt.tensor_names == tuple(layout)
    for name in fmt.per_row_tensors:
        assert layout[name][0] == (spec.out_features,)
    assert fmt.backend_order[-1] == "reference" and set(fmt.backend_order) <= set(BACKENDS)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    tensors = fmt.quantize(w, spec)
    if fmt.kernel_layout == "int4_affine":  # what torch's int4 kernels are handed
        scale, zero = fmt.affine_groups(tensors, spec)
        codes = unpack_nibbles(tensors["qweight"]).float().reshape(64, spec.num_groups, -1)
        rebuilt = ((codes - zero[..., None]) * scale[..., None]).reshape(64, 256)
        torch.testing.assert_close(rebuilt, fmt.dequantize_core(tensors, spec))
    if fmt.input_scale_tensor is None:
        assert torch.equal(fmt.dequantize_core(tensors, spec), fmt.dequantize(tensors, spec))
    else:  # the kernels multiply the activations by it: one value per input column, and W = core * t
        assert layout[fmt.input_scale_tensor][0] == (spec.in_features,)
        t = fmt.input_scale(tensors)
        torch.testing.assert_close(fmt.dequantize_core(tensors, spec) * t, fmt.dequantize(tensors, spec))
    if fmt.calibratable:  # GPTQ against an identity Hessian stays in the same layout
        calibrated = fmt.quantize(w, spec, hessian=torch.eye(256))
        assert {k: (tuple(v.shape), v.dtype) for k, v in calibrated.items()} == dict(layout)
    # per-row tensors span a row-parallel layer's every rank: the format must take them from the whole row on shards
    # (tests/io/test_parallel.py checks what its shard_statistics give against the whole weight's)
    assert not fmt.per_row_tensors or type(fmt).shard_statistics is not WeightFormat.shard_statistics
    for sharded in ("rows", "columns"):  # one shard holding the whole weight: its statistics change nothing
        stats = fmt.shard_statistics(w, spec, sharded=sharded, reduce=lambda t, op: t)
        again = fmt.quantize(w, spec, **stats)
        assert all(torch.equal(again[k], tensors[k]) for k in tensors), sharded
    assert DEFAULT_FORMAT_FOR_BITS[fmt.bits] != fmt_name or fmt.default_for_bits


@pytest.mark.parametrize("fmt_name", ["nf4", "fp4"])
def test_table_formats_quantize_in_row_chunks_with_identical_codes(fmt_name, monkeypatch):
    """nf4/fp4 quantize a few rows at a time (bounded temporaries); chunking must not change a single code."""
    import sat_quant.engine.formats.float4 as float4
    fmt = get_format(fmt_name)
    spec = fmt.spec(300, 256)
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(3))
    whole = fmt.quantize(w, spec)
    monkeypatch.setattr(float4, "_CHUNK_ELEMENTS", 7 * 256)  # 7 rows per step, a ragged last chunk
    chunked = fmt.quantize(w, spec)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_column_scales_undo_a_per_column_scaling_and_lower_the_error():
    """SINQ's column scale (int4_search.column_scales) on a weight whose columns differ in scale by 100x: it finds
    those scales (up to a constant), and int4c of W / t, times t, reconstructs W better than int4c of W."""
    from sat_quant.engine.formats.int4_search import column_scales
    gen = torch.Generator().manual_seed(0)
    factors = torch.logspace(-1, 1, 256)[torch.randperm(256, generator=gen)]
    w = torch.randn(128, 256, generator=gen) * factors * 0.02
    t = column_scales(w)
    assert t.shape == (256,) and t.dtype == torch.float32
    assert abs(t.log().mean().item()) < 1e-5  # geometric mean 1: the scale of W / t stays W's
    assert torch.corrcoef(torch.stack([t.log(), factors.log()]))[0, 1] > 0.99
    balanced = (w / t).std(dim=0)
    assert (balanced.max() / balanced.min()).item() < 2.0 < (w.std(dim=0).max() / w.std(dim=0).min()).item()
    fmt = get_format("int4c")
    spec = fmt.spec(128, 256, 64)
    plain = ((fmt.dequantize(fmt.quantize(w, spec), spec) - w) ** 2).sum()
    scaled = ((fmt.dequantize(fmt.quantize(w / t, spec), spec) * t - w) ** 2).sum()
    assert scaled < 0.7 * plain  # measured 0.57: the big columns no longer set every group's range


def test_column_scales_leave_zero_rows_and_columns_alone():
    from sat_quant.engine.formats.int4_search import column_scales
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[0] = 0.0
    w[:, 5] = 0.0
    t = column_scales(w)
    assert torch.isfinite(t).all() and (t.half() > 0).all()  # an fp16 t never divides by zero
    assert torch.equal(column_scales(torch.zeros(8, 16)), torch.ones(16))
