"""The manifest beside each tensor file, the quantization block, and the stub ``.pt``: sat_quant's metadata.

One writer (``write_rank_files``) puts a rank's three files in a folder: tensors (safetensors), manifest (size,
sha256, tensor table, quantization block, this iteration's model_config) and the stub ``.pt`` that makes SAT's
tools find the checkpoint while an unpatched SAT load fails naming sat_quant. Save, convert, reshard and
merge-lora all use it. The block records every quantized layer by name, so a load rebuilds exactly those layers.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .._version import __version__
from ..engine.config import QuantConfig
from ..engine.layers import QuantLinear
from ..engine.lora import LoraQuantLinear
from ..errors import CheckpointError, QuantConfigError
from .commit import write_json_atomic
from .layout import checkpoint_tensor_path, state_file
from .tensorfile import Layout, TensorSource, TensorStream, layout_of, sha256_file, write_stub, write_tensor_file

FORMAT_VERSION = 1


# -- the quantization block -----------------------------------------------------------------------

def find_quant_config(model: nn.Module) -> Optional[QuantConfig]:
    mixins = getattr(model, "mixins", None)
    if mixins is not None and "quant" in mixins:
        return mixins["quant"].quant_config
    return getattr(model, "quant_config", None)


def quantization_block(model: nn.Module, config: Optional[QuantConfig] = None) -> Dict[str, Any]:
    """What model_config.json records: format version, the config, and every quantized layer by name."""
    config = config or find_quant_config(model) or QuantConfig()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraQuantLinear)}
    layers: Dict[str, Dict[str, Any]] = {}
    for name, module in model.named_modules():  # a shared module is listed once, under its first name
        if isinstance(module, QuantLinear):
            # a LoRA-wrapped base is named as the layer it replaced: the model is rebuilt, then wrapped
            if name.endswith(".base") and name[:-len(".base")] in wrapped:
                name = name[:-len(".base")]
            layers[name] = {"format": module.fmt.name, "group_size": module.spec.group_size,
                            "shape": [module.out_features, module.in_features]}
    return {"format_version": FORMAT_VERSION, "sat_quant_version": __version__, "config": config.to_dict(),
            "layers": layers}


def config_from_block(block: Dict[str, Any], where: str = "model_config.json") -> QuantConfig:
    """The QuantConfig that rebuilds exactly the layers a block lists (everything else full precision)."""
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: quantization format_version {version!r} is not supported by this "
                              f"sat_quant (it reads version {FORMAT_VERSION}); upgrade sat_quant.")
    try:
        config = QuantConfig.from_dict(block["config"])
        layers = block["layers"]
    except (KeyError, TypeError, QuantConfigError) as exc:
        raise CheckpointError(f"{where}: malformed quantization block ({exc}); re-convert the checkpoint.") from None
    plan = {}
    for name, layer in layers.items():
        group = layer.get("group_size")
        plan[name] = f"{layer['format']}:{group}" if group else layer["format"]
    plan["*"] = "fp"
    config.plan, config.skip = plan, ()
    return config.validate()


def describe_block(block: Dict[str, Any]) -> str:
    """One line naming what a checkpoint holds, for error messages."""
    formats = sorted({f"{l['format']}" + (f" group {l['group_size']}" if l.get("group_size") else "")
                      for l in block.get("layers", {}).values()})
    bits = block.get("config", {}).get("bits")
    return f"{bits}-bit ({', '.join(formats) or 'no quantized layers'})"


# -- writing one rank's files ----------------------------------------------------------------------

def tensor_table(layout: Layout) -> Dict[str, Dict[str, Any]]:
    return {name: {"dtype": str(dtype).replace("torch.", ""), "shape": list(shape)}
            for name, (shape, dtype) in layout.items()}


def write_rank_files(folder: str, iteration: int, rank: int, tensors: Union[Dict[str, torch.Tensor], TensorStream],
                     block: Optional[Dict[str, Any]], model_config: Dict[str, Any]) -> None:
    """Tensors, manifest and stub of one model-parallel rank in ``folder`` (a temporary iteration folder).

    ``tensors`` may be a ``TensorStream`` (produced one module at a time while written). The manifest carries this
    iteration's own copy of model_config.json (less the block, stored next to it): the loader trusts it over
    model_config.json, which a save killed before 'latest' may already have replaced.
    """
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"mp_rank_{rank:02d}_model_states")
    layout = tensors.layout if isinstance(tensors, TensorStream) else layout_of(tensors)
    sha256 = write_tensor_file(stem + ".safetensors", tensors)
    manifest = {"format_version": FORMAT_VERSION, "iteration": iteration, "rank": rank,
                "file": os.path.basename(stem) + ".safetensors",
                "bytes": os.path.getsize(stem + ".safetensors"), "sha256": sha256,
                "tensors": tensor_table(layout), "quantization": block,
                "model_config": {k: v for k, v in model_config.items() if k != "quantization"}}
    write_json_atomic(stem + ".manifest.json", manifest)
    write_stub(stem + ".pt")


# -- reading ----------------------------------------------------------------------------------------

def read_manifest(load_dir: str, iteration: int, rank: int) -> Optional[Dict[str, Any]]:
    path = state_file(load_dir, iteration, rank, ".manifest.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupted ({exc}); restore it or re-save the checkpoint.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}); fix its permissions "
                              f"or restore it.") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported by this sat_quant (it reads "
                              f"version {FORMAT_VERSION}); upgrade sat_quant or re-convert the checkpoint.")
    for key, kind in (("bytes", int), ("sha256", str), ("tensors", dict)):
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{path}: the field '{key}' is missing or not a {kind.__name__}: the manifest was "
                                  f"edited or damaged; restore it, or re-save / re-convert the checkpoint.")
    block = manifest.get("quantization")
    if block is not None and not isinstance(block, dict):
        raise CheckpointError(f"{path}: 'quantization' must be a JSON object; restore the manifest or re-convert.")
    return manifest


def open_rank_source(load_dir: str, iteration: int, rank: int, *, checksum: bool = True,
                     background: bool = False) -> TensorSource:
    """This rank's tensor file, verified against its manifest (size always, sha256 when ``checksum``).

    With ``background`` the sha256 runs while the caller reads the tensors; the caller must call the source's
    ``finish()`` before using what it read (``sat_quant.from_pretrained`` does, and drops the model on failure).

    A sat_quant tensor file (safetensors) without its manifest is refused: nothing else says whether its bytes are
    the ones written. SAT's own ``.pt`` files have no manifest and are read as they are (weights only).
    """
    tensor_path = checkpoint_tensor_path(load_dir, iteration, rank)
    manifest = read_manifest(load_dir, iteration, rank)
    if manifest is None and tensor_path.endswith(".safetensors"):
        raise CheckpointError(f"{state_file(load_dir, iteration, rank, '.manifest.json')} is missing: without it "
                              f"{tensor_path} cannot be verified, so it is not loaded. Restore the file, or re-create "
                              f"the checkpoint (`sat-quant convert` from the full-precision one, or save again).")
    if manifest is not None:
        verify_tensor_file(tensor_path, manifest, checksum=checksum and not background)
    source = TensorSource(tensor_path)
    if manifest is not None and checksum and background:
        source.check_while_reading(lambda: verify_tensor_file(tensor_path, manifest))
    return source


def verify_tensor_file(path: str, manifest: Dict[str, Any], checksum: bool = True) -> None:
    """Size always, sha256 when ``checksum``: a truncated or altered file is named, never half-read."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete (re-save or re-convert it).")
    size = os.path.getsize(path)
    if size != manifest["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes but its manifest says {manifest['bytes']}: the file is "
                              f"truncated or was replaced; re-save or re-convert the checkpoint.")
    if checksum and sha256_file(path) != manifest["sha256"]:
        raise CheckpointError(f"{path} fails its sha256 check: the file is corrupted; re-save or re-convert "
                              f"the checkpoint.")


__all__ = ["FORMAT_VERSION", "find_quant_config", "quantization_block", "config_from_block",
           "describe_block", "tensor_table", "write_rank_files", "read_manifest", "verify_tensor_file",
           "open_rank_source"]
