"""Reference quantize/dequantize of every format: round-trip error bounds, exact cases, bad shapes."""
import pytest
import torch

from sat_quant import QuantConfigError, get_format
from sat_quant.formats import FORMATS, pack_nibbles, unpack_nibbles

FORMAT_NAMES = sorted(FORMATS)


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
MAX_REL_ERROR = {"int8": 0.5 / 127 + 1e-6, "int4": 1.0 / 15 + 2e-3, "nf4": 0.31 / 2 + 1e-3, "fp4": 0.34 / 2 + 1e-3}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_round_trip_error_is_at_most_half_a_step(name):
    fmt = get_format(name)
    w = torch.randn(64, 512) * torch.logspace(-3, 1, 64)[:, None]  # rows with very different magnitudes
    spec = fmt.spec(64, 512)
    back = fmt.dequantize(fmt.quantize(w, spec), spec)
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
    back = fmt.dequantize(fmt.quantize(w, spec), spec)
    assert torch.isfinite(back).all()
    assert torch.equal(back[0], torch.zeros(256)), "a zero row must stay exactly zero"
    assert abs(back[1, 7].item() - 50.0) / 50.0 < 0.01, "the outlier itself is kept"
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


@pytest.mark.parametrize("name", ["int4", "nf4", "fp4"])
def test_group_that_does_not_divide_in_features_is_a_clear_error(name):
    with pytest.raises(QuantConfigError, match=r"not divisible by group size 128.*--quant-group-size 32"):
        get_format(name).spec(64, 96, group_size=128, where="mlp.fc")


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(QuantConfigError, match="int4.*int8.*nf4"):
        get_format("int3")
