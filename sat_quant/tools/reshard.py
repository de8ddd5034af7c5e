"""``sat-quant reshard``: rewrite a checkpoint for another model-parallel size, packed tensors split or merged as they
are (never dequantized), one target rank in memory at a time."""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch

from ..engine.formats import LayerSpec, get_format
from ..errors import CheckpointError
from ..io.commit import check_destination, staged_folder
from ..io.layout import read_latest, read_model_config, saved_model_parallel_size
from ..io.manifest import config_from_block, open_rank_source, read_manifest, write_rank_files
from ..io.parallel import ReshardedSource, lora_kinds, packed_kinds, power_of_two, tensor_kinds
from ..io.save import write_folder_config
from ..oom import oom_guidance
from ..sat.build import build_on_meta
from ..sat.loading import args_from_checkpoint, model_class_for
from .sources import import_modules


def reshard(src: str, dst: str, model_parallel_size: int, *, imports: Optional[List[str]] = None,
            overwrite: bool = False) -> str:
    """Write ``src`` (any model-parallel size) as ``model_parallel_size`` shards at ``dst``, offline.

    Packed tensors are split/merged as they are (never dequantized); one target rank is in memory at a time.
    """
    import_modules(imports)
    check_destination(dst, overwrite, src=src, verb="reshard")
    with oom_guidance(f"resharding {src} to model-parallel size {model_parallel_size}",
                      model_parallel_size=model_parallel_size):
        _reshard(src, dst, model_parallel_size, overwrite)
    return dst


def _reshard(src: str, dst: str, model_parallel_size: int, overwrite: bool) -> None:
    model_config = read_model_config(src)
    iteration = read_latest(src)
    manifest0 = read_manifest(src, iteration, 0) or {}
    block = manifest0.get("quantization") or model_config.get("quantization")
    saved = saved_model_parallel_size(model_config, f"{src}/model_config.json")
    if not (power_of_two(saved) and power_of_two(model_parallel_size)):
        raise CheckpointError(f"cannot reshard {src} from model-parallel size {saved} to {model_parallel_size}: "
                              f"both must be powers of two.")
    cls = model_class_for(None, model_config, src)
    args = args_from_checkpoint(src, cls)
    args.model_parallel_size = 1
    meta = build_on_meta(cls, args, torch.float32)  # module types and strides at full size, no memory
    kinds = tensor_kinds(meta)
    for name, layer in (block or {}).get("layers", {}).items():  # the packed tensors of quantized layers
        kind = kinds.get(name + ".weight")
        if kind is not None:
            spec = LayerSpec(layer["format"], *layer["shape"], layer.get("group_size"))
            kinds.update(packed_kinds(kind, get_format(layer["format"]), spec, name + "."))
    if model_config.get("quant_lora"):  # a QLoRA checkpoint: the base sits under '.base', plus the adapters
        kinds.update(lora_kinds(kinds, (block or {}).get("layers", {})))

    sources = [open_rank_source(src, iteration, r) for r in range(saved)]
    new_config = dict(model_config, model_parallel_size=model_parallel_size)
    new_block = None
    if block:
        new_block = json.loads(json.dumps(block))
        for name, layer in new_block["layers"].items():
            kind = kinds.get(name + ".weight", (None, 1))[0]
            out_f, in_f = layer["shape"]
            if kind == "column":
                layer["shape"] = [out_f * saved // model_parallel_size, in_f]
            elif kind == "row":
                layer["shape"] = [out_f, in_f * saved // model_parallel_size]
        config_from_block(new_block)
        new_config["quantization"] = new_block
    with staged_folder(dst, overwrite=overwrite, src=src, verb="reshard") as tmp:
        folder = os.path.join(tmp, str(iteration))
        for rank in range(model_parallel_size):  # one target rank in memory at a time
            resharded = ReshardedSource(sources, kinds, rank, model_parallel_size)
            tensors = {name: resharded.get(name) for name in resharded.layout()}
            write_rank_files(folder, iteration, rank, tensors, new_block, new_config)
            del tensors
        write_folder_config(tmp, new_config, iteration)


__all__ = ["reshard"]
