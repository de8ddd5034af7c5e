"""Every fast kernel against the reference backend, on random and adversarial weights."""
import pytest
import torch

from sat_quant import QuantBackendError, get_format
from sat_quant.engine.backends import BACKENDS, select_backend
from sat_quant.engine.backends.torch_native import (
    _cpu_pack_neutral,
    _cpu_pack_reference,
    _cpu_unpack,
    _cpu_unpack_neutral,
    cpu_int4_block_n,
)
from sat_quant.engine.formats import pack_nibbles
from tests.conftest import needs_avx512

FAST_PAIRS = [("int8", "torch"), ("int4", "torch"), ("int4c", "torch"), ("int4cs", "torch"), ("nf4", "lut"), ("fp4", "lut"),
              ("nf4", "bitsandbytes"), ("fp4", "bitsandbytes")]
FAST = [pytest.param(*pair, marks=needs_avx512) if pair[1] == "lut" else pair for pair in FAST_PAIRS]
# Output tolerance relative to max|y|. torch's CPU kernels take bf16 activations (sat_quant casts, see
# backends/torch_native.py): 8 mantissa bits, i.e. ~0.4% per element, accumulated in fp32; bitsandbytes
# keeps the input dtype, so fp32 is exact up to summation order and fp16 carries 11 bits.
RTOL = {"torch": {torch.float32: 1.6e-2, torch.bfloat16: 1.6e-2, torch.float16: 1.6e-2},
        "bitsandbytes": {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3},
        # sat_quant's nf4/fp4 kernel: fp32 math for fp32/fp16 input; bf16 input with several rows multiplies
        # bf16-rounded weights (as the reference's bf16 dequantize rounds them), accumulating in fp32
        "lut": {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}}


def weights(kind: str, n: int, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * 0.05
    if kind == "adversarial":
        w[0] = 0.0
        w[1, 3] = 40.0
        w[2] = 1.5
        w[5, ::2] = -7.0
    return w


@pytest.mark.parametrize("fmt_name,backend_name", FAST)
@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 7])
def test_fast_kernel_matches_reference(fmt_name, backend_name, kind, dtype, batch):
    fmt = get_format(fmt_name)
    n, k = 192, 512
    spec = fmt.spec(n, k)
    neutral = fmt.quantize(weights(kind, n, k), spec)
    backend = BACKENDS[backend_name]
    assert backend.unsupported_reason(fmt, spec, torch.device("cpu")) is None
    kernel = backend.prepare(fmt, spec, neutral)
    x = torch.randn(batch, 3, k).to(dtype)
    y = backend.linear(x, fmt, spec, kernel)
    ref = BACKENDS["reference"].linear(x.float(), fmt, spec, dict(neutral))
    assert y.dtype == dtype and y.shape == (batch, 3, n)
    err = (y.float() - ref).abs().max().item()
    assert err <= RTOL[backend_name][dtype] * ref.abs().max().item() + 1e-6, err
    # prepare → to_neutral is exact, so saving after running a kernel loses nothing
    back = backend.to_neutral(fmt, spec, kernel)
    assert set(back) == set(neutral) and all(torch.equal(back[key], neutral[key]) for key in neutral)


def test_cpu_int4_layout_probe_matches_torch_packing():
    block_n = cpu_int4_block_n()
    assert block_n is not None, "torch's CPU int4 layout changed: the torch backend would fall back to reference"
    codes = torch.randint(0, 16, (block_n * 3, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(_cpu_pack_reference(codes, block_n), packed)
    assert torch.equal(_cpu_unpack(packed, block_n * 3, 96, block_n).int(), codes)
    # the byte-level repack used at load and save: neutral bytes straight to torch's bytes and back
    neutral = pack_nibbles(codes)
    assert torch.equal(_cpu_pack_neutral(neutral, block_n), packed)
    assert torch.equal(_cpu_unpack_neutral(packed, block_n * 3, 96, block_n), neutral)


@pytest.mark.parametrize("fmt_name", ["int8", "int4", "int4c", "int4cs", "nf4", "fp4"])
def test_auto_picks_a_kernel_not_the_reference_on_cpu(fmt_name):
    fmt = get_format(fmt_name)
    assert select_backend("auto", fmt, fmt.spec(4096, 4096), "cpu").name != "reference"


def test_auto_falls_back_for_shapes_torch_cannot_run():
    """torch's CPU int4 kernel packs rows in blocks and takes groups 32..256 only: auto then takes sat_quant's lut
    kernel where it runs (AVX-512), else the reference."""
    from sat_quant.engine.kernels import lut4
    fmt = get_format("int4")
    fallback = "lut" if lut4.unavailable_reason() is None else "reference"
    for spec in (fmt.spec(100, 256, group_size=64), fmt.spec(128, 256, group_size=16)):
        assert BACKENDS["torch"].unsupported_reason(fmt, spec, torch.device("cpu")) is not None
        assert select_backend("auto", fmt, spec, "cpu").name == fallback


def test_explicit_backend_that_cannot_run_is_a_clear_error():
    fmt = get_format("nf4")
    with pytest.raises(QuantBackendError, match="--quant-backend torch cannot run nf4.*auto"):
        select_backend("torch", fmt, fmt.spec(128, 256), "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt_name,backend_name", [f for f in FAST_PAIRS if f[1] != "lut"])
def test_cuda_kernels_match_reference(fmt_name, backend_name):
    fmt = get_format(fmt_name)
    spec = fmt.spec(256, 1024)
    neutral = {k: v.cuda() for k, v in fmt.quantize(weights("random", 256, 1024), spec).items()}
    backend = select_backend("auto", fmt, spec, "cuda")
    kernel = backend.prepare(fmt, spec, neutral)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    y = backend.linear(x, fmt, spec, kernel)
    ref = BACKENDS["reference"].linear(x.float(), fmt, spec, dict(neutral))
    assert (y.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("fmt_name", ["int8", "int4", "nf4", "fp4"])
@pytest.mark.parametrize("n,k,group", [(48, 96, 32), (200, 320, 64), (1, 64, 32), (130, 1024, 256)])
def test_odd_shapes_run_on_the_auto_backend_and_match_reference(fmt_name, n, k, group):
    """Shapes no kernel tiles evenly: auto either runs a kernel that handles them or falls back to reference."""
    fmt = get_format(fmt_name)
    spec = fmt.spec(n, k, group_size=group)
    neutral = fmt.quantize(weights("adversarial" if n > 5 else "random", n, k), spec)
    backend = select_backend("auto", fmt, spec, "cpu")
    kernel = backend.prepare(fmt, spec, neutral)
    x = torch.randn(3, k)
    ref = BACKENDS["reference"].linear(x, fmt, spec, dict(neutral))
    y = backend.linear(x, fmt, spec, kernel)
    assert (y - ref).abs().max() <= RTOL.get(backend.name, {torch.float32: 1e-5})[torch.float32] * ref.abs().max() + 1e-6
    assert all(torch.equal(v, neutral[key]) for key, v in backend.to_neutral(fmt, spec, kernel).items())
