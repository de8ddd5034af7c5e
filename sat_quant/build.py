"""Quantize while the model is built: linear weights are born on the meta device, then each
layer is replaced by its quantized version and filled (from a checkpoint, or from a fresh random
init generated one layer at a time), so the full-precision model never exists in memory.

Reaches every ``nn.Linear``, ``ColumnParallelLinear`` and ``RowParallelLinear`` wherever it sits:
transformer layers, mixins (CogVLM's visual expert), nested SAT models (the EVA2-CLIP tower) and
plain ``nn.Linear`` (CogVLM's GLU adapter).
"""
from __future__ import annotations

import argparse
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from ._libc import libc
from .args import target_device, validate_quant_args
from .config import QuantConfig
from .errors import QuantConfigError
from .formats import LayerSpec
from .layers import QuantColumnParallelLinear, QuantLinear, QuantRowParallelLinear
from .report import QuantReport, quant_report

# Exact types: subclasses such as nn.MultiheadAttention's out_proj are read through .weight by their owner.
TARGET_TYPES = (nn.Linear, ColumnParallelLinear, RowParallelLinear)
DEFAULT_INIT_STD = 0.02  # SAT's default init_method_std (unscaled_init_method(0.02))


def is_target(module: nn.Module) -> bool:
    return type(module) in TARGET_TYPES


@contextmanager
def linear_weights_on_meta() -> Iterator[None]:
    """While active, the ``weight`` of every target linear is created on the meta device (no memory).

    Uses torch's global parameter-registration hook, so model code (SAT, CogVLM) runs unchanged;
    SAT's own init of those weights becomes a no-op, everything else is built as usual.
    """
    def to_meta(module, name, param):
        if name != "weight" or param is None or param.is_meta or not is_target(module):
            return None
        meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        meta.__dict__.update(param.__dict__)  # keep SAT's flags such as .model_parallel
        return meta

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


# formats with one scale per output row over all input columns (the 1-D ``row_scale``): a row-parallel shard
# would need the other ranks' columns to compute it
ROW_SCALED_FORMATS = ("int4c",)


@dataclass
class PlannedLayer:
    names: List[str]            # every path at which this module object is reachable
    module: nn.Module
    spec: Optional[LayerSpec]   # None: keep full precision


