"""Python side of ``csrc/int4pack_cpu.cpp``: neutral int4 bytes <-> torch's CPU int4 kernel bytes, in C++.

Loading a 4-bit CogVLM repacks ~9 GB of codes; the same byte expressions in torch ops ran at ~0.3 GB/s (a pass per
operator plus a strided transposed copy), longer than reading and verifying the file. ``None`` from either function
means the library is unavailable here (no compiler, disabled by env): the caller then uses its torch version.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Optional

import torch

from .build import build_library

log = logging.getLogger("sat_quant.engine.kernels")

FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread")


@functools.lru_cache(maxsize=1)
def _library():
    path, reason = build_library("int4pack_cpu", "int4pack_cpu.cpp", FLAGS)
    if path is None:
        log.info("sat_quant: int4 repack library unavailable (%s); repacking with torch ops", reason)
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.info("sat_quant: loading %s failed (%s); repacking with torch ops", path, exc)
        return None
    if lib.sq_int4pack_abi_version() != 1:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn in (lib.sq_int4pack_from_neutral, lib.sq_int4pack_to_neutral):
        fn.argtypes = [p, i64, i64, i64, p, i32]
        fn.restype = i32
    return lib


def _shuffle(name: str, src: torch.Tensor, n: int, block_n: int) -> Optional[torch.Tensor]:
    lib = _library()
    if lib is None:
        return None
    src = src.contiguous()
    if src.dtype != torch.uint8 or src.device.type != "cpu" or src.dim() != 2 or src.shape[0] != n:
        raise TypeError(f"int4 repack needs uint8 CPU bytes [{n}, K/2], got {src.dtype} {tuple(src.shape)} on "
                        f"{src.device}")
    out = torch.empty_like(src)
    if getattr(lib, name)(src.data_ptr(), n, src.shape[1], block_n, out.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"int4 repack: {n} rows are not whole blocks of {block_n}")
    return out


def from_neutral(qweight: torch.Tensor, block_n: int) -> Optional[torch.Tensor]:
    """Neutral bytes [N, K/2] → torch's CPU kernel bytes (same shape), or None without the library."""
    return _shuffle("sq_int4pack_from_neutral", qweight, qweight.shape[0], block_n)


def to_neutral(packed: torch.Tensor, n: int, block_n: int) -> Optional[torch.Tensor]:
    """torch's CPU kernel bytes [N, K/2] → neutral bytes, or None without the library."""
    return _shuffle("sq_int4pack_to_neutral", packed, n, block_n)
