"""LoRA adapters on quantized layers (QLoRA): the quantized base stays frozen, small A/B matrices train.

``add_lora_(model, ...)`` wraps the chosen QuantLinear layers; gradients reach earlier layers through the
quantized matmul (``layers._QuantMatmul``). ``merge_lora_`` folds ``B @ A * scale`` into the weight and
re-quantizes it (or keeps it in full precision), so the result saves and loads as a normal checkpoint.
``QuantLoraMixin`` is the same thing as a SAT mixin (``model.add_mixin("lora", ..., reinit=True)``), a
drop-in for SAT 0.4.12's ``LoraMixin(qlora=True)``, which is broken in that release.

Model parallel: a column-parallel layer keeps A whole (replicated) and B split by output rows; a row-parallel
layer splits A by input columns and keeps B whole. The low-rank activation ``x @ A^T`` is the only thing that
crosses ranks: copied into the region for a column layer (its gradient is all-reduced, so A gets the full
gradient on every rank) and all-reduced for a row layer, after which ``B`` is applied once on the reduced
output, so the update is added once and B's gradient is complete on every rank.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from sat.model.base_model import BaseMixin
from torch import nn

from .build import is_target
from .errors import QuantConfigError
from .layers import QuantColumnParallelLinear, QuantLinear, QuantRowParallelLinear

DEFAULT_TARGETS = ("*.query_key_value", "*.attention.dense", "*.dense_h_to_4h", "*.dense_4h_to_h")
#: what SAT's LoraMixin adapts in each transformer layer (relative to ``transformer.layers.<i>``)
MIXIN_TARGETS = ("attention.query_key_value", "attention.dense")
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
        from sat.mpu.mappings import (copy_to_model_parallel_region, gather_from_model_parallel_region,
                                      reduce_from_model_parallel_region, scatter_to_model_parallel_region)
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
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraQuantLinear(getattr(parent, child), rank, alpha, dropout))
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
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        merged += 1
    mixins = getattr(model, "mixins", None)
    if mixins is not None and "lora" in mixins and isinstance(mixins["lora"], QuantLoraMixin):
        model.del_mixin("lora")  # its adapters are gone; a save must not record them
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


# -- SAT mixin ---------------------------------------------------------------------------------------

def add_lora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--lora_rank`` and friends; options the parser already has (CogVLM defines --lora_rank,
    --layer_range) are kept as they are. ``--quant_lora`` is not typed by users: it is the record of the
    adapters a checkpoint holds, which SAT's save_checkpoint dumps into model_config.json."""
    existing = set(parser._option_string_actions)

    def add(flag, **kw):
        if flag not in existing:
            parser.add_argument(flag, **kw)

    add("--lora_rank", type=int, default=10, help="LoRA rank (sat_quant QuantLoraMixin)")
    add("--lora_alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/rank "
                                                        "(default: alpha = rank, scale 1)")
    add("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA input")
    add("--layer_range", type=int, nargs="+", default=None, help="transformer layers to adapt (default: all)")
    add("--lora_targets", type=str, nargs="+", default=list(MIXIN_TARGETS),
        help="module names inside each transformer layer to adapt (globs)")
    add("--quant_lora", type=json.loads, default=None, help=argparse.SUPPRESS)
    return parser


