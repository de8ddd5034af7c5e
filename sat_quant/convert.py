"""Offline jobs on checkpoint directories: convert (fp → quantized), dequantize, inspect."""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from .checkpoint import (CheckpointError, TensorSource, checkpoint_tensor_path, describe_block, load_into,
                         read_latest, read_manifest, read_model_config, save_checkpoint, state_file)
from .config import QuantConfig
from .formats import LayerSpec, get_format
from .loading import _model_class, fill_script_defaults

# keys sat_quant adds to model_config.json; a dequantized checkpoint drops them
QUANT_KEYS = ("quant", "quant_format", "quant_group_size", "quant_skip", "quant_plan", "quant_backend",
              "quant_lm_head", "quant_budget", "quantization")
# keys QuantLoraMixin adds; a merged checkpoint drops them
LORA_KEYS = ("quant_lora", "lora_alpha", "lora_dropout", "lora_targets")


def import_modules(names: Optional[List[str]]) -> None:
    """``--import utils.models``: register model classes (e.g. CogVLMModel) in SAT's registry."""
    for name in names or []:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise CheckpointError(f"--import {name} failed: {exc}. Put the module's folder on PYTHONPATH "
                                  f"(e.g. the CogVLM checkout) and try again.") from None


def _prepare_destination(dst: str, overwrite: bool) -> None:
    if os.path.exists(dst) and os.listdir(dst):
        if not overwrite:
            raise CheckpointError(f"{dst} already exists and is not empty; pass --overwrite to replace it "
                                  f"or choose another destination.")


def _args_for(model_config: Dict[str, Any], cls, src: str) -> argparse.Namespace:
    from sat.arguments import update_args_with_file
    args = update_args_with_file(cls.get_args(), os.path.join(src, "model_config.json"))
    args.skip_init, args.device, args.mode = True, "cpu", "inference"
    fill_script_defaults(args)
    args.fp16 = bool(getattr(args, "fp16", False))
    args.bf16 = bool(getattr(args, "bf16", False))
    return args


def full_precision_source_config(src: str, verb: str) -> Dict[str, Any]:
    """``src``'s model_config.json, refusing what an offline quantizer cannot start from: a checkpoint that is
    already quantized, or one saved at model-parallel size > 1."""
    model_config = read_model_config(src)
    if model_config.get("quantization"):
        raise CheckpointError(f"{src} is already quantized ({describe_block(model_config['quantization'])}); "
                              f"{verb} the full-precision checkpoint, or `sat-quant dequantize` it first.")
    if int(model_config.get("model_parallel_size", 1)) != 1:
        raise CheckpointError(f"{src} was saved with model_parallel_size={model_config['model_parallel_size']}; "
                              f"{verb} supports model-parallel size 1 sources (merge it first with SAT's "
                              f"from_pretrained(..., overwrite_args={{'model_parallel_size': 1}})).")
    return model_config


def convert(src: str, dst: str, config: QuantConfig, *, imports: Optional[List[str]] = None,
            overwrite: bool = False, progress: bool = True) -> str:
    """Quantize the full-precision SAT checkpoint ``src`` into a sat_quant checkpoint at ``dst``.

    The model is built quantized on meta, then each weight is quantized as it is read from the
    memory-mapped source: the full-precision model is never materialised.
    """
    import_modules(imports)
    config.validate()
    model_config = full_precision_source_config(src, "convert")
    _prepare_destination(dst, overwrite)
    cls = _model_class(None, model_config, src)
    args = _args_for(model_config, cls, src)
    iteration = read_latest(src)
    source = TensorSource(checkpoint_tensor_path(src, iteration, 0))
    _match_source_dtype(args, source)
    from .build import build_quantized
    model = build_quantized(args, cls, config)
    load_into(model, _ProgressSource(source, enabled=progress))
    save_checkpoint(model, dst, args=args, iteration=iteration, overwrite=overwrite)
    return dst


def _match_source_dtype(args: argparse.Namespace, source: TensorSource) -> None:
    """Keep the source's float dtype for the tensors that stay full precision (SAT's config does not record it)."""
    from collections import Counter
    counts = Counter(dt for _, dt in source.layout().values() if dt.is_floating_point)
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    args.fp16, args.bf16 = dtype == torch.float16, dtype == torch.bfloat16


class _ProgressSource:
    """A TensorSource that advances a tqdm bar by the bytes of each tensor read."""

    def __init__(self, source: TensorSource, enabled: bool) -> None:
        from tqdm import tqdm
        self.source, self.path = source, source.path
        total = sum(_numel(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in source.layout().values())
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="quantizing", disable=not enabled)

    def layout(self):
        return self.source.layout()

    def get(self, name: str, **kwargs) -> torch.Tensor:
        t = self.source.get(name, **kwargs)
        self.bar.update(t.numel() * t.element_size())
        return t


