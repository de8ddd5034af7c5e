"""bitsandbytes backend for nf4 / fp4 (CPU and CUDA): our neutral layout *is* bitsandbytes'
``quantize_4bit`` layout, so prepare only wraps it in a ``QuantState`` per activation dtype."""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import LayerSpec, WeightFormat
from .base import Backend, KernelTensors, pad_activation


class BitsAndBytesBackend(Backend):
    name = "bitsandbytes"
    # bitsandbytes' CPU matmul_4bit: dequantized tiles + a float32 GEMM win from 64 rows (benchmarks/RESULTS.md,
    # "Prefill", quiet 2-core AVX2 machine). On CUDA its kernels are left as they are.
    prefill_rows = {("codebook4", "cpu"): 64}

    def unsupported_reason(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> Optional[str]:
        if getattr(fmt, "bnb_quant_type", None) is None:
            return f"bitsandbytes has no kernel for {fmt.name} (it runs nf4/fp4)"
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # import errors vary by platform (missing CUDA libs, ...)
            return f"bitsandbytes is not importable: {exc}"
        if torch.device(device).type not in ("cpu", "cuda"):
            return f"bitsandbytes has no kernels for {device}"
        return None

    def _state(self, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors, dtype: torch.dtype):
        key = f"_state_{dtype}"
        state = kernel.get(key)
        if state is None:
            from bitsandbytes.functional import QuantState
            absmax = kernel["absmax"]
            state = QuantState(absmax=absmax.reshape(-1), shape=torch.Size([spec.out_features, spec.padded_in_features]),
                               code=fmt.table_tensor(absmax.device), blocksize=spec.group_size,
                               quant_type=fmt.bnb_quant_type, dtype=dtype)
            kernel[key] = state
        return state

    def kernel_linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        import bitsandbytes as bnb
        state = self._state(fmt, spec, kernel, x.dtype)
        packed = kernel["qweight"].reshape(-1, 1)
        return bnb.matmul_4bit(pad_activation(x, spec), packed.t(), quant_state=state)
