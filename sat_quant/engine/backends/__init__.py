"""Kernel backends and the rule ``--quant-backend auto`` follows to pick one per layer."""
from __future__ import annotations

from typing import Dict

import torch

from ...errors import QuantBackendError, QuantConfigError
from ..formats import LayerSpec, WeightFormat
from .base import Backend, KernelTensors
from .bnb import BitsAndBytesBackend
from .lut_cpu import LutCpuBackend
from .reference import ReferenceBackend
from .torch_native import TorchNativeBackend

BACKENDS: Dict[str, Backend] = {b.name: b for b in (TorchNativeBackend(), LutCpuBackend(), BitsAndBytesBackend(),
                                                     ReferenceBackend())}
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise QuantConfigError(f"unknown backend '{name}'; --quant-backend takes one of {', '.join(BACKEND_CHOICES)}.") from None


def select_backend(requested: str, fmt: WeightFormat, spec: LayerSpec, device) -> Backend:
    """The backend for one layer: the requested one (error if it cannot run), or the first of the format's
    ``backend_order`` (fastest first, measured in benchmarks/RESULTS.md) that can; reference as the last resort."""
    device = torch.device(device)
    if requested != "auto":
        backend = get_backend(requested)
        reason = backend.unsupported_reason(fmt, spec, device)
        if reason:
            raise QuantBackendError(f"--quant-backend {requested} cannot run {fmt.name} on {device.type}: {reason}. "
                                    f"Use --quant-backend auto (or reference).")
        return backend
    for name in fmt.backend_order:
        if BACKENDS[name].unsupported_reason(fmt, spec, device) is None:
            return BACKENDS[name]
    return BACKENDS["reference"]


__all__ = ["Backend", "KernelTensors", "BACKENDS", "BACKEND_CHOICES", "get_backend", "select_backend"]
