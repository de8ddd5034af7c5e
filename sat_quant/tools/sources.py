"""What every offline job starts from: the modules that define model classes, and a full-precision source folder."""
from __future__ import annotations

import argparse
import importlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from ..errors import CheckpointError
from ..io.layout import checkpoint_tensor_path, read_latest, read_model_config, saved_model_parallel_size
from ..io.manifest import describe_block
from ..io.tensorfile import TensorSource
from ..sat.loading import args_from_checkpoint, model_class_for


def import_modules(names: Optional[List[str]]) -> None:
    """``--import utils.models``: register model classes (e.g. CogVLMModel) in SAT's registry."""
    for name in names or []:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise CheckpointError(f"--import {name} failed: {exc}. Put the module's folder on PYTHONPATH "
                                  f"(e.g. the CogVLM checkout) and try again.") from None


def full_precision_source_config(src: str, verb: str) -> Dict[str, Any]:
    """``src``'s model_config.json, refusing what an offline quantizer cannot start from: a checkpoint that is
    already quantized, or one saved at model-parallel size > 1."""
    model_config = read_model_config(src)
    if model_config.get("quantization"):
        raise CheckpointError(f"{src} is already quantized ({describe_block(model_config['quantization'])}); "
                              f"{verb} the full-precision checkpoint, or `sat-quant dequantize` it first.")
    if saved_model_parallel_size(model_config, f"{src}/model_config.json") != 1:
        raise CheckpointError(f"{src} was saved with model_parallel_size={model_config['model_parallel_size']}; "
                              f"{verb} supports model-parallel size 1 sources (merge it first with SAT's "
                              f"from_pretrained(..., overwrite_args={{'model_parallel_size': 1}})).")
    return model_config


@dataclass
class FullPrecisionSource:
    """A full-precision checkpoint opened for streaming: its model class, SAT args (in the file's dtype), tensors."""

    cls: type
    args: argparse.Namespace
    source: TensorSource
    iteration: int


def open_full_precision(src: str, verb: str, imports: Optional[List[str]] = None) -> FullPrecisionSource:
    """Open ``src`` for ``verb`` (convert, plan): refused when quantized or sharded; tensors memory-mapped."""
    import_modules(imports)
    model_config = full_precision_source_config(src, verb)
    cls = model_class_for(None, model_config, src)
    args = args_from_checkpoint(src, cls)
    iteration = read_latest(src)
    source = TensorSource(checkpoint_tensor_path(src, iteration, 0))
    # the parts that stay full precision keep the source's float dtype (SAT's config does not record it)
    counts = Counter(dt for _, dt in source.layout().values() if dt.is_floating_point)
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    args.fp16, args.bf16 = dtype == torch.float16, dtype == torch.bfloat16
    return FullPrecisionSource(cls, args, source, iteration)


class ProgressSource:
    """A TensorSource that advances a tqdm bar by the bytes of each tensor read."""

    def __init__(self, source: TensorSource, enabled: bool, desc: str = "quantizing") -> None:
        self.source, self.path = source, source.path
        total = sum(math.prod(shape) * dt.itemsize for shape, dt in source.layout().values())
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled)

    def layout(self):
        return self.source.layout()

    def get(self, name: str, **kwargs) -> torch.Tensor:
        t = self.source.get(name, **kwargs)
        self.bar.update(t.numel() * t.element_size())
        return t

    @property
    def times(self):
        return self.source.times


__all__ = ["import_modules", "full_precision_source_config", "FullPrecisionSource", "open_full_precision",
           "ProgressSource"]