def dequantize(src: str, dst: str, *, imports: Optional[List[str]] = None, overwrite: bool = False,
               dtype: Optional[torch.dtype] = None) -> str:
    """Write a full-precision SAT checkpoint (plain ``.pt``, SAT's layout) from a quantized one."""
    import_modules(imports)
    _prepare_destination(dst, overwrite)
    from .loading import from_pretrained
    model, _ = from_pretrained(None, src)
    if any(k.endswith((".lora_A", ".lora_B")) for k, _ in model.named_parameters()):
        raise CheckpointError(f"{src} holds LoRA adapters; fold them in with `sat-quant merge-lora {src} {dst} "
                              f"--full-precision` (dequantize would drop them).")
    return _write_full_precision(model, src, dst, read_latest(src), dtype)


def _write_full_precision(model: torch.nn.Module, src: str, dst: str, iteration: int,
                          dtype: Optional[torch.dtype]) -> str:
    """``model`` (quantized layers dequantized) as a plain SAT checkpoint at ``dst``, with ``src``'s config."""
    from .layers import QuantLinear
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor
    for prefix, module in model.named_modules():
        if isinstance(module, QuantLinear):
            pre = prefix + "."
            for n in module.fmt.layout(module.spec):
                state.pop(pre + n, None)
            state[pre + "weight"] = module.weight.to(dtype)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, str(iteration)))
    torch.save({"module": state}, os.path.join(tmp, str(iteration), "mp_rank_00_model_states.pt"))
    config = {k: v for k, v in read_model_config(src).items() if k not in QUANT_KEYS + LORA_KEYS}
    return _publish(tmp, dst, config, iteration)


def merge_lora(src: str, dst: str, *, full_precision: bool = False, imports: Optional[List[str]] = None,
               overwrite: bool = False, dtype: Optional[torch.dtype] = None) -> str:
    """Fold the LoRA adapters of the QLoRA checkpoint ``src`` into its base and write ``dst``.

    By default each adapted layer is re-quantized in its own format, so ``dst`` is a normal sat_quant
    checkpoint (loads with ``from_pretrained``, no LoRA flags); with ``full_precision`` every layer is written
    dequantized as a plain SAT checkpoint (e.g. to quantize again with other settings, or for SAT alone).
    A model-parallel ``src`` is merged to model-parallel size 1.
    """
    from .loading import from_pretrained
    from .lora import merge_lora_
    import_modules(imports)
    _prepare_destination(dst, overwrite)
    if not read_model_config(src).get("quant_lora"):
        raise CheckpointError(f"{src} holds no LoRA adapters (its model_config.json has no 'quant_lora' record); "
                              f"there is nothing to merge. It loads as it is with sat_quant.from_pretrained.")
    model, args = from_pretrained(None, src)
    merged = merge_lora_(model, requantize=not full_precision)
    if merged == 0:
        raise CheckpointError(f"{src} records LoRA settings but no adapter was rebuilt; the checkpoint is inconsistent.")
    args.quant_lora = None
    for flag in ("use_lora", "use_qlora"):  # CogVLM's finetune flags: the merged model has no adapters to add
        if getattr(args, flag, False):
            setattr(args, flag, False)
    iteration = read_latest(src)
    if full_precision:
        return _write_full_precision(model, src, dst, iteration, dtype)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, args=args, iteration=iteration)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)  # the destination appears complete or not at all
    return dst


def _publish(tmp: str, dst: str, model_config: Dict[str, Any], iteration: int) -> str:
    """Finish a checkpoint folder written at ``tmp`` (config, then ``latest``) and move it to ``dst`` whole."""
    import json
    with open(os.path.join(tmp, "model_config.json"), "w") as f:
        json.dump(model_config, f, indent=2)
    with open(os.path.join(tmp, "latest"), "w") as f:
        f.write(str(iteration))
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)  # the destination appears complete or not at all
    return dst


