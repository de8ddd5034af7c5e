"""``save_checkpoint``: SAT's model_config.json from the model's args, and the model saved in SAT's layout.

The writing itself (atomic, verified, one module's tensors at a time) is :mod:`sat_quant.io.save`; this module
adds what only SAT's args know: ``extract_model_specific_args_to_dump`` fills model_config.json as SAT's own
``save_checkpoint`` does, so SAT's ``from_pretrained`` and ``AutoModel`` read it back.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

from sat.training.model_io import extract_model_specific_args_to_dump
from torch import nn

from ..io.save import iter_module_tensors, save_model
from ..oom import oom_guidance


def model_config_dict(model: nn.Module, args: Optional[argparse.Namespace]) -> Dict[str, Any]:
    """SAT's own model_config.json content (when args are given; else just the class name), JSON values only."""
    if args is not None:
        config = extract_model_specific_args_to_dump(args, model)
    else:
        config = {"model_class": type(model).__name__}
    return {k: v for k, v in config.items() if _jsonable(v) and k != "quantization"}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def save_checkpoint(model: nn.Module, save_dir: str, *, args: Optional[argparse.Namespace] = None,
                    iteration: int = 1, overwrite: bool = False) -> str:
    """Save ``model`` (quantized or not) under ``save_dir`` in SAT's layout; returns the iteration directory.

    Each model-parallel rank writes its own files; rank 0 writes model_config.json (SAT's args plus the
    quantization block) and ``latest``. Refuses to replace an existing iteration unless ``overwrite``.
    """
    with oom_guidance(f"saving to {save_dir}", need_bytes=lambda: _tensor_bytes(model)):
        return save_model(model, save_dir, model_config_dict(model, args), iteration=iteration, overwrite=overwrite)


def _tensor_bytes(model: nn.Module) -> int:
    """What the save serializes: every tensor it writes (one copy; priced only after an allocation failure)."""
    return sum(t.numel() * t.element_size() for _, _, local in iter_module_tensors(model) for t in local.values())


__all__ = ["save_checkpoint", "model_config_dict"]
