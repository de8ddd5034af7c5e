"""The prefill path (engine/backends/prefill.py): dequantized weight tiles + a dense GEMM for many rows.

Checked against the format's own ``dequantize`` (bitwise for the weight, GEMM rounding for the output), at ragged
shapes and tile counts that do not divide the rows, and the switch point: below a backend's row count ``linear`` is
its kernel, from it on the prefill path.
"""
import pytest
import torch
import torch.nn.functional as F

from sat_quant import get_format
from sat_quant.engine.backends import BACKENDS, prefill
from sat_quant.engine.layers import QuantLinear
from tests.engine.test_backends import weights

# every CPU (format, backend) pair; the lut backend's tiles come from its C++ dequantizer (from the neutral layout
# where the CPU has no AVX-512)
PAIRS = [("int8", "torch"), ("int4", "torch"), ("int4", "lut"), ("int4c", "torch"), ("int4cs", "torch"), ("nf4", "lut"),
         ("fp4", "lut"), ("nf4", "bitsandbytes"), ("fp4", "bitsandbytes"), ("int4", "reference")]


def prepared(fmt_name, backend_name, n, k, group=None):
    fmt = get_format(fmt_name)
    spec = fmt.spec(n, k, group_size=group)
    neutral = fmt.quantize(weights("adversarial", n, k), spec)
    backend = BACKENDS[backend_name]
    return fmt, spec, neutral, backend, backend.prepare(fmt, spec, neutral)


@pytest.mark.parametrize("fmt_name,backend_name", PAIRS)
# 200 columns: a ragged last group; rows are multiples of 64, the CPU int4 row block on AVX-512 (32 on AVX2)
@pytest.mark.parametrize("n,k,group", [(192, 512, None), (320, 200, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_rebuild_the_formats_own_dequantized_weight(monkeypatch, fmt_name, backend_name, n, k, group, dtype):
    fmt, spec, neutral, backend, kernel = prepared(fmt_name, backend_name, n, k, group)
    # tiles of ~40 rows: several per layer, each a whole number of the CPU int4 row blocks
    monkeypatch.setattr(prefill, "TILE_BYTES", 40 * spec.padded_in_features * dtype.itemsize)
    tiles = list(backend.weight_tiles(fmt, spec, kernel, dtype))
    assert len(tiles) >= 3
    assert [t[0] for t in tiles] == [0] + [t[1] for t in tiles[:-1]] and tiles[-1][1] == n  # every row once, in order
    rebuilt = torch.cat([w for _, _, w in tiles])
    assert rebuilt.dtype == dtype and rebuilt.shape == (n, k)
    assert torch.equal(rebuilt, fmt.dequantize_core(neutral, spec, dtype))  # int4cs: W / t (x * t runs before)


def test_int4_cpu_tiles_read_the_kernel_bytes_not_a_neutral_copy(monkeypatch):
    """The torch backend's CPU int4 layout has a costly to_neutral: its tiles must not call it."""
    fmt, spec, neutral, backend, kernel = prepared("int4", "torch", 256, 512)
    monkeypatch.setattr(type(backend), "to_neutral", lambda *a: pytest.fail("to_neutral called for prefill tiles"))
    rebuilt = torch.cat([w for _, _, w in backend.weight_tiles(fmt, spec, kernel, torch.float32)])
    assert torch.equal(rebuilt, fmt.dequantize(neutral, spec))


@pytest.mark.parametrize("fmt_name,backend_name", [("int4", "torch"), ("int4c", "torch"), ("int4cs", "torch"), ("int8", "torch"),
                                                   ("nf4", "bitsandbytes")])
def test_linear_switches_to_the_prefill_path_at_the_backends_row_count(fmt_name, backend_name):
    fmt, spec, neutral, backend, kernel = prepared(fmt_name, backend_name, 128, 256)
    threshold = backend.prefill_rows[(fmt.kernel_layout, "cpu")]
    w = fmt.dequantize(neutral, spec)
    for rows in (threshold - 1, threshold):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        y = backend.linear(x, fmt, spec, kernel)
        # int4cs: linear multiplies the activations by the column scale before either path
        xs = x if fmt.input_scale_tensor is None else x * fmt.input_scale(neutral).to(x.dtype)
        if rows < threshold:
            assert torch.equal(y, backend.kernel_linear(xs, fmt, spec, kernel))
        else:
            dtype = prefill.gemm_dtype(x)
            assert torch.equal(y, prefill.tiled_linear(xs, 128, backend.weight_tiles(fmt, spec, kernel, dtype), dtype))
        ref = F.linear(x.float(), w)
        assert (y.float() - ref).abs().max() <= 1.6e-2 * ref.abs().max()


def test_prefill_output_is_the_dense_product_of_the_dequantized_weight():
    """fp32 activations on the prefill path: the GEMM of the exact weight (only summation order differs)."""
    fmt, spec, neutral, backend, kernel = prepared("int4", "torch", 384, 1024)
    x = torch.randn(2, 300, 1024)
    y = prefill.tiled_linear(x, 384, backend.weight_tiles(fmt, spec, kernel, torch.float32), torch.float32)
    ref = F.linear(x, fmt.dequantize(neutral, spec))
    assert y.shape == (2, 300, 384) and y.dtype == torch.float32
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gemm_dtype_follows_the_cpus_bf16_support():
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert prefill.gemm_dtype(torch.ones(1, dtype=torch.bfloat16)) == (torch.bfloat16 if native else torch.float32)
    assert prefill.gemm_dtype(torch.ones(1, dtype=torch.float16)) == torch.float32
    assert prefill.gemm_dtype(torch.ones(1)) == torch.float32


def test_tiles_bound_the_extra_memory():
    """One tile at a time, each at most TILE_BYTES (or one block of rows): a 1.4 GB fp32 weight never exists whole."""
    fmt = get_format("int4")
    spec = fmt.spec(22016, 16384)  # the largest CogVLM-17B-like shape, as a spec only: nothing is allocated
    rows = prefill.rows_per_tile(spec.out_features, spec.padded_in_features, torch.float32, multiple=32)
    assert rows % 32 == 0 and rows * spec.padded_in_features * 4 <= prefill.TILE_BYTES
    assert prefill.rows_per_tile(10, 10**8, torch.float32, multiple=32) == 32  # a huge row: one block, not zero


def test_quant_linear_runs_prefill_rows_and_training_through_the_same_path():
    """A real QuantLinear at prefill size: forward matches the reference; gradients still flow to the input."""
    fmt = get_format("int4")
    layer = QuantLinear(fmt.spec(128, 256), bias=True, backend="torch", device="cpu")
    layer.quantize_weight_(weights("random", 128, 256))
    layer.bias.data.normal_()
    rows = layer.backend.prefill_rows[("int4_affine", "cpu")]
    x = torch.randn(rows + 5, 256, requires_grad=True)
    y = layer(x)
    w = fmt.dequantize(layer.neutral_tensors(), layer.spec)
    ref = F.linear(x.detach(), w, layer.bias)
    assert (y.detach() - ref).abs().max() <= 1e-5 * ref.abs().max()
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), rtol=1e-4, atol=1e-5)
