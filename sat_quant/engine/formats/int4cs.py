"""int4cs: int4 of ``W / t`` with SINQ's per-input-column scale ``t`` and one byte of group parameters.

``W ≈ core * t``, where ``core`` is asymmetric int4 per group of ``g`` input columns and ``t`` [in] evens the columns
(Müller et al. 2025, "SINQ": :func:`.int4_search.column_scales`, Sinkhorn on standard deviations). It pays on
transformer linears because a column's weight spread anti-correlates with its input's mean square (LayerNorm
outputs with a few channels 20-300x the median): evening the columns spends precision on the hot inputs. Once
rows and columns are balanced a 4-bit group-scale code loses almost nothing (all-MiniLM-L6-v2, SINQ, group 64:
8-bit code 0.9759, 4-bit 0.9761), so a group costs one byte and group 32 fits in 4.3 bits/param.

| tensor | dtype | shape | meaning |
|---|---|---|---|
| ``qweight`` | uint8 | [out, in/2] | codes 0..15, even column in the high nibble (as int4) |
| ``scale_zero`` | uint8 | [out, G] | high nibble ``s``: group scale = ``row_scale * (s + 1) / 16``; low nibble: zero-point |
| ``row_scale`` | float16 | [out] | the row's largest group scale |
| ``col_scale`` | uint8 | [in] | ``t = 2 ** ((c - 128) / 16)`` (exact by construction: ``core`` fits the stored ``t``) |

Bits per weight: ``4 + 8/g + 16/in + 8/out`` (group 32 at 4096x4096: 4.256). Kernels run it as ``(x * t) @ core^T``:
``Backend.linear`` multiplies the activations by ``t`` (``input_scale_tensor``) before any kernel, so torch's int4
kernels run ``core`` through ``affine_groups`` unchanged; ``dequantize`` returns ``core * t``, ``dequantize_core``
what the kernels hold. Values: searched scales/zeros (data-free), GPTQ against ``t H t`` with a calibration Hessian.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .base import (
    LayerSpec,
    Reduce,
    TensorLayout,
    WeightFormat,
    pack_nibbles,
    pad_columns,
    pad_hessian,
    register_format,
    unpack_nibbles,
)
from .int4_search import choose_int4, column_scales, largest_group_scale

_SCALE_STEPS = 16.0  # group scale = row_scale * (code + 1) / 16, code 0..15
_T_STEPS = 16.0  # col_scale code c: t = 2 ** ((c - 128) / 16), 4.4% apart, 2^-8 .. 2^7.9


def encode_col_scale(t: torch.Tensor) -> torch.Tensor:
    """float [in] column scales → uint8 codes (nearest on a log2 grid of 1/16 steps, clamped to 2^-8 .. 2^7.9)."""
    return torch.round(torch.log2(t.float().clamp(min=1e-30)) * _T_STEPS + 128).clamp_(0, 255).to(torch.uint8)


def decode_col_scale(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [in] → float32 ``t``."""
    return torch.exp2((codes.float() - 128) / _T_STEPS)


