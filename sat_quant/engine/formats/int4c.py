"""int4c: int4 with compact (double-quantized) group parameters, so that group 64 costs ~4.2 bits/param.

Same arithmetic as ``int4`` (``w ≈ (q - zero) * scale`` per group of ``group_size`` input columns), but the
per-group scale is an 8-bit code relative to one float16 scale per output row, and the zero-point is 4 bits:

| tensor | dtype | shape | meaning |
|---|---|---|---|
| ``qweight`` | uint8 | [out, in/2] | codes 0..15, even column in the high nibble (as ``int4``) |
| ``scale`` | uint8 | [out, G] | 1..255: group scale = ``row_scale * scale / 255`` |
| ``zero`` | uint8 | [out, ceil(G/2)] | zero-points 0..15, even group in the high nibble |
| ``row_scale`` | float16 | [out] | largest round-to-nearest group scale of the row |

Bits per weight: ``4 + 12/g + 16/in`` (group 64, in 4096: 4.19; in 384: 4.23). A linear 8-bit scale code lost
nothing measurable against a float16 scale on MiniLM (0.9708 vs 0.9705 data-free, 0.9820 vs 0.9819 with
GPTQ at damp 0.01), because the scale is chosen by search against what the code can hold. ``quantize`` searches the
scale/zero per group by default (data-free); a calibration ``hessian`` adds GPTQ (:mod:`.int4_search`).

Maps onto torch's int4 kernels at load: ``scale = row_scale * code / 255`` and the unpacked zero give the
standard per-group scale and zero-point (``_scales_and_zeros``), so a backend needs no new kernel.
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
from .int4_search import choose_int4, largest_group_scale

_CODE_MAX = 255.0  # the largest 8-bit scale code; the row's largest group scale is code 255


def _rounder(row: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps group scales [n, G] to the nearest ``row * code / 255`` with code 1..255."""
    def round_scale(scale: torch.Tensor) -> torch.Tensor:
        return row * _scale_codes(scale, row) / _CODE_MAX
    return round_scale


def _scale_codes(scale: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return torch.round(scale / row * _CODE_MAX).clamp_(1, _CODE_MAX)


def group_scales(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [out, G] group scales of an int4c layer (what a backend hands to a standard int4 kernel)."""
    return tensors["row_scale"].float()[:, None] * tensors["scale"].float() / _CODE_MAX


def group_zeros(tensors: Dict[str, torch.Tensor], num_groups: int) -> torch.Tensor:
    """uint8 [out, G] zero-points of an int4c layer."""
    return unpack_nibbles(tensors["zero"])[:, :num_groups].contiguous()


@register_format
class Int4Compact(WeightFormat):
    name = "int4c"
    bits = 4
    grouped = True
    default_group_size = 64
    description = "int4, asymmetric, 8-bit group scale under an fp16 row scale + 4-bit zero-point; searched values"
    tensor_names = ("qweight", "scale", "zero", "row_scale")
    kernel_layout = "int4_affine"
    backend_order = ("torch", "reference")
    calibratable = True
    per_row_tensors = ("row_scale",)  # row-parallel shards: the whole row's (max over ranks), see shard_statistics
    row_shard_group_multiple = 2  # zero-points pack two groups to a byte: a shard must not end inside a byte

    def affine_groups(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec) -> Tuple[torch.Tensor, torch.Tensor]:
        return group_scales(tensors), group_zeros(tensors, spec.num_groups).float()

    def layout(self, spec: LayerSpec) -> TensorLayout:
        n, k, g = spec.out_features, spec.padded_in_features, spec.num_groups
        return {"qweight": ((n, k // 2), torch.uint8),
                "scale": ((n, g), torch.uint8),
                "zero": ((n, (g + 1) // 2), torch.uint8),
                "row_scale": ((n,), torch.float16)}

    def quantize(self, weight: torch.Tensor, spec: LayerSpec, *, hessian: Optional[torch.Tensor] = None,
                 search: bool = True, damp: float = 0.1, act_order: bool = True,
                 row_scale: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Searched scales/zeros (default; ``search=False``: round to nearest), GPTQ with a ``hessian`` [in, in].
        ``row_scale`` [out]: the rows' reference scale from the whole row (a row-parallel shard's, given)."""
        weight = pad_columns(weight, spec)  # zero columns change no group's range: [min(w, 0), max(w, 0)]
        row = largest_group_scale(weight, spec.group_size) if row_scale is None else row_scale.float().reshape(-1, 1)
        codes, scale, zero = choose_int4(weight, spec.group_size, _rounder(row), hessian=pad_hessian(hessian, spec),
                                         search=search, damp=damp, act_order=act_order)
        zero = zero.to(torch.uint8)
        if zero.shape[1] % 2:  # an odd group count: pad one zero-point so they pack two to a byte
            zero = torch.cat([zero, torch.zeros_like(zero[:, :1])], dim=1)
        return {"qweight": pack_nibbles(codes).contiguous(),
                "scale": _scale_codes(scale, row).to(torch.uint8).contiguous(),
                "zero": pack_nibbles(zero).contiguous(),
                "row_scale": row[:, 0].half().contiguous()}

    def shard_statistics(self, weight: torch.Tensor, spec: LayerSpec, *, sharded: str,
                         reduce: Reduce) -> Dict[str, torch.Tensor]:
        """A row-parallel shard's row scale is the whole row's: the largest group scale over every rank's groups."""
        if sharded != "columns":
            return {}
        row = largest_group_scale(pad_columns(weight.detach().float(), spec), spec.group_size)[:, 0]
        return {"row_scale": reduce(row, "max")}

    def dequantize(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = spec.out_features, spec.padded_in_features, spec.num_groups
        q = unpack_nibbles(tensors["qweight"]).float().reshape(n, g, k // g)
        zero = group_zeros(tensors, g).float()
        w = (q - zero[..., None]) * group_scales(tensors)[..., None]
        return w.reshape(n, k)[:, :spec.in_features].to(dtype)
