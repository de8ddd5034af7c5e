"""sat_quant's own CPU kernel for nf4 / fp4 and int4 (``kernels/lut4.py``, C++ in ``csrc/lut4_cpu.cpp``).

It reads the neutral layout as it is (bitsandbytes' packing and fp32 absmax), so for nf4/fp4 ``prepare`` and
``to_neutral`` are the identity: loading is no slower and saving after running is exact. int4 has the same nibble
packing; its codes run through the table 0..15 with the layer's uint8 zero points, and its fp16 scales are held
widened to fp32 (2 bytes more per group of 128: +1.5%; narrowed back exactly for saving). For int4, ``auto`` tries
torch's int4 kernel first (faster at decode shapes on a quiet CPU) and this one where torch's cannot run the shape.
Where this kernel cannot run (no compiler, no AVX-512, an odd block size) ``unsupported_reason`` says why and
``auto`` takes the next backend (bitsandbytes for nf4/fp4, the reference for int4).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import LayerSpec, WeightFormat
from ..kernels.lut4 import DEQUANT_ROWS
from .base import Backend, KernelTensors, cached, pad_activation
from .prefill import WeightTiles, rows_per_tile


class LutCpuBackend(Backend):
    name = "lut"
    # From 64 rows (lut4.DEQUANT_ROWS) tiles from the C++ dequantizer and a
    # dense GEMM: tiles reuse memory, a whole fresh weight page-faults (measured on a 2-core AVX512-BF16 CPU:
    # 4096x4096 to bf16 in 2.6 ms as 512-row tiles, 15 ms at once; benchmarks/RESULTS.md "Prefill").
    prefill_rows = {("codebook4", "cpu"): DEQUANT_ROWS, ("int4_affine", "cpu"): DEQUANT_ROWS}

    def unsupported_reason(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> Optional[str]:
        if fmt.kernel_layout == "int4_affine":
            if not _plain_int4(fmt, spec):
                return f"the lookup-table kernel runs int4's own layout (fp16 scale, uint8 zero), not {fmt.name}'s"
        elif fmt.kernel_layout != "codebook4":
            return f"the lookup-table kernel runs 4-bit codebook formats (nf4/fp4) and int4, not {fmt.name}"
        if torch.device(device).type != "cpu":
            return f"the lookup-table kernel runs on CPU only, not {torch.device(device).type}"
        from ..kernels import lut4
        return lut4.supports_shape(spec.padded_in_features, spec.group_size) or lut4.unavailable_reason()

    def prepare(self, fmt: WeightFormat, spec: LayerSpec, neutral: KernelTensors) -> KernelTensors:
        if fmt.kernel_layout != "int4_affine":
            return dict(neutral)
        return {"qweight": neutral["qweight"], "absmax": neutral["scale"].float(), "zero": neutral["zero"]}

    def to_neutral(self, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> KernelTensors:
        if fmt.kernel_layout != "int4_affine":
            return super().to_neutral(fmt, spec, kernel)
        return {"qweight": kernel["qweight"], "scale": kernel["absmax"].half(), "zero": kernel["zero"]}

    def cache_nbytes(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> int:
        """The 16-entry fp32 table each layer looks its codes up in."""
        return super().cache_nbytes(fmt, spec, device) + 16 * 4

    def kernel_linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        from ..kernels import lut4
        return lut4.linear(pad_activation(x, spec), kernel["qweight"], kernel["absmax"], _table(fmt, kernel),
                           spec.group_size, kernel.get("zero"))

    def weight_tiles(self, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors, dtype: torch.dtype) -> WeightTiles:
        """Row tiles dequantized by the C++ kernel straight from the tensors it holds (the same values as the
        format's own dequantize, bitwise; several times faster than torch ops)."""
        from ..kernels import lut4
        if lut4.unavailable_reason() is not None:  # only reached by tests on a CPU the kernel cannot run on
            yield from super().weight_tiles(fmt, spec, kernel, dtype)
            return
        table, zero = _table(fmt, kernel), kernel.get("zero")
        step = rows_per_tile(spec.out_features, spec.padded_in_features, dtype)
        for start in range(0, spec.out_features, step):
            stop = min(start + step, spec.out_features)
            tile = lut4.dequantize(kernel["qweight"][start:stop], kernel["absmax"][start:stop], table, spec.group_size,
                                   dtype, None if zero is None else zero[start:stop])
            yield start, stop, tile[:, :spec.in_features]


def _table(fmt: WeightFormat, kernel: KernelTensors) -> torch.Tensor:
    """The 16 values codes index: the format's table (nf4/fp4), or 0..15 for int4 (its zero points apart)."""
    if fmt.kernel_layout == "int4_affine":
        return cached(kernel, "_table", lambda: torch.arange(16, dtype=torch.float32))
    return cached(kernel, "_table", lambda: fmt.table_tensor())


def _plain_int4(fmt: WeightFormat, spec: LayerSpec) -> bool:
    """The int4 layout the kernel reads: nibble codes, an fp16 scale and a uint8 zero point per group."""
    layout = fmt.layout(spec)
    return set(layout) == {"qweight", "scale", "zero"} and layout["scale"][1] == torch.float16 and \
        layout["zero"][1] == torch.uint8
