"""The contract of a kernel backend: turn neutral tensors into a kernel layout and run x @ W^T.

A backend never changes what is saved: ``to_neutral`` gives back the exact neutral tensors.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Dict, Optional

import torch

from ..formats import LayerSpec, WeightFormat

KernelTensors = Dict[str, torch.Tensor]


class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def unsupported_reason(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> Optional[str]:
        """None when this backend can run ``fmt`` at this shape on ``device``, else why not (for error messages)."""

    def prepare(self, fmt: WeightFormat, spec: LayerSpec, neutral: KernelTensors) -> KernelTensors:
        """Neutral tensors → this backend's in-memory layout (default: unchanged)."""
        return dict(neutral)

    def zeros(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> KernelTensors:
        """Kernel tensors of an all-zero weight: what a layer holds until a checkpoint fills it."""
        return self.prepare(fmt, spec, {name: torch.zeros(shape, dtype=dtype, device=device)
                                        for name, (shape, dtype) in fmt.layout(spec).items()})

    def to_neutral(self, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> KernelTensors:
        """Inverse of prepare, exact; derived per-dtype caches (keys starting with '_') are dropped."""
        return {k: v for k, v in kernel.items() if not k.startswith("_")}

    @abstractmethod
    def linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        """x [..., in] → x @ W^T [..., out] in x's dtype, without bias."""


def pad_activation(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """x [..., in] → [..., padded_in_features] with zero columns, for kernels that read whole groups: the stored
    weight's pad columns then meet zeros and add nothing (docs/FORMAT.md, "Ragged input sizes")."""
    return torch.nn.functional.pad(x, (0, spec.padding)) if spec.padding else x


def cached(kernel: KernelTensors, key: str, make) -> torch.Tensor:
    """Per-activation-dtype derived tensors (scales cast to bf16, ...) are built once and kept in the kernel dict."""
    t = kernel.get(key)
    if t is None:
        t = make()
        kernel[key] = t
    return t
