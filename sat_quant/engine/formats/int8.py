"""int8 per-output-channel symmetric: q = round(w / s), s = absmax(row) / 127.

Neutral tensors: ``qweight`` int8 [out, in], ``scale`` float32 [out]. This is exactly what
``torch.ops.aten._weight_int8pack_mm`` consumes, so no repack is needed on CPU.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .base import LayerSpec, Reduce, TensorLayout, WeightFormat, register_format


@register_format
class Int8PerChannel(WeightFormat):
    name = "int8"
    bits = 8
    description = "int8, symmetric, one fp32 scale per output channel"
    tensor_names = ("qweight", "scale")
    default_for_bits = True
    kernel_layout = "int8_rowwise"
    backend_order = ("torch", "reference")
    per_row_tensors = ("scale",)

    def layout(self, spec: LayerSpec) -> TensorLayout:
        return {"qweight": ((spec.out_features, spec.in_features), torch.int8),
                "scale": ((spec.out_features,), torch.float32)}

    def quantize(self, weight: torch.Tensor, spec: LayerSpec,
                 row_absmax: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``row_absmax`` overrides the rows' absmax: a row-parallel shard passes the whole row's."""
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) if row_absmax is None else row_absmax.float()) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero row: any scale reproduces it
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q.contiguous(), "scale": scale.contiguous()}

    def shard_statistics(self, weight: torch.Tensor, spec: LayerSpec, *, sharded: str,
                         reduce: Reduce) -> Dict[str, torch.Tensor]:
        """A row-parallel shard's scale is the whole row's absmax (the max over ranks)."""
        if sharded != "columns":
            return {}
        return {"row_absmax": reduce(weight.detach().float().abs().amax(dim=1), "max")}

    def dequantize(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (tensors["qweight"].float() * tensors["scale"].float()[:, None]).to(dtype)