def plan_layers(model: nn.Module, config: QuantConfig) -> List[PlannedLayer]:
    """Decide every target layer's spec; all shape errors are raised together, before any weight is touched."""
    by_id: Dict[int, PlannedLayer] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_target(module):
            if id(module) in by_id:
                by_id[id(module)].names.append(name)
            else:
                by_id[id(module)] = PlannedLayer([name], module, None)
    errors = []
    for planned in by_id.values():
        out_features, in_features = planned.module.weight.shape
        try:
            planned.spec = config.spec_for(planned.names[0], out_features, in_features)
        except QuantConfigError as exc:
            message = str(exc)
            if isinstance(planned.module, RowParallelLinear) and in_features != planned.module.input_size:
                message += (f" [a row-parallel layer: this rank holds {in_features} of its {planned.module.input_size} "
                            f"input columns, and a group may not straddle two ranks; pick a group size that "
                            f"divides {in_features}]")
            errors.append(message)
            continue
        if (planned.spec is not None and planned.spec.format in ROW_SCALED_FORMATS
                and isinstance(planned.module, RowParallelLinear) and in_features != planned.module.input_size):
            errors.append(f"{planned.spec.format}: layer '{planned.names[0]}' is row-parallel at model-parallel size "
                          f"> 1, and {planned.spec.format}'s per-row scale spans every rank's columns, so shards "
                          f"could not be merged or resharded; use --quant-format int4 there (e.g. --quant-plan "
                          f"with '{planned.names[0]}': 'int4'), or model-parallel size 1.")
    if errors:
        raise QuantConfigError("cannot quantize this model as asked:\n  " + "\n  ".join(errors[:20]) +
                               (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    names = [n for p in by_id.values() for n in p.names]
    for pattern in config.unmatched_patterns(names):
        warnings.warn(f"--quant-skip/--quant-plan pattern '{pattern}' matches no linear layer; "
                      f"check the module names (e.g. `sat-quant inspect` or model.named_modules()).")
    return list(by_id.values())


def _quant_layer_for(module: nn.Module, spec: LayerSpec, backend: str, device: torch.device) -> QuantLinear:
    bias = module.bias is not None
    bias_dtype = module.bias.dtype if bias else module.weight.dtype
    common = dict(bias=bias, backend=backend, device=device, bias_dtype=bias_dtype)
    if isinstance(module, ColumnParallelLinear):
        layer = QuantColumnParallelLinear(spec, input_size=module.input_size, output_size=module.output_size,
                                          gather_output=module.gather_output, stride=module.stride, **common)
    elif isinstance(module, RowParallelLinear):
        layer = QuantRowParallelLinear(spec, input_size=module.input_size, output_size=module.output_size,
                                       input_is_parallel=module.input_is_parallel, final_bias=module.final_bias,
                                       **common)
    else:
        layer = QuantLinear(spec, **common)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(module.bias.detach())
        layer.bias.requires_grad_(module.bias.requires_grad)
    return layer


_TRIM_EVERY_BYTES = 16 * 2**20
_freed_since_trim = 0


def release_freed_memory(freed_bytes: int = _TRIM_EVERY_BYTES) -> None:
    """Return freed heap pages to the OS once 16 MB of freed bytes have piled up since the last trim.

    glibc keeps each layer's freed temporaries in its heap, which made the peak RSS of a quantized
    build 3-4x the quantized size (tests/test_memory.py); a trim costs ~1-3 ms, so it is batched.
    """
    global _freed_since_trim
    _freed_since_trim += freed_bytes
    if _freed_since_trim < _TRIM_EVERY_BYTES:
        return
    _freed_since_trim = 0
    trim = getattr(libc(), "malloc_trim", None)  # glibc only; elsewhere nothing to trim
    if trim is not None:
        trim(0)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: QuantConfig, *, device=None,
              init_std: Optional[float] = DEFAULT_INIT_STD) -> QuantReport:
    """Replace every target linear of ``model`` per ``config``, one layer at a time, in place.

    Works on a normal full-precision model (each float weight is freed as soon as it is quantized)
    and on one built under ``linear_weights_on_meta`` (meta weights get a fresh N(0, init_std)
    weight generated per layer, or zeros when ``init_std`` is None, i.e. a checkpoint will fill them).
    """
    config.validate()
    plans = plan_layers(model, config)
    fp_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta), torch.float32)
    for planned in plans:
        module = planned.module
        dev = torch.device(device) if device is not None else (
            module.bias.device if module.bias is not None else torch.device("cpu"))
        weight = module.weight
        if weight.is_meta and (init_std is not None or planned.spec is None):
            weight = torch.empty(weight.shape, dtype=torch.float32, device=dev)
            if init_std is None:
                weight.zero_()
            else:
                weight.normal_(0.0, init_std)
        if planned.spec is None:  # stays full precision; a meta weight must become real
            if module.weight.is_meta:  # assigned through _parameters: an active meta hook must not catch it
                module._parameters["weight"] = nn.Parameter(weight.to(fp_dtype),
                                                            requires_grad=module.weight.requires_grad)
            continue
        layer = _quant_layer_for(module, planned.spec, config.backend, dev)
        if not weight.is_meta:  # a meta weight with no init stays as the layer's zeros: a checkpoint fills it
            layer.quantize_weight_(weight)
        for name in planned.names:
            _set_submodule(model, name, layer)
        planned.module = None  # drop our reference so the float weight is freed now, not at the end
        if not weight.is_meta:
            release_freed_memory(4 * weight.numel())  # the float weight and its quantization temporaries
        del weight, module
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise RuntimeError(f"parameters still on the meta device after quantization: {leftovers[:5]}")
    return quant_report(model, full_precision_dtype=fp_dtype)