def _scale_codes(scale: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return (torch.round(scale / row * _SCALE_STEPS) - 1).clamp_(0, _SCALE_STEPS - 1)


def _rounder(row: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps group scales [n, G] to the nearest ``row * (code + 1) / 16`` the layout holds."""
    def round_scale(scale: torch.Tensor) -> torch.Tensor:
        return row * (_scale_codes(scale, row) + 1) / _SCALE_STEPS
    return round_scale


@register_format
class Int4ColumnScaled(WeightFormat):
    name = "int4cs"
    bits = 4
    grouped = True
    default_group_size = 32
    description = ("int4 of W / t, per-input-column scale t (SINQ), 4-bit group scale + 4-bit zero in one byte; "
                   "the activations are multiplied by t")
    tensor_names = ("qweight", "scale_zero", "row_scale", "col_scale")
    kernel_layout = "int4_affine"
    backend_order = ("torch", "reference")
    calibratable = True
    per_row_tensors = ("row_scale",)  # row-parallel shards: the whole row's (max over ranks), see shard_statistics
    input_scale_tensor = "col_scale"

    def layout(self, spec: LayerSpec) -> TensorLayout:
        n, k, g = spec.out_features, spec.padded_in_features, spec.num_groups
        return {"qweight": ((n, k // 2), torch.uint8),
                "scale_zero": ((n, g), torch.uint8),
                "row_scale": ((n,), torch.float16),
                "col_scale": ((spec.in_features,), torch.uint8)}

    def affine_groups(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec) -> Tuple[torch.Tensor, torch.Tensor]:
        sz = tensors["scale_zero"]
        scale = tensors["row_scale"].float()[:, None] * ((sz >> 4).float() + 1) / _SCALE_STEPS
        return scale, (sz & 15).float()

    def input_scale(self, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 [in] ``t``: what ``Backend.linear`` multiplies the activations by."""
        return decode_col_scale(tensors["col_scale"])

    def quantize(self, weight: torch.Tensor, spec: LayerSpec, *, hessian: Optional[torch.Tensor] = None,
                 search: bool = True, damp: float = 0.1, act_order: bool = True,
                 col_scale: Optional[torch.Tensor] = None,
                 row_scale: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``t`` from the weight alone, stored as its code; then int4 of ``W / t`` against that stored ``t``: searched
        scales/zeros, or GPTQ against ``t H t`` (the Hessian of the scaled inputs ``x * t``) when a calibration
        ``hessian`` [in, in] is given. A model-parallel shard is given the whole weight's statistics
        (``shard_statistics``): ``col_scale`` (float ``t`` of its columns) and, row-parallel, ``row_scale`` [out]."""
        w = weight.detach().float()
        codes_t = encode_col_scale(column_scales(w) if col_scale is None else col_scale.to(w.device))
        t = decode_col_scale(codes_t)
        if hessian is not None:
            hessian = hessian.float() * t[:, None] * t[None, :]
        core = pad_columns(w / t, spec)  # zero columns change no group's range: [min(w, 0), max(w, 0)]
        row = largest_group_scale(core, spec.group_size) if row_scale is None else row_scale.float().reshape(-1, 1)
        codes, scale, zero = choose_int4(core, spec.group_size, _rounder(row), hessian=pad_hessian(hessian, spec),
                                         search=search, damp=damp, act_order=act_order)
        scale_zero = (_scale_codes(scale, row).to(torch.uint8) << 4) | zero.to(torch.uint8)
        return {"qweight": pack_nibbles(codes).contiguous(), "scale_zero": scale_zero.contiguous(),
                "row_scale": row[:, 0].half().contiguous(), "col_scale": codes_t.contiguous()}

    def shard_statistics(self, weight: torch.Tensor, spec: LayerSpec, *, sharded: str,
                         reduce: Reduce) -> Dict[str, torch.Tensor]:
        """``t`` from the whole weight's row and column spreads (``column_scales`` with the sums over the other ranks'
        rows or columns); a row-parallel shard also gets the whole row's row scale (the max over ranks)."""
        w = weight.detach().float()
        if sharded == "rows":
            return {"col_scale": column_scales(w, rows_reduce=reduce)}
        t = column_scales(w, columns_reduce=reduce)
        core = pad_columns(w / decode_col_scale(encode_col_scale(t)), spec)
        return {"col_scale": t, "row_scale": reduce(largest_group_scale(core, spec.group_size)[:, 0], "max")}

    def dequantize_core(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = spec.out_features, spec.padded_in_features, spec.num_groups
        q = unpack_nibbles(tensors["qweight"]).float().reshape(n, g, k // g)
        scale, zero = self.affine_groups(tensors, spec)
        return ((q - zero[..., None]) * scale[..., None]).reshape(n, k)[:, :spec.in_features].to(dtype)

    def dequantize(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        core = self.dequantize_core(tensors, spec, torch.float32)
        return (core * self.input_scale(tensors)[None, :]).to(dtype)
