"""Kernel backends and the rule ``--quant-backend auto`` follows to pick one per layer."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..errors import QuantBackendError, QuantConfigError
from ..formats import LayerSpec, WeightFormat
from .base import Backend, KernelTensors
from .bnb import BitsAndBytesBackend
from .lut_cpu import LutCpuBackend
from .reference import ReferenceBackend
from .torch_native import TorchNativeBackend

BACKENDS: Dict[str, Backend] = {b.name: b for b in (TorchNativeBackend(), LutCpuBackend(), BitsAndBytesBackend(),
                                                     ReferenceBackend())}
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)
# Fastest first, measured on CPU (benchmarks/RESULTS.md); the reference path is the last resort. For nf4/fp4,
# "lut" (sat_quant's compiled CPU kernel) declines CUDA, odd block sizes and machines where it cannot be built
# or run (the reason is logged), and bitsandbytes takes over.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "int8": ("torch", "reference"),
    "int4": ("torch", "reference"),
    "int4c": ("torch", "reference"),
    "nf4": ("lut", "bitsandbytes", "reference"),
    "fp4": ("lut", "bitsandbytes", "reference"),
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise QuantConfigError(f"unknown backend '{name}'; --quant-backend takes one of {', '.join(BACKEND_CHOICES)}.") from None


def select_backend(requested: str, fmt: WeightFormat, spec: LayerSpec, device) -> Backend:
    """The backend for one layer: the requested one (error if it cannot run), or the fastest that can."""
    device = torch.device(device)
    if requested != "auto":
        backend = get_backend(requested)
        reason = backend.unsupported_reason(fmt, spec, device)
        if reason:
            raise QuantBackendError(f"--quant-backend {requested} cannot run {fmt.name} on {device.type}: {reason}. "
                                    f"Use --quant-backend auto (or reference).")
        return backend
    for name in AUTO_ORDER.get(fmt.name, ("reference",)):
        if BACKENDS[name].unsupported_reason(fmt, spec, device) is None:
            return BACKENDS[name]
    return BACKENDS["reference"]


def backend_names() -> List[str]:
    return list(BACKEND_CHOICES)


__all__ = ["Backend", "KernelTensors", "BACKENDS", "BACKEND_CHOICES", "get_backend", "select_backend", "backend_names"]
