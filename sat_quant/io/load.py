"""Filling a built model from a checkpoint: every name, shape and dtype checked first, then one module at a time.

Full-precision ``weight`` tensors arriving for a quantized layer are quantized as they arrive, so a full-precision
checkpoint loads into a quantized model without a full-precision copy. On any failure nothing half-filled is
returned to the caller (the sat layer drops the model).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from ..engine.layers import QuantLinear
from ..engine.replace import release_freed_memory
from ..errors import CheckpointError
from .manifest import STUB_KEY
from .save import saved_tensors
from .tensorfile import TensorSource


def expected_layout(model: nn.Module) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor a checkpoint of this model must hold."""
    out: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
    for prefix, module in model.named_modules():
        pre = prefix + "." if prefix else ""
        out.update({pre + n: (tuple(t.shape), t.dtype) for n, t in saved_tensors(module)})
        if isinstance(module, QuantLinear):
            out.update({pre + n: (tuple(shape), dtype) for n, (shape, dtype) in module.fmt.layout(module.spec).items()})
    return out


def load_into(model: nn.Module, source: TensorSource, *, strict: bool = True) -> None:
    """Fill ``model`` from ``source``: check every name/shape/dtype first, then copy one module at a time.

    Full-precision ``weight`` tensors arriving for a quantized layer are quantized as they arrive.
    """
    check_fits(model, source, strict=strict)
    fill(model, source)


def check_fits(model: nn.Module, source: TensorSource, *, strict: bool = True) -> None:
    """Raise CheckpointError unless ``source`` holds exactly the tensors ``model`` needs (names, shapes, dtypes)."""
    have = source.layout()
    if STUB_KEY in have:
        raise CheckpointError(f"{source.path} is sat_quant's stub; its tensors are in the .safetensors file next "
                              f"to it (load with sat_quant.from_pretrained).")
    want = expected_layout(model)
    problems: List[str] = []
    quant_prefixes = {}
    for prefix, module in model.named_modules():
        if isinstance(module, QuantLinear):
            quant_prefixes[prefix + "." if prefix else ""] = module
    consumed = set()
    packed = {pre + n for pre, layer in quant_prefixes.items() for n in layer.fmt.layout(layer.spec)}
    for name, (shape, dtype) in want.items():
        if name in have:
            consumed.add(name)
            got_shape, got_dtype = have[name]
            # full-precision tensors may change float dtype (copy_ casts, as load_state_dict does); packed ones may not
            cast_ok = name not in packed and got_dtype.is_floating_point and dtype.is_floating_point
            if got_shape != shape or (got_dtype != dtype and not cast_ok):
                problems.append(f"{name}: checkpoint has {list(got_shape)} {got_dtype}, model needs {list(shape)} {dtype}")
            continue
        prefix, _, local = name.rpartition(".")
        layer = quant_prefixes.get(prefix + "." if prefix else "")
        fp_name = (prefix + "." if prefix else "") + "weight"
        if layer is not None and local in layer.fmt.layout(layer.spec) and fp_name in have:
            consumed.add(fp_name)
            got_shape = have[fp_name][0]
            if got_shape != (layer.out_features, layer.in_features):
                problems.append(f"{fp_name}: checkpoint has {list(got_shape)}, model needs "
                                f"{[layer.out_features, layer.in_features]}")
            continue
        problems.append(f"{name}: missing from the checkpoint")
    unexpected = sorted(set(have) - consumed)
    if strict and unexpected:
        problems += [f"{n}: in the checkpoint but not in the model" for n in unexpected[:10]]
    if problems:
        raise CheckpointError(f"{source.path} does not fit this model ({len(problems)} problems):\n  " +
                              "\n  ".join(sorted(set(problems))[:15]) +
                              "\nCheck that the model class and its sizes (model_config.json) match the checkpoint, "
                              "and that the quantization block describes these tensors.")


def fill(model: nn.Module, source: TensorSource) -> None:
    """Copy every tensor of ``model`` from ``source`` (already checked by ``check_fits``), one module at a time."""
    have = source.layout()
    with torch.no_grad():
        for prefix, module in model.named_modules():  # each module once, even where it is shared
            pre = prefix + "." if prefix else ""
            if isinstance(module, QuantLinear):  # neutral_tensors() is not needed here (it would unpack int4)
                names = list(module.fmt.layout(module.spec))
                if all(pre + n in have for n in names):
                    module.load_neutral_({n: source.get(pre + n) for n in names})
                else:
                    module.quantize_weight_(source.get(pre + "weight"))
                release_freed_memory(4 * module.quantized_nbytes())  # replaced tensors + repack temporaries
            for n, t in saved_tensors(module):
                t.copy_(source.get(pre + n, owned=False))
    release_freed_memory()


__all__ = ["expected_layout", "load_into", "check_fits", "fill"]
