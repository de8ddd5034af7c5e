"""sat_quant's own CPU kernel for nf4 / fp4 (``kernels/lut4.py``, C++ in ``csrc/lut4_cpu.cpp``).

It reads the neutral layout as it is (bitsandbytes' packing and fp32 absmax), so ``prepare`` and ``to_neutral``
are the identity: loading is no slower and saving after running is exact. Where the kernel cannot run (no
compiler, no AVX-512, an odd block size) ``unsupported_reason`` says why and ``auto`` takes bitsandbytes.
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
    prefill_rows = {("codebook4", "cpu"): 512}

    def unsupported_reason(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> Optional[str]:
        if fmt.kernel_layout != "codebook4":
            return f"the lookup-table kernel runs 4-bit codebook formats (nf4/fp4), not {fmt.name}"
        if torch.device(device).type != "cpu":
            return f"the lookup-table kernel runs on CPU only, not {torch.device(device).type}"
        from ..kernels import lut4
        return lut4.supports_shape(spec.padded_in_features, spec.group_size) or lut4.unavailable_reason()

    def kernel_linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        from ..kernels import lut4
        table = cached(kernel, "_table", lambda: fmt.table_tensor())
        return lut4.linear(pad_activation(x, spec), kernel["qweight"], kernel["absmax"], table, spec.group_size)
