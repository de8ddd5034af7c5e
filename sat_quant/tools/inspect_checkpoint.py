"""``sat-quant inspect``: a table per quantized layer (format, bits, group, bytes) and totals, from the files only."""
from __future__ import annotations

import math

import torch

from ..engine.formats import get_format
from ..io.layout import base_model_class, checkpoint_tensor_path, read_latest, read_model_config
from ..io.manifest import describe_block, read_manifest
from ..io.tensorfile import TensorSource


def inspect_checkpoint(path: str) -> str:
    """A table per quantized layer (format, bits, group, bytes) and the totals, read from the files only."""
    model_config = read_model_config(path)
    iteration = read_latest(path)
    manifest = read_manifest(path, iteration, 0)
    block = (manifest or {}).get("quantization") or model_config.get("quantization") or {"layers": {}}
    if manifest is not None:
        table = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["tensors"].items()}
        nbytes = {k: math.prod(shape) * getattr(torch, dt).itemsize
                  for k, (shape, dt) in table.items()}
    else:
        source = TensorSource(checkpoint_tensor_path(path, iteration, 0))
        nbytes = {k: math.prod(shape) * dt.itemsize
                  for k, (shape, dt) in source.layout().items()}
    lines = [f"{path}: model_class {base_model_class(str(model_config.get('model_class')))}, iteration {iteration}, "
             f"{describe_block(block) if block['layers'] else 'not quantized'}",
             f"{'layer':<64}{'format':>8}{'bits':>6}{'group':>7}{'bytes':>14}"]
    quant_bytes = 0
    quant_tensors = set()
    for name, layer in block["layers"].items():
        fmt = get_format(layer["format"])
        keys = [f"{name}.{n}" for n in fmt.tensor_names if f"{name}.{n}" in nbytes]
        size = sum(nbytes[k] for k in keys)
        quant_tensors.update(keys)
        quant_bytes += size
        lines.append(f"{name:<64}{fmt.name:>8}{fmt.bits:>6}{str(layer.get('group_size') or '-'):>7}{size:>14,}")
    other = sum(v for k, v in nbytes.items() if k not in quant_tensors)
    lines.append(f"{'quantized layers: ' + str(len(block['layers'])):<64}{'':>21}{quant_bytes:>14,}")
    lines.append(f"{'full-precision tensors':<64}{'':>21}{other:>14,}")
    lines.append(f"{'total':<64}{'':>21}{quant_bytes + other:>14,}")
    return "\n".join(lines)


__all__ = ["inspect_checkpoint"]
