"""Quantize while a SAT model is built: linear weights are born on the meta device, then each layer is replaced
by its quantized version and filled (from a checkpoint, or from a fresh random init generated one layer at a
time), so the full-precision model never exists in memory.

``get_model`` (drop-in for SAT's), ``build_quantized`` and ``quantized_class`` (a SAT model class that quantizes
itself, for SAT's own ``get_model``/``from_pretrained``/``training_main``). The layer replacement itself is
:mod:`sat_quant.engine.replace`; this module turns SAT's args into a QuantConfig and back.
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch
from sat.helpers import check_if_zero3, print_rank0
from sat.model.base_model import BaseModel
from sat.model.base_model import get_model as sat_get_model
from torch import nn

from ..engine.config import QuantConfig
from ..engine.replace import DEFAULT_INIT_STD, everything_on_meta, linear_weights_on_meta, quantize_
from ..engine.report import QuantReport, quant_report
from ..errors import QuantConfigError
from ..io.manifest import quantization_block
from .args import params_dtype, target_device, validate_quant_args
from .compat import apply_cpu_compat, install_xformers_cpu_fallback
from .lora_mixin import attach_lora_from_args
from .mixin import QuantMixin


def get_model(args: argparse.Namespace, model_cls, **kwargs) -> nn.Module:
    """Drop-in for ``sat.model.base_model.get_model`` that honours ``--quant``.

    Same steps as SAT (build, ``.half()``/``.bfloat16()``, ``.to(device)``), except that with
    ``--quant`` the linear weights never exist in full precision: they are built on meta and
    quantized layer by layer. Without ``--quant`` it simply calls SAT's ``get_model``.
    """
    config = validate_quant_args(args)  # refuses bad flag combinations before anything is built
    if config is None:
        return sat_get_model(args, model_cls, **kwargs)
    return build_quantized(args, model_cls, config, **kwargs)


def build_quantized(args: argparse.Namespace, model_cls, config: QuantConfig, **kwargs) -> nn.Module:
    """Build ``model_cls(args)`` quantized per ``config`` (see ``get_model``)."""
    if model_cls in _QUANTIZED_CLASSES.values():  # it quantizes itself inside SAT's own get_model
        return sat_get_model(args, model_cls, **kwargs)
    if check_if_zero3(args):
        raise QuantConfigError("--quant cannot be combined with ZeRO stage 3 (it partitions the float weights "
                               "sat_quant replaces); use --zero-stage 0/1/2.")
    dtype = kwargs.pop("params_dtype", params_dtype(args))
    device = target_device(args)
    with linear_weights_on_meta():
        model = model_cls(args, params_dtype=dtype, **kwargs)
    _quantize_built(model, args, config, device)
    if getattr(args, "fp16", False):
        model.half()
    elif getattr(args, "bf16", False):
        model.bfloat16()
    model.to(device)
    # priced after the cast: the full-precision rows in the dtype the model really holds (fp32 parts built by
    # model code, e.g. CogVLM's towers, become bf16/fp16 only now)
    model.quant_report = report = quant_report(model)
    print_rank0(f"sat_quant: {config.format} ({config.bits}-bit) model built\n{report.table()}")
    return model


def _quantize_built(model: nn.Module, args: argparse.Namespace, config: QuantConfig, device) -> QuantReport:
    """What follows a construction under ``linear_weights_on_meta``: quantize (or zero-fill for a checkpoint),
    attach QuantMixin, record the settings in args, and switch the CPU fallbacks on where the model runs on CPU."""
    init_std = None if getattr(args, "skip_init", False) else DEFAULT_INIT_STD
    model.quant_report = quantize_(model, config, device=device, init_std=init_std)
    attach_quant_mixin(model, config)
    record_in_args(args, model, config)
    attach_lora_from_args(model, args)  # a QLoRA checkpoint's adapters, for SAT's own from_pretrained/--load
    if target_device(args).type == "cpu":
        apply_cpu_compat(model)
        install_xformers_cpu_fallback()
    return model.quant_report


def record_in_args(args: argparse.Namespace, model: nn.Module, config: QuantConfig) -> None:
    """Write the effective settings back into args: SAT's save_checkpoint dumps them (QuantMixin declares
    the flags) into model_config.json, with the per-layer ``quantization`` block."""
    args.quant, args.quant_format, args.quant_group_size = config.bits, config.format, config.group_size
    args.quant_skip, args.quant_backend = list(config.skip), config.backend
    args.quant_lm_head = config.quantize_lm_head
    args.quantization = quantization_block(model, config)


def attach_quant_mixin(model: nn.Module, config: QuantConfig) -> None:
    """Register QuantMixin so SAT's save_checkpoint records the quant flags in model_config.json."""
    if isinstance(model, BaseModel) and "quant" not in model.mixins:
        model.add_mixin("quant", QuantMixin(config))


def build_on_meta(model_cls, args: argparse.Namespace, dtype: torch.dtype = torch.float16) -> nn.Module:
    """``model_cls(args)`` with no memory: every tensor on meta, floating ones cast to ``dtype`` (as SAT's .half())."""
    with everything_on_meta():
        model = model_cls(args, params_dtype=dtype)
    return model.to(dtype)


def build_with_meta_linears(model_cls, args: argparse.Namespace) -> nn.Module:
    """``model_cls(args)`` in the args' dtype with every target linear's weight on meta (to read shapes and names
    while the weights stream from a checkpoint, e.g. for planning)."""
    with linear_weights_on_meta():
        return model_cls(args, params_dtype=params_dtype(args))


_QUANTIZED_CLASSES: Dict[type, type] = {}


def quantized_class(model_cls: type) -> type:
    """A subclass of a SAT model class that builds itself quantized when its args ask for it.

    Lets SAT's own entry points produce quantized models unchanged: ``get_model(args, cls)``,
    ``cls.from_pretrained(path)`` (SAT reads the ``quantization`` block of model_config.json into
    args) and ``training_main(args, model_cls=cls)``. Without ``--quant`` (or a block) it builds the
    plain model. Registered in SAT's model registry as ``Quantized<Name>``.
    """
    if model_cls in _QUANTIZED_CLASSES:
        return _QUANTIZED_CLASSES[model_cls]

    def __init__(self, args, *rest, **kwargs):
        config = validate_quant_args(args)
        if config is None:
            model_cls.__init__(self, args, *rest, **kwargs)
            return
        with linear_weights_on_meta():
            model_cls.__init__(self, args, *rest, **kwargs)
        _quantize_built(self, args, config, device="cpu")  # SAT's get_model moves it to args.device after

    cls = type(model_cls)(f"Quantized{model_cls.__name__}", (model_cls,),
                          {"__init__": __init__, "__module__": __name__, "__doc__": quantized_class.__doc__})
    _QUANTIZED_CLASSES[model_cls] = cls
    return cls


__all__ = ["get_model", "build_quantized", "quantized_class", "record_in_args", "attach_quant_mixin", "build_on_meta",
           "build_with_meta_linears"]
