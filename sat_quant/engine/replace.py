"""Layer replacement: find every linear layer, decide its format, and swap in a quantized layer one at a time.

Reaches every ``nn.Linear``, ``ColumnParallelLinear`` and ``RowParallelLinear`` wherever it sits: transformer
layers, mixins (CogVLM's visual expert), nested SAT models (the EVA2-CLIP tower) and plain ``nn.Linear`` (CogVLM's
GLU adapter). Also the two meta-device hooks that let a model be built without allocating what will be replaced.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from sat.mpu.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from .._libc import libc
from ..errors import QuantConfigError
from .config import QuantConfig
from .formats import LayerSpec, get_format
from .layers import QuantColumnParallelLinear, QuantLinear, QuantRowParallelLinear
from .report import QuantReport, quant_report

# Exact types: subclasses such as nn.MultiheadAttention's out_proj are read through .weight by their owner.
TARGET_TYPES = (nn.Linear, ColumnParallelLinear, RowParallelLinear)
DEFAULT_INIT_STD = 0.02  # SAT's default init_method_std (unscaled_init_method(0.02))


def is_target(module: nn.Module) -> bool:
    """True for the layers sat_quant quantizes (exact types, see ``TARGET_TYPES``)."""
    return type(module) in TARGET_TYPES


def _meta_parameter(param: nn.Parameter) -> nn.Parameter:
    meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    meta.__dict__.update(param.__dict__)  # keep SAT's flags such as .model_parallel
    return meta


@contextmanager
def linear_weights_on_meta() -> Iterator[None]:
    """While active, the ``weight`` of every target linear is created on the meta device (no memory).

    Uses torch's global parameter-registration hook, so model code (SAT, CogVLM) runs unchanged;
    SAT's own init of those weights becomes a no-op, everything else is built as usual.
    """
    def to_meta(module, name, param):
        if name != "weight" or param is None or param.is_meta or not is_target(module):
            return None
        return _meta_parameter(param)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def everything_on_meta() -> Iterator[None]:
    """Every parameter and buffer is created on the meta device while active (names and shapes only)."""
    def param_hook(module, name, param):
        return None if param is None or param.is_meta else _meta_parameter(param)

    def buffer_hook(module, name, buffer):
        return None if buffer is None or buffer.is_meta else buffer.to("meta")

    h1 = torch.nn.modules.module.register_module_parameter_registration_hook(param_hook)
    h2 = torch.nn.modules.module.register_module_buffer_registration_hook(buffer_hook)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def weight_to_meta_(module: nn.Module) -> None:
    """Swap a linear's float weight for a meta one (frees it; SAT's flags on the weight are kept)."""
    module._parameters["weight"] = _meta_parameter(module.weight)


@dataclass
class PlannedLayer:
    names: List[str]            # every path at which this module object is reachable
    module: nn.Module
    spec: Optional[LayerSpec]   # None: keep full precision


def _row_parallel_shard(module: nn.Module, in_features: int) -> bool:
    return isinstance(module, RowParallelLinear) and in_features != module.input_size


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
            if _row_parallel_shard(planned.module, in_features):
                message += (f" [a row-parallel layer: this rank holds {in_features} of its {planned.module.input_size} "
                            f"input columns, and a group may not straddle two ranks; pick a group size that "
                            f"divides {in_features}]")
            errors.append(message)
            continue
        if planned.spec is not None and planned.spec.padding and _row_parallel_shard(planned.module, in_features):
            g = planned.spec.group_size
            errors.append(f"{planned.spec.format}: in_features={in_features} for layer '{planned.names[0]}' is not "
                          f"divisible by group size {g} [a row-parallel layer: this rank holds {in_features} of its "
                          f"{planned.module.input_size} input columns, and a group may not straddle two ranks or be "
                          f"padded inside one; pick a group size that divides {in_features}]")
            continue
        fmt = None if planned.spec is None else get_format(planned.spec.format)
        if (fmt is not None and _row_parallel_shard(planned.module, in_features)
                and planned.spec.num_groups % fmt.row_shard_group_multiple):
            errors.append(f"{fmt.name}: layer '{planned.names[0]}' is row-parallel and this rank holds "
                          f"{planned.spec.num_groups} groups of its input columns; {fmt.name} needs a multiple of "
                          f"{fmt.row_shard_group_multiple} per rank (its layout packs that many groups together); "
                          f"pick a --quant-group-size that gives one (e.g. "
                          f"{planned.spec.group_size // fmt.row_shard_group_multiple}).")
    if errors:
        raise QuantConfigError("cannot quantize this model as asked:\n  " + "\n  ".join(errors[:20]) +
                               (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    names = [n for p in by_id.values() for n in p.names]
    for pattern in config.unmatched_patterns(names):
        warnings.warn(f"--quant-skip/--quant-plan pattern '{pattern}' matches no linear layer; "
                      f"check the module names (e.g. `sat-quant inspect` or model.named_modules()).", stacklevel=2)
    return list(by_id.values())


def quant_layer_for(module: nn.Module, spec: LayerSpec, backend: str, device: torch.device) -> QuantLinear:
    """The quantized layer that takes ``module``'s place (SAT's column/row-parallel semantics and bias kept); its
    weight is filled afterwards. On meta (``sat-quant convert``'s storage-free model) only shapes and dtypes exist."""
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
    build 3-4x the quantized size (tests/sat/test_memory.py); a trim costs ~1-3 ms, so it is batched.
    """
    global _freed_since_trim
    _freed_since_trim += freed_bytes
    if _freed_since_trim < _TRIM_EVERY_BYTES:
        return
    _freed_since_trim = 0
    trim = getattr(libc(), "malloc_trim", None)  # glibc only; elsewhere nothing to trim
    if trim is not None:
        trim(0)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.<name> = new`` for a dotted module name."""
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
        layer = quant_layer_for(module, planned.spec, config.backend, dev)
        if not weight.is_meta:  # a meta weight with no init stays as the layer's zeros: a checkpoint fills it
            layer.quantize_weight_(weight)
        for name in planned.names:
            set_submodule(model, name, layer)
        planned.module = None  # drop our reference so the float weight is freed now, not at the end
        if not weight.is_meta:
            release_freed_memory(4 * weight.numel())  # the float weight and its quantization temporaries
        del weight, module
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise RuntimeError(f"parameters still on the meta device after quantization: {leftovers[:5]}")
    return quant_report(model, full_precision_dtype=fp_dtype)


__all__ = ["TARGET_TYPES", "DEFAULT_INIT_STD", "PlannedLayer", "is_target", "linear_weights_on_meta",
           "everything_on_meta", "weight_to_meta_", "plan_layers", "quantize_", "release_freed_memory",
           "quant_layer_for", "set_submodule"]