class QuantLoraMixin(BaseMixin):
    """LoRA on the quantized layers of ``transformer.layers[i]`` for i in ``layer_range`` (all by default).

    ``model.add_mixin("lora", QuantLoraMixin.from_args(args), reinit=True)`` wraps the layers (as SAT's
    LoraMixin does in ``reinit``) and records the settings in ``args.quant_lora``; SAT's save_checkpoint then
    writes them into model_config.json, and ``sat_quant.from_pretrained`` rebuilds the adapters from them.
    """

    def __init__(self, rank: int = 10, alpha: Optional[float] = None, dropout: float = 0.0,
                 layer_range: Optional[Sequence[int]] = None, targets: Sequence[str] = MIXIN_TARGETS,
                 freeze: bool = True) -> None:
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.dropout = float(dropout)
        self.layer_range = None if layer_range is None else [int(i) for i in layer_range]
        self.targets, self.freeze = list(targets), freeze
        self.wrapped: List[str] = []

    @classmethod
    def add_model_specific_args(cls, parser):
        return add_lora_args(parser)

    def settings(self) -> Dict[str, Any]:
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout, layer_range=self.layer_range,
                    targets=self.targets)

    @classmethod
    def from_settings(cls, settings: Dict[str, Any], **kwargs) -> "QuantLoraMixin":
        try:
            return cls(**settings, **kwargs)
        except TypeError as exc:
            raise QuantConfigError(f"malformed quant_lora settings {settings!r} ({exc}).") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **kwargs) -> "QuantLoraMixin":
        """From ``--lora_rank/--lora_alpha/--lora_dropout/--layer_range/--lora_targets``; records the settings
        in ``args.quant_lora`` so SAT's save_checkpoint persists them."""
        mixin = cls(rank=getattr(args, "lora_rank", 10), alpha=getattr(args, "lora_alpha", None),
                    dropout=getattr(args, "lora_dropout", 0.0) or 0.0, layer_range=getattr(args, "layer_range", None),
                    targets=getattr(args, "lora_targets", None) or MIXIN_TARGETS, **kwargs)
        mixin.record_in_args(args)
        return mixin

    def record_in_args(self, args: argparse.Namespace) -> None:
        args.quant_lora = self.settings()
        args.lora_rank, args.lora_alpha, args.lora_dropout = self.rank, self.alpha, self.dropout
        args.layer_range, args.lora_targets = self.layer_range, self.targets

    def _globs(self, parent_model: nn.Module) -> List[str]:
        layers = getattr(getattr(parent_model, "transformer", None), "layers", None)
        if layers is None:
            raise QuantConfigError("QuantLoraMixin needs a SAT model with transformer.layers.")
        wanted = range(len(layers)) if self.layer_range is None else self.layer_range
        bad = [i for i in wanted if not 0 <= i < len(layers)]
        if bad:
            raise QuantConfigError(f"--layer_range {bad} is outside the model's {len(layers)} layers "
                                   f"(0..{len(layers) - 1}).")
        return [f"transformer.layers.{i}.{t}" for i in wanted for t in self.targets]

    def reinit(self, parent_model=None) -> None:
        if self.wrapped:  # SAT calls reinit again for mixins whose keys a checkpoint lacks: wrap once
            return
        self.wrapped = add_lora_(parent_model, self.rank, self.alpha, self._globs(parent_model), self.dropout,
                                 freeze=self.freeze)

    def merge_lora(self, requantize: bool = True, args: Optional[argparse.Namespace] = None) -> int:
        """Fold the adapters into the base (SAT LoraMixin's method name, for scripts that call it).

        Pass ``args`` to clear ``args.quant_lora``, so a checkpoint saved afterwards loads without adapters."""
        merged = merge_lora_(self.transformer, requantize=requantize)
        self.wrapped = []
        if args is not None:
            args.quant_lora = None
        return merged


def attach_lora_from_args(model: nn.Module, args: argparse.Namespace) -> Optional[QuantLoraMixin]:
    """Rebuild the adapters a checkpoint's model_config.json records (``quant_lora``) on a freshly built model."""
    settings = getattr(args, "quant_lora", None)
    if not settings:
        return None
    if not isinstance(settings, dict):
        raise QuantConfigError(f"quant_lora in model_config.json must be a JSON object, got {settings!r}.")
    mixin = QuantLoraMixin.from_settings(settings)
    if hasattr(model, "add_mixin"):
        if "lora" in model.mixins:
            existing = model.mixins["lora"]
            if isinstance(existing, QuantLoraMixin) and existing.settings() == mixin.settings():
                return existing  # already rebuilt (e.g. by the model's own construction)
            raise QuantConfigError("the model already has a different 'lora' mixin; cannot rebuild the checkpoint's "
                                   "adapters (quant_lora in model_config.json) next to it.")
        model.add_mixin("lora", mixin, reinit=True)
    else:
        mixin.reinit(model)
    return mixin


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter tensors (``...lora_A``/``...lora_B``), e.g. to ship adapters without the base."""
    return {n: p.detach() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in LORA_PARAMS}


__all__ = ["LoraQuantLinear", "QuantLoraMixin", "add_lora_", "merge_lora_", "add_lora_args",
           "attach_lora_from_args", "lora_state_dict", "DEFAULT_TARGETS", "MIXIN_TARGETS"]
