"""Reference backend: dequantize with the format's plain-torch code, then F.linear.

Runs everywhere and is the ground truth for every other backend; it rebuilds the full weight on
each call, so ``auto`` only picks it when no kernel exists for the format/shape/device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..formats import LayerSpec, WeightFormat
from .base import Backend, KernelTensors


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported_reason(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> Optional[str]:
        return None

    def kernel_linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        return F.linear(x, fmt.dequantize_core(self.to_neutral(fmt, spec, kernel), spec, dtype=x.dtype))
