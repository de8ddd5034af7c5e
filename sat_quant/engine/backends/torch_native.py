"""torch's own weight-only kernels: ``_weight_int8pack_mm`` (CPU, CUDA) and the int4 tinygemm
kernels (``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA).

Both int4 kernels compute ``(q - 8) * scale + z`` per group, so our ``(q - zero) * scale``
maps to ``z = (8 - zero) * scale``. The CPU kernel wants its own interleaved nibble layout
(blocks of BLOCK_N rows); a probe on first use finds BLOCK_N and checks that our uint8 packing equals
torch's converter bit for bit, then we repack bytes (``kernels/int4pack.py`` in C++, else plain tensor ops: both
several times faster than the converter).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from ..formats import LayerSpec, WeightFormat
from ..kernels import int4pack
from .base import Backend, KernelTensors, cached, pad_activation
from .prefill import WeightTiles, rows_per_tile

_INT4_GROUPS = (32, 64, 128, 256)


def _cpu_pack_reference(codes: torch.Tensor, block_n: int) -> torch.Tensor:
    """Pure-torch model of torch's CPU int4 layout: [N/BN, K, BN/2] bytes, row j low nibble, row j+BN/2 high."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // block_n, block_n, k).transpose(1, 2)
    half = block_n // 2
    return (c[..., :half] | (c[..., half:] << 4)).reshape(n, k // 2).contiguous()


def _cpu_unpack(packed: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """Inverse of ``_cpu_pack_reference``: kernel bytes → [N, K] uint8 codes."""
    p = packed.reshape(n // block_n, k, block_n // 2)
    c = torch.cat([p & 15, p >> 4], dim=-1)  # [NB, K, BN]
    return c.transpose(1, 2).reshape(n, k).contiguous()


def _cpu_pack_neutral(qweight: torch.Tensor, block_n: int) -> torch.Tensor:
    """Neutral bytes [N, K/2] (even column in the high nibble) → the kernel's bytes, without unpacking to codes.

    A neutral byte pairs columns 2j, 2j+1 of one row; a kernel byte pairs rows i, i+BN/2 of one column. For rows
    a = i and b = i + BN/2 the kernel's column-2j byte is ``(a >> 4) | (b & 0xF0)`` and its column-2j+1 byte
    ``(a & 15) | (b << 4)``: two byte-wide expressions over a quarter of the data each, then one transposed copy."""
    n, half_k = qweight.shape
    half = block_n // 2
    rows = qweight.reshape(n // block_n, 2, half, half_k)
    a, b = rows[:, 0], rows[:, 1]  # [NB, BN/2, K/2]
    out = torch.empty(n // block_n, half_k, 2, half, dtype=torch.uint8)
    out[:, :, 0].copy_(((a >> 4) | (b & 0xF0)).transpose(1, 2))
    out[:, :, 1].copy_(((a & 15) | (b << 4)).transpose(1, 2))
    return out.reshape(n, half_k)


def _cpu_unpack_neutral(packed: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """Inverse of ``_cpu_pack_neutral``: the kernel's bytes → neutral bytes [N, K/2], without unpacking to codes."""
    half = block_n // 2
    cols = packed.reshape(n // block_n, k // 2, 2, half)
    even, odd = cols[:, :, 0], cols[:, :, 1]  # [NB, K/2, BN/2]: columns 2j and 2j+1
    out = torch.empty(n // block_n, 2, half, k // 2, dtype=torch.uint8)
    out[:, 0].copy_(((even << 4) | (odd & 15)).transpose(1, 2))
    out[:, 1].copy_(((even & 0xF0) | (odd >> 4)).transpose(1, 2))
    return out.reshape(n, k // 2)


@functools.lru_cache(maxsize=1)
def cpu_int4_block_n() -> Optional[int]:
    """Block size of torch's CPU int4 packing on this machine, or None when the layout is not the known one."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (256, 64), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block_n in (64, 32, 16, 128, 256):
        if torch.equal(_cpu_pack_reference(codes, block_n), packed):
            return block_n
    return None


def _cpu_dequantize_blocks(packed: torch.Tensor, k: int, block_n: int, scale: torch.Tensor, zero: torch.Tensor,
                           group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Kernel bytes of whole row blocks [rows/BN * K * BN/2] → [rows, K] weight ``(q - zero) * scale`` in ``dtype``,
    computed in float32 as the format's ``dequantize`` does (bitwise the same weight): each nibble is written once,
    transposed and converted in the same copy, then scaled in place."""
    half = block_n // 2
    p = packed.reshape(-1, k, half)
    w = torch.empty(p.shape[0], block_n, k, dtype=torch.float32)
    w[:, :half].copy_((p & 15).transpose(1, 2))
    w[:, half:].copy_((p >> 4).transpose(1, 2))
    w = w.reshape(-1, k // group_size, group_size)
    return w.sub_(zero[..., None]).mul_(scale[..., None]).reshape(-1, k).to(dtype)


class TorchNativeBackend(Backend):
    name = "torch"
    # From these rows on, dequantized tiles + a float32 GEMM beat torch's CPU kernels (benchmarks/RESULTS.md,
    # "Prefill", quiet 2-core AVX2 machine: both win from 128 rows at 11008x4096, the kernels still at 64 on
    # 4096x4096): int4 tinygemm and int8 pack-mm grow with rows faster than MKL's GEMM.
    prefill_rows = {("int4_affine", "cpu"): 128, ("int8_rowwise", "cpu"): 128}

    def unsupported_reason(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> Optional[str]:
        dev = torch.device(device).type
        if fmt.kernel_layout == "int8_rowwise":
            return None if dev in ("cpu", "cuda") else f"no int8 kernel for device {dev}"
        if fmt.kernel_layout != "int4_affine":
            return f"torch has no kernel for {fmt.name}"
        if spec.group_size not in _INT4_GROUPS:
            return f"torch int4 kernels need group size in {_INT4_GROUPS}, got {spec.group_size}"
        if dev == "cpu":
            block_n = cpu_int4_block_n()
            if block_n is None:
                return "torch's CPU int4 packing layout on this machine is not the one sat_quant knows"
            if spec.out_features % block_n:
                return f"torch CPU int4 kernel needs out_features divisible by {block_n}, got {spec.out_features}"
            return None
        if dev == "cuda":
            if spec.out_features % 8 or spec.padded_in_features % (16 * 8):
                return "torch CUDA int4 kernel needs out_features % 8 == 0 and in_features % 128 == 0"
            return None
        return f"no int4 kernel for device {dev}"

    # -- layout -----------------------------------------------------------------------------------
    def prepare(self, fmt: WeightFormat, spec: LayerSpec, neutral: KernelTensors) -> KernelTensors:
        if fmt.kernel_layout != "int4_affine":
            return dict(neutral)
        qweight = neutral["qweight"]
        out = {k: v for k, v in neutral.items() if k != "qweight"}  # the group parameters, as saved
        if qweight.device.type == "cpu":  # byte-level model of torch's layout (verified by the probe), in C++ where
            # it builds (loading a 4-bit CogVLM: the torch version took longer than reading the file)
            block_n = cpu_int4_block_n()
            packed = int4pack.from_neutral(qweight, block_n)
            out["packed"] = _cpu_pack_neutral(qweight, block_n) if packed is None else packed
        else:
            out["packed"] = torch.ops.aten._convert_weight_to_int4pack(qweight.contiguous(), 8)
            out["_neutral_qweight"] = qweight  # CUDA tile layout has no cheap inverse; keep the 4-bit codes too
        return out

    def zeros(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> KernelTensors:
        if fmt.kernel_layout != "int4_affine" or torch.device(device).type != "cpu":
            return super().zeros(fmt, spec, device)
        # code 0 is byte 0 in any nibble order: the packed zeros need no repacking (and no second buffer)
        layout = fmt.layout(spec)
        out = {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in layout.items()
               if name != "qweight"}
        out["packed"] = torch.zeros(layout["qweight"][0], dtype=torch.uint8, device=device)
        return out

    def to_neutral(self, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> KernelTensors:
        if fmt.kernel_layout != "int4_affine":
            return super().to_neutral(fmt, spec, kernel)
        if "_neutral_qweight" in kernel:
            qweight = kernel["_neutral_qweight"]
        else:
            n, block_n = spec.out_features, cpu_int4_block_n()
            qweight = int4pack.to_neutral(kernel["packed"], n, block_n)
            if qweight is None:
                qweight = _cpu_unpack_neutral(kernel["packed"], n, spec.padded_in_features, block_n)
        return {"qweight": qweight, **{k: v for k, v in kernel.items() if not k.startswith("_") and k != "packed"}}

    def weight_tiles(self, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors, dtype: torch.dtype) -> WeightTiles:
        if fmt.kernel_layout != "int4_affine" or "packed" not in kernel or "_neutral_qweight" in kernel:
            yield from super().weight_tiles(fmt, spec, kernel, dtype)
            return
        # straight from the CPU kernel's bytes: whole blocks of BN rows are a contiguous slice of them
        block_n, k = cpu_int4_block_n(), spec.padded_in_features
        groups = {name: t for name, t in kernel.items()
                  if not name.startswith("_") and name not in ("packed", fmt.input_scale_tensor)}
        step = rows_per_tile(spec.out_features, k, dtype, multiple=block_n)
        for start in range(0, spec.out_features, step):
            stop = min(start + step, spec.out_features)
            part = {name: t[start:stop] for name, t in groups.items()}
            scale, zero = fmt.affine_groups(part, dataclasses.replace(spec, out_features=stop - start))
            packed = kernel["packed"][start:stop]
            yield start, stop, _cpu_dequantize_blocks(packed, k, block_n, scale, zero, spec.group_size,
                                                      dtype)[:, :spec.in_features]

    def cache_nbytes(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> int:
        """int4: the bf16 scale and zero per group the kernels read (4 bytes: +1 bit/param at group 32), and on CUDA
        the neutral codes kept beside tinygemm's (``prepare``); int8: bf16 row scales, and on CPU a copy of the codes
        zero-padded to 16 columns where K is not a multiple (see ``kernel_linear``)."""
        dev, n, k = torch.device(device).type, spec.out_features, spec.padded_in_features
        extra = super().cache_nbytes(fmt, spec, device)
        if fmt.kernel_layout == "int8_rowwise":
            padded = n * (k + -k % _INT8_CPU_K) if dev == "cpu" and k % _INT8_CPU_K else 0
            return extra + 2 * n + padded
        if fmt.kernel_layout == "int4_affine":
            return extra + 4 * spec.num_groups * n + (0 if dev == "cpu" else n * k // 2)
        return extra

    # -- compute ----------------------------------------------------------------------------------
    def kernel_linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        shape = x.shape
        # Both kernels are fast only with bf16 activations (on CPU fp32 input takes a path ~10x slower
        # than dense fp32, see benchmarks/RESULTS.md); they accumulate in fp32. The activation rounding
        # (~0.3% relative) is below int8's own weight error; the output returns in the caller's dtype.
        xk = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        xk = pad_activation(xk, spec).contiguous()  # a ragged layer's stored rows end in whole zero-padded groups
        if fmt.kernel_layout == "int8_rowwise":
            scale = cached(kernel, "_scale_bf16", lambda: kernel["scale"].to(torch.bfloat16))
            qweight = kernel["qweight"]
            if xk.device.type == "cpu" and xk.shape[1] % _INT8_CPU_K:
                # torch's AVX-512 CPU kernel reads K in steps of 16 with no tail: NaN or wrong sums, or a segfault
                # (seen with torch 2.14.1 on AMD Zen 4). Zero columns on both sides add nothing.
                qweight = cached(kernel, "_qweight_k16", lambda: _pad_columns(kernel["qweight"], _INT8_CPU_K))
                xk = _pad_columns(xk, _INT8_CPU_K)
            y = torch.ops.aten._weight_int8pack_mm(xk, qweight, scale)
        else:
            sz = cached(kernel, "_sz_bf16", lambda: _scales_and_zeros(fmt, spec, kernel, torch.bfloat16))
            if xk.device.type == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, kernel["packed"], spec.group_size, sz)
            else:
                y = torch.ops.aten._weight_int4pack_mm(xk, kernel["packed"], spec.group_size, sz)
        return y.to(x.dtype).reshape(*shape[:-1], spec.out_features)


_INT8_CPU_K = 16  # the K step of torch's int8 CPU kernel (see kernel_linear)


def _pad_columns(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """``t`` [rows, K] with zero columns up to the next multiple of ``multiple``."""
    return torch.nn.functional.pad(t, (0, -t.shape[1] % multiple)).contiguous()


def _scales_and_zeros(fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors, dtype: torch.dtype) -> torch.Tensor:
    """[G, N, 2] tensor the int4 kernels read: scale, and z = (8 - zero) * scale (they compute (q - 8) * s + z)."""
    scale, zero_point = fmt.affine_groups(kernel, spec)
    zero = (8.0 - zero_point) * scale
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
