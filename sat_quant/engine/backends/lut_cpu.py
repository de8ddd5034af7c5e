"""sat_quant's own CPU kernel for nf4 / fp4 and int4 (``kernels/lut4.py``, C++ in ``csrc/lut4_cpu.cpp``).

It reads the neutral layout as it is (bitsandbytes' packing and fp32 absmax), so for nf4/fp4 ``prepare`` and
``to_neutral`` are the identity: loading is no slower and saving after running is exact. int4 has the same nibble
packing; its codes run through the table 0..15 with the layer's uint8 zero points, and its fp16 scales are held
widened to fp32 (2 bytes more per group of 128: +1.5%; narrowed back exactly for saving). Where the kernel cannot
run (no compiler, no AVX-512, an odd block size) ``unsupported_reason`` says why and ``auto`` takes the next backend
(bitsandbytes for nf4/fp4, torch for int4).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import LayerSpec, WeightFormat
from .base import Backend, KernelTensors, cached, pad_activation


class LutCpuBackend(Backend):
    name = "lut"
    # Set high on purpose: the kernel needs AVX-512 and no such machine measured the crossover yet (benchmarks/RESULTS.md
    # "Prefill" says where it was measured); at batch 16 it runs at 2.7x bf16 dense.
    prefill_rows = {("codebook4", "cpu"): 512, ("int4_affine", "cpu"): 512}

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

    def kernel_linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        from ..kernels import lut4
        if fmt.kernel_layout == "int4_affine":
            table = cached(kernel, "_table", lambda: torch.arange(16, dtype=torch.float32))
            return lut4.linear(pad_activation(x, spec), kernel["qweight"], kernel["absmax"], table, spec.group_size,
                               kernel["zero"])
        table = cached(kernel, "_table", lambda: fmt.table_tensor())
        return lut4.linear(pad_activation(x, spec), kernel["qweight"], kernel["absmax"], table, spec.group_size)


def _plain_int4(fmt: WeightFormat, spec: LayerSpec) -> bool:
    """The int4 layout the kernel reads: nibble codes, an fp16 scale and a uint8 zero point per group."""
    layout = fmt.layout(spec)
    return set(layout) == {"qweight", "scale", "zero"} and layout["scale"][1] == torch.float16 and \
        layout["zero"][1] == torch.uint8
