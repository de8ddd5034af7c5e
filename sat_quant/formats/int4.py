"""int4 grouped asymmetric: w ≈ q * scale + offset per group of ``group_size`` input columns.

Neutral tensors: ``qweight`` uint8 [out, in/2] (two codes per byte, even column in the high
nibble), ``scale`` and ``offset`` float16 [out, in/group]. Storing the offset (the group minimum)
instead of an integer zero point keeps constant or far-from-zero groups exact in fp16.
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import LayerSpec, TensorLayout, WeightFormat, pack_nibbles, unpack_nibbles

_MIN_SCALE = 2.0 ** -24  # smallest positive fp16: a flat group still divides safely


class Int4Grouped(WeightFormat):
    name = "int4"
    bits = 4
    grouped = True
    default_group_size = 128
    description = "int4, asymmetric, fp16 scale + offset per group"

    def layout(self, spec: LayerSpec) -> TensorLayout:
        n, k, g = spec.out_features, spec.in_features, spec.num_groups
        return {"qweight": ((n, k // 2), torch.uint8),
                "scale": ((n, g), torch.float16),
                "offset": ((n, g), torch.float16)}

    def quantize(self, weight: torch.Tensor, spec: LayerSpec) -> Dict[str, torch.Tensor]:
        n, k, g = spec.out_features, spec.in_features, spec.num_groups
        w = weight.detach().float().reshape(n, g, k // g)
        wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
        # round the stored statistics first, so codes are chosen against what dequantize will use
        scale = ((wmax - wmin) / 15.0).clamp_(min=_MIN_SCALE).half()
        offset = wmin.half()
        q = torch.round((w - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15)
        return {"qweight": pack_nibbles(q.reshape(n, k)).contiguous(),
                "scale": scale.contiguous(), "offset": offset.contiguous()}

    def dequantize(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = spec.out_features, spec.in_features, spec.num_groups
        q = unpack_nibbles(tensors["qweight"]).float().reshape(n, g, k // g)
        w = q * tensors["scale"].float()[..., None] + tensors["offset"].float()[..., None]
        return w.reshape(n, k).to(dtype)
