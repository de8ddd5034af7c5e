"""Filling a built model from a checkpoint: every name, shape and dtype checked first, then one module at a time.

Full-precision ``weight`` tensors arriving for a quantized layer are quantized as they arrive, so a full-precision
checkpoint loads into a quantized model without a full-precision copy. On any failure nothing half-filled is
returned to the caller (the sat layer drops the model).
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..engine.layers import QuantLinear
from ..engine.lora import LoraQuantLinear
from ..engine.replace import release_freed_memory
from ..errors import CheckpointError
from .save import expected_layout, saved_tensors
from .tensorfile import LoadTimes, TensorSource

_MAIN_LAYER = re.compile(r"transformer\.layers\.(\d+)\.")  # the main transformer's blocks, not a tower's


def shared_aliases(model: nn.Module) -> Dict[str, str]:
    """Tensor names under the second and later paths of a module reachable at several paths → the name under its
    first path. SAT's state_dict writes a shared module once per path (CogAgent's EVA2-CLIP-L rope sits in the tower
    and in every block's attention); sat_quant reads and writes it once, under the first."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        canonical = first.setdefault(id(module), path)
        if canonical == path:
            continue
        for n, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                aliases[f"{path}.{n}"] = f"{canonical}.{n}" if canonical else n
    return aliases


def check_sizes_against_table(model_config: Dict[str, Any], table: Dict[str, Any], where: str) -> None:
    """Before building: the config's layer count and hidden size agree with the checkpoint's tensor table.

    Cheap (names and shapes only), so a hand-edited ``num_layers`` or ``hidden_size`` is refused in milliseconds
    instead of building a model of that size first; everything else is checked by ``check_fits`` after the build.
    """
    problems = []
    layers = {int(m.group(1)) for name in table for m in [_MAIN_LAYER.match(name)] if m}
    num_layers = model_config.get("num_layers")
    if layers and isinstance(num_layers, int) and num_layers != max(layers) + 1:
        problems.append(f"num_layers is {num_layers}, but the tensors hold layers 0..{max(layers)}")
    hidden = model_config.get("hidden_size")
    embedding = table.get("transformer.word_embeddings.weight")
    shape = embedding.get("shape") if isinstance(embedding, dict) else None
    if isinstance(hidden, int) and isinstance(shape, list) and shape and shape[-1] != hidden:
        problems.append(f"hidden_size is {hidden}, but transformer.word_embeddings.weight is {shape}")
    if problems:
        raise CheckpointError(f"{where} does not match the checkpoint's tensors: {'; '.join(problems)}. Restore the "
                              f"original values (the manifest of each iteration keeps a copy of its model config).")


def load_into(model: nn.Module, source: TensorSource, *, strict: bool = True) -> None:
    """Fill ``model`` from ``source``: check every name/shape/dtype first, then copy one module at a time.

    Full-precision ``weight`` tensors arriving for a quantized layer are quantized as they arrive.
    """
    check_fits(model, source, strict=strict)
    fill(model, source)


def check_fits(model: nn.Module, source: TensorSource, *, strict: bool = True,
               may_be_new: Optional[Callable[[str], bool]] = None) -> None:
    """Raise CheckpointError unless ``source`` holds exactly the tensors ``model`` needs (names, shapes, dtypes).

    ``may_be_new(name)`` marks model tensors a checkpoint may lack (e.g. adapters added for fine-tuning): ``fill``
    then leaves them as they are.
    """
    have = source.layout()
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
            got_shape, got_dtype = have[fp_name]
            if got_shape != (layer.out_features, layer.in_features) or not got_dtype.is_floating_point:
                problems.append(f"{fp_name}: checkpoint has {list(got_shape)} {got_dtype}, model needs a floating-point "
                                f"{[layer.out_features, layer.in_features]} weight")
            continue
        if may_be_new is None or not may_be_new(name):
            problems.append(f"{name}: missing from the checkpoint")
    consumed |= {alias for alias, name in shared_aliases(model).items() if alias in have and name in consumed}
    unexpected = sorted(set(have) - consumed)
    if strict and unexpected:
        problems += [f"{n}: in the checkpoint but not in the model" for n in unexpected[:10]]
    if problems:
        raise CheckpointError(f"{source.path} does not fit this model ({len(problems)} problems):\n  " +
                              "\n  ".join(sorted(set(problems))[:15]) +
                              "\nCheck that the model class and its sizes (model_config.json) match the checkpoint, "
                              "and that the quantization block describes these tensors.")


class PlainBaseNames:
    """A tensor source seen with LoRA-wrapped names: a checkpoint saved without adapters holds ``P.qweight`` where a
    model with ``LoraQuantLinear`` at ``P`` wants ``P.base.qweight`` (loading base weights to fine-tune them)."""

    def __init__(self, source, renames: Dict[str, str]) -> None:
        self.source, self.renames, self.path = source, renames, source.path

    def layout(self):
        inverse = {v: k for k, v in self.renames.items()}
        return {inverse.get(name, name): spec for name, spec in self.source.layout().items()}

    def get(self, name: str, **kwargs) -> torch.Tensor:
        return self.source.get(self.renames.get(name, name), **kwargs)

    @property
    def times(self) -> LoadTimes:
        return self.source.times

    def finish(self) -> None:
        self.source.finish()


def with_adapter_base_names(model: nn.Module, source):
    """``source`` itself, or a ``PlainBaseNames`` view when the model wraps layers in LoRA the checkpoint lacks."""
    have = source.layout()
    renames = {}
    for prefix, module in model.named_modules():
        if isinstance(module, LoraQuantLinear):
            base = module.base
            for name in [*base.fmt.layout(base.spec), *(n for n, _ in saved_tensors(base))]:
                wanted, plain = f"{prefix}.base.{name}", f"{prefix}.{name}"
                if wanted not in have and plain in have:
                    renames[wanted] = plain
    return PlainBaseNames(source, renames) if renames else source


def fill(model: nn.Module, source: TensorSource) -> None:
    """Copy every tensor of ``model`` from ``source`` (already checked by ``check_fits``), one module at a time.
    The time spent repacking quantized layers into their kernels' layout is added to ``source.times``."""
    have = source.layout()
    times = source.times
    with torch.no_grad():
        for prefix, module in model.named_modules():  # each module once, even where it is shared
            pre = prefix + "." if prefix else ""
            if isinstance(module, QuantLinear):  # neutral_tensors() is not needed here (it would unpack int4)
                names = list(module.fmt.layout(module.spec))
                if all(pre + n in have for n in names):
                    neutral = {n: source.get(pre + n) for n in names}
                    start = time.perf_counter()
                    module.load_neutral_(neutral)
                    times.repack_s += time.perf_counter() - start
                    times.repack_bytes += module.quantized_nbytes()
                    del neutral
                else:
                    module.quantize_weight_(source.get(pre + "weight"))
                release_freed_memory(4 * module.quantized_nbytes())  # replaced tensors + repack temporaries
            for n, t in saved_tensors(module):
                if pre + n in have:  # check_fits let through only the ones marked may_be_new
                    start = time.perf_counter()  # a view of the file's map: the copy is the read
                    t.copy_(source.get(pre + n, owned=False))
                    times.read_s += time.perf_counter() - start
                    times.read_bytes += t.numel() * t.element_size()
    release_freed_memory()


__all__ = ["expected_layout", "check_sizes_against_table", "load_into", "check_fits", "fill", "with_adapter_base_names",
           "PlainBaseNames"]
