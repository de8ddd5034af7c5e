"""The contract of a kernel backend: turn neutral tensors into a kernel layout and run x @ W^T.

A backend never changes what is saved: ``to_neutral`` gives back the exact neutral tensors. ``linear`` picks the path
per call: the backend's weight-only kernel, or for many rows the prefill path (dequantized tiles + dense GEMM,
:mod:`.prefill`) from the row count the backend declares for that layout and device.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar, Dict, Optional, Tuple

import torch

from ..formats import LayerSpec, WeightFormat
from .prefill import WeightTiles, gemm_dtype, rows_per_tile, tiled_linear

KernelTensors = Dict[str, torch.Tensor]


class Backend(ABC):
    name: ClassVar[str]
    #: (kernel layout, device type) → the row count (tokens in one call) from which ``linear`` takes the prefill
    #: path; absent: always the kernel. Measured per backend in benchmarks/RESULTS.md "Prefill".
    prefill_rows: ClassVar[Dict[Tuple[str, str], int]] = {}

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

    def cache_nbytes(self, fmt: WeightFormat, spec: LayerSpec, device: torch.device) -> int:
        """Bytes a layer's kernel tensors grow by once it has run with bf16 activations on ``device``: the copies
        derived on first use and kept (keys starting with '_'), beyond the neutral bytes. ``sat-quant estimate``
        adds them up as "kernel caches". Here: an input-scaled format's ``t`` in the activations' dtype."""
        return 2 * spec.in_features if fmt.input_scale_tensor is not None else 0

    def linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        """x [..., in] → x @ W^T [..., out] in x's dtype, without bias: the kernel, or the prefill path for many rows.

        A format with an ``input_scale_tensor`` (int4cs) has its activations multiplied by it here, once for every
        backend: kernels and tiles then run on the format's ``dequantize_core``."""
        if fmt.input_scale_tensor is not None:
            x = x * cached(kernel, f"_input_scale_{str(x.dtype)[6:]}", lambda: fmt.input_scale(kernel).to(x.dtype))
        if self.takes_prefill_path(x, fmt):
            dtype = gemm_dtype(x)
            return tiled_linear(x, spec.out_features, self.weight_tiles(fmt, spec, kernel, dtype), dtype)
        return self.kernel_linear(x, fmt, spec, kernel)

    def takes_prefill_path(self, x: torch.Tensor, fmt: WeightFormat) -> bool:
        threshold = self.prefill_rows.get((fmt.kernel_layout, x.device.type))
        return threshold is not None and x.numel() >= threshold * x.shape[-1]

    @abstractmethod
    def kernel_linear(self, x: torch.Tensor, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors) -> torch.Tensor:
        """x [..., in] → x @ W^T [..., out] in x's dtype, without bias, through this backend's kernel."""

    def weight_tiles(self, fmt: WeightFormat, spec: LayerSpec, kernel: KernelTensors, dtype: torch.dtype) -> WeightTiles:
        """The dense weight [out, in] in ``dtype``, a tile of output rows at a time, from the neutral tensors (every
        format's neutral tensors are row-major: row slices dequantize on their own). Backends whose kernel layout
        needs a costly ``to_neutral`` override this to dequantize straight from it."""
        neutral = self.to_neutral(fmt, spec, kernel)
        if fmt.input_scale_tensor is not None:  # per input column, not per row: dequantize_core does not read it
            neutral.pop(fmt.input_scale_tensor)
        step = rows_per_tile(spec.out_features, spec.padded_in_features, dtype)
        for start in range(0, spec.out_features, step):
            stop = min(start + step, spec.out_features)
            part = {name: t[start:stop] for name, t in neutral.items()}
            yield start, stop, fmt.dequantize_core(part, dataclasses.replace(spec, out_features=stop - start), dtype)


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
