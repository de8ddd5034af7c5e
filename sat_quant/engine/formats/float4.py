"""nf4 / fp4: 4-bit codes indexing a 16-value table, scaled by the absmax of each block.

Same codes and tables as bitsandbytes (``quantize_4bit``), so its kernels read our neutral
layout without conversion: ``qweight`` uint8 [out, in/2] (even column in the high nibble),
``absmax`` float32 [out, in/block].
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .base import LayerSpec, TensorLayout, WeightFormat, pack_nibbles, pad_columns, register_format, unpack_nibbles

# The two 16-entry tables bitsandbytes uses (bitsandbytes.functional.get_4bit_type).
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
_CHUNK_ELEMENTS = 1 << 22  # weights quantized per step (16 MiB of fp32 temporaries)
FP4_TABLE = (0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
             -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25)


class _Table4Bit(WeightFormat):
    bits = 4
    grouped = True
    default_group_size = 64
    tensor_names = ("qweight", "absmax")
    kernel_layout = "codebook4"
    # sat_quant's AVX-512 CPU kernel first; it declines CUDA, odd blocks and CPUs it cannot build for
    backend_order = ("lut", "bitsandbytes", "reference")
    table: tuple
    #: bitsandbytes' name for the same table (its kernels read the neutral layout as is)
    bnb_quant_type: Optional[str] = None

    def table_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.table, dtype=torch.float32, device=device)

    def layout(self, spec: LayerSpec) -> TensorLayout:
        n, k, g = spec.out_features, spec.padded_in_features, spec.num_groups
        return {"qweight": ((n, k // 2), torch.uint8), "absmax": ((n, g), torch.float32)}

    def quantize(self, weight: torch.Tensor, spec: LayerSpec) -> Dict[str, torch.Tensor]:
        n, k, g = spec.out_features, spec.padded_in_features, spec.num_groups
        # nearest table entry: bucketize against midpoints of the sorted table
        values, order = torch.sort(self.table_tensor(weight.device))
        mids = (values[1:] + values[:-1]) / 2
        order = order.to(torch.uint8)
        qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
        absmax = torch.empty(n, g, dtype=torch.float32, device=weight.device)
        rows = max(1, _CHUNK_ELEMENTS // k)  # bounded fp32/int32 temporaries, whatever the layer's size
        for start in range(0, n, rows):
            # pad columns are 0: code of 0.0 in the table, and they change no block's absmax
            w = pad_columns(weight[start:start + rows].detach().float(), spec).reshape(-1, g, k // g)
            block_max = w.abs().amax(dim=-1)
            normed = w / torch.where(block_max > 0, block_max, torch.ones_like(block_max))[..., None]
            codes = order[torch.bucketize(normed, mids, out_int32=True)]
            qweight[start:start + rows] = pack_nibbles(codes.reshape(-1, k))
            absmax[start:start + rows] = block_max
        return {"qweight": qweight, "absmax": absmax}

    def dequantize(self, tensors: Dict[str, torch.Tensor], spec: LayerSpec,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = spec.out_features, spec.padded_in_features, spec.num_groups
        codes = unpack_nibbles(tensors["qweight"]).long()
        w = self.table_tensor(codes.device)[codes].reshape(n, g, k // g) * tensors["absmax"].float()[..., None]
        return w.reshape(n, k)[:, :spec.in_features].to(dtype)


@register_format
class NF4(_Table4Bit):
    name = "nf4"
    table = NF4_TABLE
    bnb_quant_type = "nf4"
    description = "4-bit NormalFloat (QLoRA), fp32 absmax per block"


@register_format
class FP4(_Table4Bit):
    name = "fp4"
    table = FP4_TABLE
    bnb_quant_type = "fp4"
    description = "4-bit float (bitsandbytes fp4), fp32 absmax per block"
