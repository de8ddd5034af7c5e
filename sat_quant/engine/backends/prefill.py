"""The prefill path: for many rows at once, dequantize the weight one tile of output rows at a time and run a dense
GEMM, instead of the weight-only kernel.

Weight-only kernels (torch's int4/int8 pack-mm, bitsandbytes, the lut kernel) are built for few rows (decode): they
read the packed weight once and are bandwidth-bound there, but their compute grows with the row count faster than a
tuned dense GEMM's (pytorch/pytorch#122813: torch's CPU int4 kernel at prefill sizes). Dequantizing costs about the
same whatever the row count, so above some rows it pays for itself. Each backend declares that row count per weight
layout and device (``Backend.prefill_rows``, measured in benchmarks/RESULTS.md "Prefill"); below it nothing changes.

The GEMM runs in float32 unless the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX) and the activations
are bf16: without them a bf16 GEMM is emulated and several times slower than float32 (same section). Tiles bound the
extra memory to one tile of dequantized weight (``TILE_BYTES``), whatever the layer's size.
"""
from __future__ import annotations

import functools
from typing import Iterable, Tuple

import torch

#: bytes of dequantized weight per tile: small enough to stay in the last-level cache while the GEMM reads it
TILE_BYTES = 8 * 2**20

WeightTiles = Iterable[Tuple[int, int, torch.Tensor]]  # (first row, end row, [end - first, in] dense weight)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (oneDNN then runs bf16 GEMMs natively)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the dense GEMM runs in for activations ``x`` (see the module docstring)."""
    if x.device.type != "cpu":
        return x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if x.dtype == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def rows_per_tile(out_features: int, in_features: int, dtype: torch.dtype, multiple: int = 1) -> int:
    """Output rows per tile: ``TILE_BYTES`` of ``dtype`` weight, at least one row (rounded to ``multiple``)."""
    rows = max(1, TILE_BYTES // max(1, in_features * torch.empty((), dtype=dtype).element_size()))
    rows = max(multiple, rows // multiple * multiple)
    return min(rows, -(-out_features // multiple) * multiple)


def tiled_linear(x: torch.Tensor, out_features: int, tiles: WeightTiles, dtype: torch.dtype) -> torch.Tensor:
    """``x [..., in] @ W^T`` with W given tile by tile (``tiles`` already in ``dtype``); the result in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dtype)
    y = torch.empty(x2.shape[0], out_features, dtype=dtype, device=x.device)
    for start, stop, weight in tiles:
        y[:, start:stop] = x2 @ weight.t()  # the copy into y is one pass over the output: small beside the GEMM
    return y.to(x.dtype).reshape(*shape[:-1], out_features)


__all__ = ["TILE_BYTES", "WeightTiles", "cpu_has_native_bf16", "gemm_dtype", "rows_per_tile", "tiled_linear"]