def _params_dtype(args: argparse.Namespace) -> torch.dtype:
    if getattr(args, "fp16", False):
        return torch.float16
    if getattr(args, "bf16", False):
        return torch.bfloat16
    return torch.float32


def get_model(args: argparse.Namespace, model_cls, **kwargs) -> nn.Module:
    """Drop-in for ``sat.model.base_model.get_model`` that honours ``--quant``.

    Same steps as SAT (build, ``.half()``/``.bfloat16()``, ``.to(device)``), except that with
    ``--quant`` the linear weights never exist in full precision: they are built on meta and
    quantized layer by layer. Without ``--quant`` it simply calls SAT's ``get_model``.
    """
    config = validate_quant_args(args)  # refuses bad flag combinations before anything is built
    if config is None:
        from sat.model.base_model import get_model as sat_get_model
        return sat_get_model(args, model_cls, **kwargs)
    return build_quantized(args, model_cls, config, **kwargs)


def build_quantized(args: argparse.Namespace, model_cls, config: QuantConfig, **kwargs) -> nn.Module:
    """Build ``model_cls(args)`` quantized per ``config`` (see ``get_model``)."""
    from sat.helpers import check_if_zero3, print_rank0
    if model_cls in _QUANTIZED_CLASSES.values():  # it quantizes itself inside SAT's own get_model
        from sat.model.base_model import get_model as sat_get_model
        return sat_get_model(args, model_cls, **kwargs)
    if check_if_zero3(args):
        raise QuantConfigError("--quant cannot be combined with ZeRO stage 3 (it partitions the float weights "
                               "sat_quant replaces); use --zero-stage 0/1/2.")
    params_dtype = kwargs.pop("params_dtype", _params_dtype(args))
    device = target_device(args)
    with linear_weights_on_meta():
        model = model_cls(args, params_dtype=params_dtype, **kwargs)
    report = _quantize_built(model, args, config, device)
    if getattr(args, "fp16", False):
        model.half()
    elif getattr(args, "bf16", False):
        model.bfloat16()
    model.to(device)
    print_rank0(f"sat_quant: {config.format} ({config.bits}-bit) model built\n{report.table()}")
    return model


def _quantize_built(model: nn.Module, args: argparse.Namespace, config: QuantConfig, device) -> QuantReport:
    """What follows a construction under ``linear_weights_on_meta``: quantize (or zero-fill for a checkpoint),
    attach QuantMixin, record the settings in args, and switch the CPU fallbacks on where the model runs on CPU."""
    init_std = None if getattr(args, "skip_init", False) else DEFAULT_INIT_STD
    model.quant_report = quantize_(model, config, device=device, init_std=init_std)
    attach_quant_mixin(model, config)
    record_in_args(args, model, config)
    from .lora import attach_lora_from_args  # a QLoRA checkpoint's adapters, for SAT's own from_pretrained/--load
    attach_lora_from_args(model, args)
    if target_device(args).type == "cpu":
        from .compat import apply_cpu_compat, install_xformers_cpu_fallback
        apply_cpu_compat(model)
        install_xformers_cpu_fallback()
    return model.quant_report


def record_in_args(args: argparse.Namespace, model: nn.Module, config: QuantConfig) -> None:
    """Write the effective settings back into args: SAT's save_checkpoint dumps them (QuantMixin declares
    the flags) into model_config.json, with the per-layer ``quantization`` block."""
    from .checkpoint import quantization_block
    args.quant, args.quant_format, args.quant_group_size = config.bits, config.format, config.group_size
    args.quant_skip, args.quant_backend = list(config.skip), config.backend
    args.quant_lm_head = config.quantize_lm_head
    args.quantization = quantization_block(model, config)


def attach_quant_mixin(model: nn.Module, config: QuantConfig) -> None:
    """Register QuantMixin so SAT's save_checkpoint records the quant flags in model_config.json."""
    from sat.model.base_model import BaseModel
    from .mixin import QuantMixin
    if isinstance(model, BaseModel) and "quant" not in model.mixins:
        model.add_mixin("quant", QuantMixin(config))


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
