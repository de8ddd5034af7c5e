"""Python side of ``csrc/lut4_cpu.cpp``: nf4/fp4 (and int4 with its zero points) ``x @ W^T`` on CPU straight from the
neutral layout.

The library is compiled on first use (about a second, see ``build.py``) and loaded with ctypes; every reason it
cannot run (no compiler, build failure, a CPU without AVX-512, disabled by env) is logged once and returned by
``unavailable_reason`` so the backend falls back to bitsandbytes instead of failing.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Optional

import torch

from .build import build_library

log = logging.getLogger("sat_quant.engine.kernels")

FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-Wno-maybe-uninitialized")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: From this many activation rows the backend takes the prefill path (weight tiles from :func:`dequantize` and a
#: dense GEMM, ``backends/lut_cpu.py``): per-row lookups stop paying off when a GEMM can reuse each weight many times.
DEQUANT_ROWS = 64
_ERRORS = {1: "this CPU lacks AVX-512 (F/BW/VL)", 2: "unsupported shape", 3: "out of memory for scratch"}


def supports_shape(in_features: int, group_size: int) -> Optional[str]:
    """None when the kernel tiles this shape (its 128-column chunks need whole blocks per 8 columns)."""
    if group_size < 16 or (128 % group_size and group_size % 128):
        return f"block size {group_size} is not 16, 32, 64, 128 or a multiple of 128"
    if in_features % 8:
        return f"in_features {in_features} is not a multiple of 8"
    return None


@functools.lru_cache(maxsize=1)
def _library():
    path, reason = build_library("lut4_cpu", "lut4_cpu.cpp", FLAGS)
    if path is None:
        return None, reason
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"loading {path} failed: {exc}"
    if lib.sq_lut4_abi_version() != 2:
        return None, f"{path} has an unexpected ABI version"
    if lib.sq_lut4_cpu_level() == 0:
        return None, _ERRORS[1]
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sq_lut4_linear.argtypes = [p, i32, i64, i64, i64, p, p, p, p, i64, i64, p, i32, i32]
    lib.sq_lut4_linear.restype = i32
    lib.sq_lut4_dequantize.argtypes = [p, p, p, p, i64, i64, i64, p, i32, i32]
    lib.sq_lut4_dequantize.restype = i32
    return lib, None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> Optional[str]:
    """None when the compiled kernel runs here; otherwise why not (logged once, at warning level)."""
    lib, reason = _library()
    if lib is None:
        log.warning("sat_quant: nf4/fp4 CPU kernel unavailable (%s); using the next backend (bitsandbytes)", reason)
    return reason


def _raw(qweight: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, zero: Optional[torch.Tensor]):
    """The C code reads raw CPU memory: make sure it gets contiguous uint8 / fp32 tensors (no-ops when they are)."""
    if qweight.dtype != torch.uint8 or qweight.device.type != "cpu":
        raise TypeError(f"lut4 kernel needs uint8 CPU codes, got {qweight.dtype} on {qweight.device}")
    if zero is not None and (zero.dtype != torch.uint8 or zero.numel() != absmax.numel()):
        raise TypeError(f"lut4 kernel needs one uint8 zero point per block, got {zero.dtype} {tuple(zero.shape)}")
    return (qweight.contiguous(), absmax.float().contiguous(), table.float().contiguous(),
            None if zero is None else zero.contiguous())


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError(f"sat_quant lut4 kernel failed: {_ERRORS.get(rc, rc)}")


def linear(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
           group_size: int, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] (fp32/bf16/fp16) @ W^T → [..., N] in x's dtype; W = (table[codes] - zero) * absmax per block
    (``zero``: uint8 per block, or None for none). The per-row kernel for any row count: callers with many rows
    (``DEQUANT_ROWS`` and more) are faster on dequantized tiles + a GEMM, which the backend does."""
    lib, reason = _library()
    if lib is None:
        raise RuntimeError(f"sat_quant lut4 kernel unavailable: {reason}")
    qweight, absmax, table, zero = _raw(qweight, absmax, table, zero)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    x2 = x.reshape(-1, k)
    if x2.dtype not in _DTYPES:
        x2 = x2.float()
    x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype)
    if m:
        code = _DTYPES[x2.dtype]
        _check(lib.sq_lut4_linear(x2.data_ptr(), code, m, k, k, qweight.data_ptr(), absmax.data_ptr(),
                                  table.data_ptr(), _ptr(zero), n, group_size, y.data_ptr(), code,
                                  torch.get_num_threads()))
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def dequantize(qweight: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32, zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The [N, K] weight in ``dtype``: the reference's values (fp32 (table - zero) * absmax, then one rounding to
    ``dtype``)."""
    lib, reason = _library()
    if lib is None:
        raise RuntimeError(f"sat_quant lut4 kernel unavailable: {reason}")
    qweight, absmax, table, zero = _raw(qweight, absmax, table, zero)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty(n, k, dtype=dtype)
    _check(lib.sq_lut4_dequantize(qweight.data_ptr(), absmax.data_ptr(), table.data_ptr(), _ptr(zero), n, k,
                                  group_size, w.data_ptr(), _DTYPES[dtype], torch.get_num_threads()))
    return w