def inspect_checkpoint(path: str) -> str:
    """A table per quantized layer (format, bits, group, bytes) and the totals, read from the files only."""
    model_config = read_model_config(path)
    iteration = read_latest(path)
    manifest = read_manifest(path, iteration, 0)
    block = (manifest or {}).get("quantization") or model_config.get("quantization") or {"layers": {}}
    if manifest is not None:
        table = {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["tensors"].items()}
        nbytes = {k: _numel(shape) * torch.empty((), dtype=getattr(torch, dt)).element_size()
                  for k, (shape, dt) in table.items()}
    else:
        source = TensorSource(checkpoint_tensor_path(path, iteration, 0))
        nbytes = {k: _numel(shape) * torch.empty((), dtype=dt).element_size()
                  for k, (shape, dt) in source.layout().items()}
    lines = [f"{path}: model_class {model_config.get('model_class')}, iteration {iteration}, "
             f"{describe_block(block) if block['layers'] else 'not quantized'}",
             f"{'layer':<64}{'format':>8}{'bits':>6}{'group':>7}{'bytes':>14}"]
    quant_bytes = 0
    quant_tensors = set()
    for name, layer in block["layers"].items():
        fmt = get_format(layer["format"])
        keys = [f"{name}.{n}" for n in ("qweight", "scale", "zero", "absmax") if f"{name}.{n}" in nbytes]
        size = sum(nbytes[k] for k in keys)
        quant_tensors.update(keys)
        quant_bytes += size
        lines.append(f"{name:<64}{fmt.name:>8}{fmt.bits:>6}{str(layer.get('group_size') or '-'):>7}{size:>14,}")
    other = sum(v for k, v in nbytes.items() if k not in quant_tensors)
    lines.append(f"{'quantized layers: ' + str(len(block['layers'])):<64}{'':>21}{quant_bytes:>14,}")
    lines.append(f"{'full-precision tensors':<64}{'':>21}{other:>14,}")
    lines.append(f"{'total':<64}{'':>21}{quant_bytes + other:>14,}")
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


__all__ = ["convert", "dequantize", "inspect_checkpoint", "import_modules", "reshard", "merge_lora"]


def reshard(src: str, dst: str, model_parallel_size: int, *, imports: Optional[List[str]] = None,
            overwrite: bool = False) -> str:
    """Write ``src`` (any model-parallel size) as ``model_parallel_size`` shards at ``dst``, offline.

    Packed tensors are split/merged as they are (never dequantized); one target rank is in memory at a time.
    """
    import json

    from .checkpoint import (FORMAT_VERSION, STUB_KEY, _sha256, _write_tensor_file, config_from_block,
                             read_manifest, verify_tensor_file)
    from .memory import build_on_meta
    from .parallel import ReshardedSource, _power_of_two, packed_kinds, tensor_kinds
    import_modules(imports)
    _prepare_destination(dst, overwrite)
    model_config = read_model_config(src)
    iteration = read_latest(src)
    manifest0 = read_manifest(src, iteration, 0) or {}
    block = manifest0.get("quantization") or model_config.get("quantization")
    saved = int(model_config.get("model_parallel_size", 1) or 1)
    if not (_power_of_two(saved) and _power_of_two(model_parallel_size)):
        raise CheckpointError(f"cannot reshard {src} from model-parallel size {saved} to {model_parallel_size}: "
                              f"both must be powers of two.")
    cls = _model_class(None, model_config, src)
    args = _args_for(model_config, cls, src)
    args.model_parallel_size = 1
    meta = build_on_meta(cls, args, torch.float32)  # module types and strides at full size, no memory
    kinds = tensor_kinds(meta)
    for name, layer in (block or {}).get("layers", {}).items():  # the packed tensors of quantized layers
        kind = kinds.get(name + ".weight")
        if kind is not None:
            spec = LayerSpec(layer["format"], *layer["shape"], layer.get("group_size"))
            kinds.update(packed_kinds(kind, get_format(layer["format"]), spec, name + "."))
    if model_config.get("quant_lora"):  # a QLoRA checkpoint: the base sits under '.base', plus the adapters
        from .parallel import lora_kinds
        kinds.update(lora_kinds(kinds, (block or {}).get("layers", {})))

    sources = []
    for r in range(saved):
        path = checkpoint_tensor_path(src, iteration, r)
        manifest = read_manifest(src, iteration, r)
        if manifest is not None:
            verify_tensor_file(path, manifest, checksum=True)
        sources.append(TensorSource(path))
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, str(iteration)))
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
    for rank in range(model_parallel_size):
        resharded = ReshardedSource(sources, kinds, rank, model_parallel_size)
        tensors = {name: resharded.get(name) for name in resharded.layout()}
        stem = state_file(tmp, iteration, rank, "")
        _write_tensor_file(stem + ".safetensors", tensors)
        manifest = {"format_version": FORMAT_VERSION, "iteration": iteration, "rank": rank,
                    "file": os.path.basename(stem) + ".safetensors", "bytes": os.path.getsize(stem + ".safetensors"),
                    "sha256": _sha256(stem + ".safetensors"),
                    "tensors": {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                                for n, t in tensors.items()},
                    "quantization": new_block,
                    "model_config": {k: v for k, v in new_config.items() if k != "quantization"}}
        with open(stem + ".manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
        torch.save({"module": {STUB_KEY: torch.zeros(0)}, "sat_quant_format_version": FORMAT_VERSION}, stem + ".pt")
        del tensors
    return _publish(tmp, dst, new_config, iteration)
