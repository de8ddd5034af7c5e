"""LoRA adapters on quantized layers (QLoRA): the quantized base stays frozen, small A/B matrices train.

``add_lora_(model, ...)`` wraps the chosen QuantLinear layers; gradients reach earlier layers through the
quantized matmul (``layers._QuantMatmul``). ``merge_lora_`` folds ``B @ A * scale`` into the weight and
re-quantizes it (or keeps it in full precision), so the result saves and loads as a normal checkpoint.
The SAT mixin that applies them from flags (``QuantLoraMixin``) lives in :mod:`sat_quant.sat.lora_mixin`.

Model parallel: a column-parallel layer keeps A whole (replicated) and B split by output rows; a row-parallel
layer splits A by input columns and keeps B whole. The low-rank activation ``x @ A^T`` is the only thing that
crosses ranks: copied into the region for a column layer (its gradient is all-reduced, so A gets the full
gradient on every rank) and all-reduced for a row layer, after which ``B`` is applied once on the reduced
output, so the update is added once and B's gradient is complete on every rank.
"""
from __future__ import annotations

import fnmatch
import math
from typing import List, Sequence

import torch
from torch import nn

from ..errors import QuantConfigError
from .layers import QuantColumnParallelLinear, QuantLinear, QuantRowParallelLinear
from .replace import is_target, set_submodule

DEFAULT_TARGETS = ("*.query_key_value", "*.attention.dense", "*.dense_h_to_4h", "*.dense_4h_to_h")
LORA_PARAMS = ("lora_A", "lora_B")


def _model_parallel_size() -> int:
    from sat import mpu
    if torch.distributed.is_initialized() and mpu.model_parallel_is_initialized():
        return mpu.get_model_parallel_world_size()
    return 1


class LoraQuantLinear(nn.Module):
    """``base(x) + dropout(x) @ A^T @ B^T * alpha / r`` around a frozen QuantLinear (any model-parallel size).

    A is [r, local in_features] and B [local out_features, r], i.e. the base's own partition: a column layer's
    A is replicated (its local in_features are all of them), a row layer's B is replicated.
    """

    def __init__(self, base: QuantLinear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise QuantConfigError(f"LoRA rank must be positive, got {rank} (--lora_rank).")
        if dropout > 0 and isinstance(base, QuantColumnParallelLinear) and _model_parallel_size() > 1:
            raise QuantConfigError("--lora_dropout > 0 is not supported with --model-parallel-size > 1: each rank "
                                   "would drop different inputs of the replicated A. Use --lora_dropout 0.")
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype, device = base.compute_dtype, base._device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: the adapter starts as an exact no-op
        # SAT's parameter sync and our resharding read this: which adapter matrix is split across ranks
        self.lora_A.model_parallel = isinstance(base, QuantRowParallelLinear)
        self.lora_B.model_parallel = isinstance(base, QuantColumnParallelLinear)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) @ self.lora_A.t().to(x.dtype)

    def _up(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.lora_B.t().to(h.dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sat.mpu.mappings import (
            copy_to_model_parallel_region,
            gather_from_model_parallel_region,
            reduce_from_model_parallel_region,
            scatter_to_model_parallel_region,
        )
        base = self.base
        if isinstance(base, QuantColumnParallelLinear):
            y = base.forward_partition(x) + self._up(copy_to_model_parallel_region(self._down(x)))
            return gather_from_model_parallel_region(y) if base.gather_output else y
        if isinstance(base, QuantRowParallelLinear):
            x_local = x if base.input_is_parallel else scatter_to_model_parallel_region(x)
            return base.forward_partition(x_local) + self._up(reduce_from_model_parallel_region(self._down(x_local)))
        return base(x) + self._up(self._down(x))

    def delta_weight(self) -> torch.Tensor:
        """This rank's part of ``B @ A * scale`` (the same partition as the base's weight)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a checkpoint without adapters (quantized or full precision) names the base's tensors without ".base."
        own = set(LORA_PARAMS)
        for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
            local = key[len(prefix):]
            if local not in own and prefix + "base." + local not in state_dict:
                state_dict[prefix + "base." + local] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def add_lora_(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS,
              dropout: float = 0.0, *, freeze: bool = True) -> List[str]:
    """Wrap every quantized layer whose name matches ``targets``; freeze everything else. Returns the names."""
    names = [n for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in targets)
             and not isinstance(m, LoraQuantLinear)]
    skipped = [n for n in names if is_target(model.get_submodule(n))]  # a linear left in full precision
    meta = [n for n in skipped if model.get_submodule(n).weight.is_meta]
    if meta:
        raise QuantConfigError(f"LoRA was asked on layers that are not built yet (e.g. {meta[:3]}: weights on the "
                               f"meta device). Add the LoRA mixin after the model is built and quantized, e.g. after "
                               f"get_model/from_pretrained, not inside the model's __init__.")
    if skipped:
        raise QuantConfigError(f"LoRA was asked on layers the quantization config keeps in full precision "
                               f"(e.g. {skipped[:3]}); drop them from the LoRA targets or from --quant-skip.")
    wrapped = [n for n in names if isinstance(model.get_submodule(n), QuantLinear)]
    if not wrapped:
        raise QuantConfigError(f"no quantized layer matches the LoRA targets {list(targets)}; build the model "
                               f"with --quant 4|8 first and check the names (model.named_modules()).")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in wrapped:
        set_submodule(model, name, LoraQuantLinear(model.get_submodule(name), rank, alpha, dropout))
    return wrapped


def merge_lora_(model: nn.Module, *, requantize: bool = True) -> int:
    """Fold every adapter into its base: re-quantized in the base's format, or a full-precision layer.

    Works per rank under model parallelism (each rank folds its own partition; per-row int8 scales of a
    row-parallel layer are agreed across ranks by ``quantize_weight_``), so every rank must call it.
    """
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
                replacement = _full_precision_like(base, weight)
        set_submodule(model, name, replacement)
        merged += 1
    mixins = getattr(model, "mixins", None)
    # the SAT mixin that made the adapters (sat_quant.sat.lora_mixin) marks itself: a save must not record it now
    if mixins is not None and "lora" in mixins and getattr(mixins["lora"], "wraps_quant_layers", False):
        model.del_mixin("lora")
    return merged


def _full_precision_like(base: QuantLinear, weight: torch.Tensor) -> nn.Module:
    """A SAT/torch layer of the base's kind holding ``weight`` (this rank's partition)."""
    from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear
    bias, dtype, device = base.bias is not None, base.compute_dtype, base._device
    if isinstance(base, QuantColumnParallelLinear):
        layer = ColumnParallelLinear(base.input_size, base.output_size, bias=bias, gather_output=base.gather_output,
                                     skip_init=True, stride=base.stride, params_dtype=dtype, device=device)
    elif isinstance(base, QuantRowParallelLinear):
        layer = RowParallelLinear(base.input_size, base.output_size, bias=bias, input_is_parallel=base.input_is_parallel,
                                  skip_init=True, params_dtype=dtype, device=device, final_bias=base.final_bias)
    else:
        layer = nn.Linear(base.in_features, base.out_features, bias=bias, dtype=dtype, device=device)
    layer.weight.data.copy_(weight)
    if bias:
        layer.bias.data.copy_(base.bias)
    return layer


__all__ = ["LoraQuantLinear", "add_lora_", "merge_lora_", "DEFAULT_TARGETS", "LORA_PARAMS"]
