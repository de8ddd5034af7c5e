"""``sat-quant dequantize``: a sat_quant checkpoint → a plain full-precision SAT checkpoint (``.pt``, SAT's layout)."""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import nn

from ..engine.layers import QuantLinear
from ..errors import CheckpointError
from ..io.commit import check_destination, staged_folder
from ..io.layout import read_latest, read_model_config
from ..io.save import write_folder_config
from ..oom import oom_guidance
from ..sat.loading import from_pretrained
from .sources import import_modules

# keys sat_quant adds to model_config.json; a dequantized checkpoint drops them
QUANT_KEYS = ("quant", "quant_format", "quant_group_size", "quant_skip", "quant_plan", "quant_backend",
              "quant_lm_head", "quant_budget", "quantization")
# keys QuantLoraMixin adds; a merged checkpoint drops them
LORA_KEYS = ("quant_lora", "lora_alpha", "lora_dropout", "lora_targets")


def dequantize(src: str, dst: str, *, imports: Optional[List[str]] = None, overwrite: bool = False,
               dtype: Optional[torch.dtype] = None) -> str:
    """Write a full-precision SAT checkpoint (plain ``.pt``, SAT's layout) from a quantized one; returns ``dst``."""
    import_modules(imports)
    check_destination(dst, overwrite, src=src, verb="dequantize")
    model, _ = from_pretrained(None, src)  # an allocation failure here is reported as loading
    if any(k.endswith((".lora_A", ".lora_B")) for k, _ in model.named_parameters()):
        raise CheckpointError(f"{src} holds LoRA adapters; fold them in with `sat-quant merge-lora {src} {dst} "
                              f"--full-precision` (dequantize would drop them).")
    return write_full_precision(model, src, dst, read_latest(src), dtype, overwrite=overwrite)


def write_full_precision(model: nn.Module, src: str, dst: str, iteration: int, dtype: Optional[torch.dtype], *,
                         overwrite: bool, verb: str = "dequantize") -> str:
    """``model`` (quantized layers dequantized) as a plain SAT checkpoint at ``dst``, with ``src``'s config."""
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = {k: v for k, v in read_model_config(src).items() if k not in QUANT_KEYS + LORA_KEYS}
    with oom_guidance(f"writing {src} in full precision to {dst}", need_bytes=lambda: full_precision_bytes(model, dtype)):
        state = dict(model.state_dict())
        for prefix, module in model.named_modules():
            if isinstance(module, QuantLinear):
                pre = prefix + "."
                for n in module.fmt.tensor_names:
                    state.pop(pre + n, None)
                state[pre + "weight"] = module.weight.to(dtype)
        with staged_folder(dst, overwrite=overwrite, src=src, verb=verb) as tmp:
            os.makedirs(os.path.join(tmp, str(iteration)))
            save_pt({"module": state}, os.path.join(tmp, str(iteration), "mp_rank_00_model_states.pt"))
            write_folder_config(tmp, config, iteration)
    return dst


def save_pt(obj, path: str) -> None:
    """``torch.save`` through a Python file, so a failed write (full disk, file-size limit) surfaces as its OSError;
    torch's own writer reports it only as 'unexpected pos N vs M'."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            cause = exc.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror, path) from exc
            raise


def full_precision_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The bytes of ``model``'s weights with every quantized layer in ``dtype`` (what a full-precision write holds)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.out_features * module.in_features * dtype.itemsize
        total += sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
    return total


__all__ = ["dequantize", "write_full_precision", "full_precision_bytes", "QUANT_KEYS", "LORA_KEYS"]
