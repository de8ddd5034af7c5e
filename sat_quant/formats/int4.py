"""int4 grouped asymmetric with an integer zero-point: w ≈ (q - zero) * scale per group of ``group_size``
input columns (the GPTQ/AWQ convention, and the one torch's int4 kernels compute).

Neutral tensors: ``qweight`` uint8 [out, in/2] (two codes per byte, even column in the high nibble),
``scale`` float16 and ``zero`` uint8 (0..15) [out, in/group]. The grid spans [min(w, 0), max(w, 0)] so that
0 is exactly representable: on all-MiniLM-L6-v2 that raised group-128 fidelity from 0.947 to 0.960 mean
cosine over a float group-minimum offset, and the one-byte zero-point stores 4.19 instead of 4.25 bits.
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import LayerSpec, TensorLayout, WeightFormat, pack_nibbles, unpack_nibbles

_MIN_SCALE = 2.0 ** -24  # smallest positive fp16: an all-zero group still divides safely


class Int4Grouped(WeightFormat):
    name = "int4"
    bits = 4
    grouped = True
    default_group_size = 128
    description = "int4, asymmetric, fp16 scale + integer zero-point per group"

    def layout(self, spec: LayerSpec) -> TensorLayout:
        n, k, g = spec.out_features, spec.in_features, spec.num_groups
        return {"qweight": ((n, k // 2), torch.uint8),
                "scale": ((n, g), torch.float16),
                "zero": ((n, g), torch.uint8)}

    def quantize(self, weight: torch.Tensor, spec: LayerSpec) -> Dict[str, torch.Tensor]:
        n, k, g = spec.out_features, spec.in_features, spec.num_groups
        w = weight.detach().float().reshape(n, g, k // g)
        wmin = w.amin(dim=-1).clamp(max=0.0)
        wmax = w.amax(dim=-1).clamp(min=0.0)
        # round the stored scale first, so codes are chosen against what dequantize will use
        scale = ((wmax - wmin) / 15.0).clamp_(min=_MIN_SCALE).half()
        s = scale.float()
        zero = torch.round(-wmin / s).clamp_(0, 15)
        q = (torch.round(w / s[..., None]) + zero[..., None]).clamp_(0, 15)
        return {"qweight": pack_nibbles(q.reshape(n, k)).contiguous(),
                "scale": scale.contiguous(), "zero": zero.to(torch.uint8).contiguous()}

    def dequantize(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = spec.out_features, spec.in_features, spec.num_groups
        q = unpack_nibbles(tensors["qweight"]).float().reshape(n, g, k // g)
        w = (q - tensors["zero"].float()[..., None]) * tensors["scale"].float()[..., None]
        return w.reshape(n, k).to(dtype)
