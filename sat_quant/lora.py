"""LoRA adapters on quantized layers (QLoRA): the quantized base stays frozen, small A/B matrices train.

``add_lora_(model, ...)`` wraps the chosen QuantLinear layers; gradients reach earlier layers through the
quantized matmul (``layers._QuantMatmul``). ``merge_lora_`` folds ``B @ A * scale`` into the weight and
re-quantizes it (or keeps it in full precision), so the result saves and loads as a normal checkpoint.
Replaces SAT 0.4.12's ``LoraMixin(qlora=True)``, which is broken in that release.
"""
from __future__ import annotations

import fnmatch
import math
from typing import List, Sequence

import torch
from torch import nn

from .build import is_target
from .errors import QuantConfigError
from .layers import QuantLinear

DEFAULT_TARGETS = ("*.query_key_value", "*.attention.dense", "*.dense_h_to_4h", "*.dense_4h_to_h")


class LoraQuantLinear(nn.Module):
    """``base(x) + dropout(x) @ A^T @ B^T * alpha / r`` around a frozen QuantLinear (model-parallel size 1)."""

    def __init__(self, base: QuantLinear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        dtype = base.compute_dtype
        device = base._device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: the adapter starts as an exact no-op
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def add_lora_(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS,
              dropout: float = 0.0) -> List[str]:
    """Wrap every quantized layer whose name matches ``targets``; freeze everything else. Returns the names."""
    from sat import mpu
    if (torch.distributed.is_initialized() and mpu.model_parallel_is_initialized()
            and mpu.get_model_parallel_world_size() > 1):
        raise QuantConfigError("sat_quant LoRA supports model-parallel size 1 for now; run LoRA with "
                               "--model-parallel-size 1 (several GPUs can still be used with data parallelism).")
    names = [n for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in targets)
             and not isinstance(m, LoraQuantLinear)]
    skipped = [n for n in names if is_target(model.get_submodule(n))]  # a linear left in full precision
    if skipped:
        raise QuantConfigError(f"LoRA was asked on layers the quantization config keeps in full precision "
                               f"(e.g. {skipped[:3]}); drop them from the LoRA targets or from --quant-skip.")
    wrapped = [n for n in names if isinstance(model.get_submodule(n), QuantLinear)]
    if not wrapped:
        raise QuantConfigError(f"no quantized layer matches the LoRA targets {list(targets)}.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraQuantLinear(getattr(parent, child), rank, alpha, dropout))
    return wrapped


def merge_lora_(model: nn.Module, *, requantize: bool = True) -> int:
    """Fold every adapter into its base: re-quantized in the base's format, or a full-precision nn.Linear."""
    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraQuantLinear):
            continue
        base = module.base
        with torch.no_grad():
            weight = base.fmt.dequantize(base.neutral_tensors(), base.spec) + module.delta_weight()
            if requantize:
                base.quantize_weight_(weight)
                replacement: nn.Module = base
            else:
                replacement = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                        dtype=base.compute_dtype, device=base._device)
                replacement.weight.copy_(weight)
                if base.bias is not None:
                    replacement.bias.copy_(base.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        merged += 1
    return merged
