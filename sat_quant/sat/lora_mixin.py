"""``QuantLoraMixin``: LoRA on a quantized SAT model as a SAT mixin, and its flags.

``model.add_mixin("lora", QuantLoraMixin.from_args(args), reinit=True)`` wraps the quantized layers of each
transformer layer (the adapters themselves are :mod:`sat_quant.engine.lora`) and records the settings in
``args.quant_lora``, which SAT's ``save_checkpoint`` writes to model_config.json; loading rebuilds them. A drop-in
for SAT 0.4.12's ``LoraMixin(qlora=True)``, which is broken in that release.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence

from sat.model.base_model import BaseMixin
from torch import nn

from ..engine.lora import add_lora_, merge_lora_
from ..errors import QuantConfigError

#: what SAT's LoraMixin adapts in each transformer layer (relative to ``transformer.layers.<i>``)
MIXIN_TARGETS = ("attention.query_key_value", "attention.dense")


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

    wraps_quant_layers = True  # engine.lora.merge_lora_ removes a mixin so marked once its adapters are folded

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


__all__ = ["QuantLoraMixin", "add_lora_args", "attach_lora_from_args", "MIXIN_TARGETS"]
