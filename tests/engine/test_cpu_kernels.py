"""sat_quant's compiled nf4/fp4/int4 CPU kernel ("lut" backend): equal to the reference, picked by auto, and a clean
fallback (bitsandbytes for nf4/fp4, torch for int4) when it cannot be built."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sat_quant
from sat_quant import get_format
from sat_quant.engine.backends import BACKENDS, select_backend
from sat_quant.engine.kernels import build, lut4
from tests.conftest import HAS_AVX512, model_inputs, needs_avx512, run_logits, sat_args

ROOT = Path(__file__).resolve().parents[2]
LUT, REF = BACKENDS["lut"], BACKENDS["reference"]
# relative to max|y|: fp32 math for fp32/fp16 input (fp16 output rounding: 2^-11); bf16 output rounding 2^-8
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def quantized(fmt_name: str, n: int, k: int, group: int, seed: int = 0):
    fmt = get_format(fmt_name)
    spec = fmt.spec(n, k, group_size=group)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :group] = 0.0  # an all-zero block (absmax 0)
    w[-1, 1] = 3.0      # an outlier block
    return fmt, spec, fmt.quantize(w, spec)


def test_the_kernel_is_used_exactly_where_the_cpu_can_run_it():
    """With g++ and AVX-512 the fast path must be there, not silently replaced by a fallback; without AVX-512 it says
    why, auto picks bitsandbytes for nf4/fp4, and a quantized layer still matches the reference."""
    reason = lut4.unavailable_reason()
    if HAS_AVX512:
        assert reason is None
        return
    assert reason is not None and "AVX-512" in reason
    fmt, spec, neutral = quantized("nf4", 64, 256, 64)
    backend = select_backend("auto", fmt, spec, "cpu")
    assert backend.name == "bitsandbytes"
    x = torch.randn(3, 256)
    ref = REF.linear(x, fmt, spec, neutral)
    assert (backend.linear(x, fmt, spec, backend.prepare(fmt, spec, neutral)) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("fmt_name", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("n,k,group", [(192, 512, 64), (48, 96, 32), (200, 320, 64), (33, 1024, 256),
                                       (64, 384, 128), (16, 48, 16), (8, 1536, 384)])
@needs_avx512
@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(fmt_name, n, k, group, batch, dtype):
    fmt, spec, neutral = quantized(fmt_name, n, k, group)
    assert LUT.unsupported_reason(fmt, spec, torch.device("cpu")) is None
    kernel = LUT.prepare(fmt, spec, neutral)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = LUT.linear(x, fmt, spec, kernel)
    ref = REF.linear(x.float(), fmt, spec, neutral)
    assert y.dtype == dtype and y.shape == (batch, n)
    assert (y.float() - ref).abs().max().item() <= RTOL[dtype] * ref.abs().max().item() + 1e-6
    back = LUT.to_neutral(fmt, spec, kernel)  # the saved layout is untouched
    assert set(back) == set(neutral) and all(torch.equal(back[key], neutral[key]) for key in neutral)


@needs_avx512
@pytest.mark.parametrize("fmt_name", ["nf4", "fp4", "int4"])
def test_fp32_is_exact_up_to_summation_order(fmt_name):
    fmt, spec, neutral = quantized(fmt_name, 96, 4096, 64)
    x = torch.randn(3, 1, 4096, dtype=torch.float64)
    y = LUT.linear(x.float(), fmt, spec, LUT.prepare(fmt, spec, neutral)).double()
    ref = x @ fmt.dequantize(neutral, spec).double().t()  # float64 ground truth on the very same weights
    assert (y - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@needs_avx512
@pytest.mark.parametrize("fmt_name", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bitwise_the_reference(fmt_name, dtype):
    fmt, spec, neutral = quantized(fmt_name, 40, 352, 32)
    if fmt_name == "int4":  # codes through 0..15, minus the zero point, times the fp16 scale widened
        w = lut4.dequantize(neutral["qweight"], neutral["scale"].float(), torch.arange(16.0), 32, dtype,
                            neutral["zero"])
    else:
        w = lut4.dequantize(neutral["qweight"], neutral["absmax"], fmt.table_tensor(), 32, dtype)
    assert torch.equal(w, fmt.dequantize(neutral, spec, dtype=dtype))


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_decode_runs_the_lut_kernel_and_saves_exactly(dtype):
    """int4 on the lut kernel (``--quant-backend lut``; auto takes it where torch's int4 kernel cannot run the shape):
    the layer's output matches torch's int4 kernel on the same codes, its state dict is the saved layout bit for
    bit, and the fp32 scales it holds cost 2 bytes per group."""
    fmt, spec, neutral = quantized("int4", 256, 1024, 128)
    layer = sat_quant.QuantLinear(spec, bias=False, backend="lut")
    layer.load_neutral_(neutral)
    assert layer.backend.name == "lut"
    assert all(torch.equal(t, neutral[name]) for name, t in layer.state_dict().items())
    x = torch.randn(1, 1024).to(dtype)
    torch_int4 = BACKENDS["torch"]
    other = torch_int4.linear(x, fmt, spec, torch_int4.prepare(fmt, spec, neutral))
    ref = REF.linear(x.float(), fmt, spec, neutral)
    assert (layer(x).float() - ref).abs().max() <= RTOL[dtype] * ref.abs().max()
    assert (other.float() - ref).abs().max() <= 1.6e-2 * ref.abs().max()  # torch's own kernel rounds x to bf16
    kernel_bytes = sum(t.numel() * t.element_size() for k, t in layer._kernel.items() if not k.startswith("_"))
    assert kernel_bytes == fmt.nbytes(spec) + 2 * spec.out_features * spec.num_groups


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_the_dequantize_path_and_match(dtype):
    fmt, spec, neutral = quantized("nf4", 64, 256, 64)
    x = torch.randn(2, lut4.DEQUANT_ROWS, 256).to(dtype)  # 2 * DEQUANT_ROWS rows: the backend's tile path
    assert LUT.takes_prefill_path(x, fmt)
    y = LUT.linear(x, fmt, spec, neutral)
    ref = REF.linear(x, fmt, spec, dict(neutral))  # same dtype: the reference dequantizes to it too
    assert y.shape == (2, lut4.DEQUANT_ROWS, 64)
    assert (y.float() - ref.float()).abs().max().item() <= RTOL[dtype] * ref.float().abs().max().item()
    # the per-row kernel itself, called with as many rows, gives the same product
    direct = lut4.linear(x, neutral["qweight"], neutral["absmax"], fmt.table_tensor(), spec.group_size)
    assert (direct.float() - ref.float()).abs().max().item() <= RTOL[dtype] * ref.float().abs().max().item()


@pytest.mark.parametrize("n,k,group", [(64, 256, 8), (32, 96, 48), (16, 160, 160)])
def test_block_sizes_the_kernel_does_not_tile_fall_back(n, k, group):
    fmt, spec, neutral = quantized("nf4", n, k, group)
    assert LUT.unsupported_reason(fmt, spec, torch.device("cpu")) is not None
    backend = select_backend("auto", fmt, spec, "cpu")
    assert backend.name == "bitsandbytes"
    x = torch.randn(3, k)
    ref = REF.linear(x, fmt, spec, neutral)
    y = backend.linear(x, fmt, spec, backend.prepare(fmt, spec, neutral))
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6


@needs_avx512
def test_auto_prefers_it_for_nf4_fp4_on_cpu_only_and_for_int4_where_torch_cannot_run():
    for name in ("nf4", "fp4", "int4"):
        fmt = get_format(name)
        assert LUT.unsupported_reason(fmt, fmt.spec(4096, 4096), torch.device("cpu")) is None
        assert LUT.unsupported_reason(fmt, fmt.spec(4096, 4096), torch.device("cuda")) is not None
    for name in ("nf4", "fp4"):
        assert select_backend("auto", get_format(name), get_format(name).spec(4096, 4096), "cpu").name == "lut"
    # int4: torch's kernel first (faster at decode shapes), the lut kernel where torch's cannot run (rows not a
    # multiple of its block, a group size it does not take)
    int4 = get_format("int4")
    assert select_backend("auto", int4, int4.spec(4096, 4096), "cpu").name == "torch"
    assert select_backend("auto", int4, int4.spec(100, 256, group_size=64), "cpu").name == "lut"
    for name in ("int4c", "int8"):  # int4c's scales are not int4's layout; int8 is not 4-bit
        fmt = get_format(name)
        assert LUT.unsupported_reason(fmt, fmt.spec(128, 256), torch.device("cpu"))
        assert select_backend("auto", fmt, fmt.spec(128, 256), "cpu").name == "torch"


@needs_avx512
@pytest.mark.parametrize("builder", ["sat_get_model", "sat_quant_get_model"])
def test_sat_model_built_with_nf4_runs_on_it(builder):
    """--quant-format nf4 on SAT's LLaMA, built by SAT's own get_model (through quantized_class) or by
    sat_quant.get_model: every quantized layer runs the kernel, and the logits equal the same model run by the
    reference backend."""
    from sat.model.base_model import get_model as sat_get_model
    from sat.model.official.llama_model import LLaMAModel

    from sat_quant.sat.compat import apply_cpu_compat
    torch.manual_seed(0)
    args = sat_args("llama", quant=4, quant_format="nf4")
    if builder == "sat_get_model":
        model = sat_get_model(args, sat_quant.quantized_class(LLaMAModel)).eval()
    else:
        model = sat_quant.get_model(args, LLaMAModel).eval()
    apply_cpu_compat(model)
    layers = [m for m in model.modules() if isinstance(m, sat_quant.QuantLinear)]
    assert layers and all(m.backend.name == "lut" for m in layers)
    inputs = model_inputs("llama")
    logits = run_logits(model, inputs)
    for m in layers:
        m.backend = REF
    ref = run_logits(model, inputs)
    assert (logits - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_build_reports_a_missing_or_failing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # empty cache: a build is needed
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    path, reason = build.build_library("lut4_cpu", "lut4_cpu.cpp", lut4.FLAGS)
    assert path is None and "no C++ compiler" in reason
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    path, reason = build.build_library("lut4_cpu", "lut4_cpu.cpp", lut4.FLAGS)
    assert path is None and "failed (exit 1)" in reason
    assert not [p for p in tmp_path.rglob("*.so")], "a failed build must leave nothing to load"
    monkeypatch.setenv(build.DISABLE_ENV, "1")  # switched off by the user: not even a cached build is used
    monkeypatch.delenv("CXX")
    path, reason = build.build_library("lut4_cpu", "lut4_cpu.cpp", lut4.FLAGS)
    assert path is None and build.DISABLE_ENV in reason


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first, reason = build.build_library("lut4_cpu", "lut4_cpu.cpp", lut4.FLAGS)
    assert reason is None and first.is_file() and str(first).startswith(str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler to be found: a cache hit never needs one
    assert build.build_library("lut4_cpu", "lut4_cpu.cpp", lut4.FLAGS) == (first, None)


FALLBACK_SCRIPT = """
import json, logging, torch, sat_quant
from sat_quant.engine.backends import BACKENDS
logging.basicConfig(level=logging.WARNING)
model = torch.nn.Sequential(torch.nn.Linear(256, 128))
ref = torch.nn.Sequential(torch.nn.Linear(256, 128))
ref.load_state_dict(model.state_dict())
sat_quant.quantize_(model, sat_quant.QuantConfig(bits=4, format="nf4"))
x = torch.randn(2, 256)
layer = model[0]
expect = BACKENDS["reference"].linear(x, layer.fmt, layer.spec, layer.neutral_tensors()) + layer.bias
print(json.dumps({"backend": layer.backend.name, "err": (model(x) - expect).abs().max().item()}))
"""


def test_unavailable_kernel_falls_back_to_bitsandbytes_with_a_logged_reason(tmp_path):
    """A fresh process on a machine without a compiler (CXX points nowhere, empty kernel cache)."""
    full_env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=str(ROOT), CXX="/nonexistent/g++")
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "bitsandbytes" and out["err"] < 1e-4
    assert "nf4/fp4 CPU kernel unavailable" in proc.stderr and "no C++ compiler" in proc.stderr
