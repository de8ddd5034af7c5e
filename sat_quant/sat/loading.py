"""``from_pretrained``: SAT's ``from_pretrained`` for quantized models, without a full-precision copy.

- a sat_quant checkpoint (quantization block in model_config.json): built on meta with exactly the
  saved layer formats, then filled with the packed tensors (no ``--quant`` needed);
- a full-precision checkpoint plus ``--quant``: built quantized, then each weight is quantized as it
  is read from the memory-mapped ``.pt`` / ``.safetensors``;
- anything else: SAT's own path.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from sat.arguments import overwrite_args_by_dict, update_args_with_file
from sat.helpers import print_rank0
from sat.model.base_model import BaseModel
from sat.model.base_model import get_model as sat_get_model
from sat.model.registry import model_registry
from sat.training.model_io import load_checkpoint as sat_load_checkpoint
from torch import nn

from ..engine.config import QuantConfig
from ..engine.layers import QuantLinear
from ..engine.replace import quantize_
from ..errors import CheckpointError, QuantConfigError
from ..io.layout import (
    base_model_class,
    model_parallel_rank,
    read_latest,
    read_model_config,
    saved_model_parallel_size,
    state_file,
)
from ..io.load import check_fits, check_sizes_against_table, fill, with_adapter_base_names
from ..io.manifest import config_from_block, describe_block, read_manifest
from ..io.parallel import agree_across_ranks, open_checkpoint_source, power_of_two
from ..oom import oom_guidance
from .args import config_from_args, fill_script_defaults, target_device, validate_quant_args
from .build import build_quantized
from .lora_mixin import attach_lora_from_args


def model_class_for(model_cls, model_config: Dict[str, Any], path: str):
    """``model_cls`` when given, else the class model_config.json names, from SAT's model registry."""
    if model_cls is not None:
        return model_cls
    name = model_config.get("model_class")
    if isinstance(name, str):
        name = base_model_class(name)
    if isinstance(name, str) and name.startswith("Quantized") and name not in model_registry.member:
        name = name[len("Quantized"):]  # saved by a quantized_class(): rebuild from its base class
    try:
        return model_registry.get(name)
    except ValueError:
        raise CheckpointError(f"{path}/model_config.json names model_class {name!r}, which SAT does not know; "
                              f"import the module that defines it first (sat-quant: --import MODULE).") from None


def args_from_checkpoint(src: str, cls) -> argparse.Namespace:
    """SAT args to rebuild the model of checkpoint folder ``src`` on CPU for an offline job (no weights initialised)."""
    args = update_args_with_file(cls.get_args(), os.path.join(src, "model_config.json"))
    args.skip_init, args.device, args.mode = True, "cpu", "inference"
    fill_script_defaults(args)
    args.fp16 = bool(getattr(args, "fp16", False))
    args.bf16 = bool(getattr(args, "bf16", False))
    return args


def _layer_choice_flags(args: Optional[argparse.Namespace]) -> List[str]:
    """The flags that choose which layers get quantized, as the user passed them (not as a checkpoint recorded them)."""
    if args is None or getattr(args, "quantization", None):  # args read back from a checkpoint record its choices
        return []
    asked = []
    if getattr(args, "quant_skip", None):
        asked.append("--quant-skip " + " ".join(args.quant_skip))
    if getattr(args, "quant_lm_head", False):
        asked.append("--quant-lm-head")
    if getattr(args, "quant_plan", None):
        asked.append(f"--quant-plan {args.quant_plan}")
    return asked


def _check_contradiction(user: Optional[QuantConfig], block: Dict[str, Any], path: str,
                         args: Optional[argparse.Namespace] = None) -> None:
    """Passing --quant flags that disagree with what a quantized checkpoint holds is an error; so are the flags that
    choose layers (its layers are fixed). ``--quant-backend`` is honoured (it only picks kernels)."""
    layer_flags = _layer_choice_flags(args)
    if layer_flags:
        raise QuantConfigError(f"{path} is already quantized ({describe_block(block)}): its quantized layers are fixed, "
                               f"so {', '.join(layer_flags)} cannot apply. Drop it to load the checkpoint as saved, or "
                               f"convert the full-precision checkpoint again with it.")
    if user is None:
        return
    saved_cfg = block["config"]
    mismatched = []
    if user.bits != saved_cfg.get("bits"):
        mismatched.append(f"--quant {user.bits}")
    if user.format != saved_cfg.get("format"):
        mismatched.append(f"--quant-format {user.format}")
    if user.group_size is not None and user.group_size != saved_cfg.get("group_size"):
        mismatched.append(f"--quant-group-size {user.group_size}")
    if mismatched:
        raise QuantConfigError(f"{path} is already quantized to {describe_block(block)}, but "
                               f"{', '.join(mismatched)} was asked for. Drop the --quant flags to load it as "
                               f"saved, or convert the full-precision checkpoint again with the new settings.")


def _update_args_with_config(args: argparse.Namespace, config: Dict[str, Any], folder: str) -> argparse.Namespace:
    """SAT's ``update_args_with_file`` for a config already read: its keys win, ``*_path`` is relative to ``folder``."""
    config = {k: (os.path.join(folder, v) if k.endswith("_path") else v) for k, v in config.items()}
    rest = {k: v for k, v in vars(args).items() if k not in config}
    return argparse.Namespace(**config, **rest)


def _check_model_parallel_sizes(path: str, saved_mp: int, args: argparse.Namespace) -> None:
    """Refuse, on every rank alike and before anything is built, a model-parallel size the saved shards cannot be
    resharded to (resharding splits or merges partitions evenly: both sizes must be powers of two)."""
    wanted = int(getattr(args, "model_parallel_size", 1) or 1)
    if wanted != saved_mp and not (power_of_two(saved_mp) and power_of_two(wanted)):
        raise CheckpointError(f"{path} was saved with model-parallel size {saved_mp}; loading it at {wanted} needs "
                              f"both to be powers of two (resharding splits or merges partitions evenly). "
                              f"Use --model-parallel-size {saved_mp}, or a power of two.")


def from_pretrained(model_cls, name: str, args: Optional[argparse.Namespace] = None, *,
                    overwrite_args: Optional[Dict[str, Any]] = None, verify: bool = True, build_only: bool = False,
                    iteration: Optional[int] = None, **kwargs) -> Tuple[nn.Module, argparse.Namespace]:
    """Load a SAT checkpoint directory, quantized or full precision (+ ``--quant``), into a quantized model.

    Same contract as SAT's ``Model.from_pretrained(name, args, overwrite_args=...)``: returns
    ``(model, args)`` with args updated from model_config.json. ``model_cls=None`` picks the class
    named in model_config.json (as SAT's ``AutoModel`` does). Checkpoints are read with
    safetensors or ``torch.load(weights_only=True, mmap=True)``; nothing pickled is executed.
    On any error the partly built model is dropped: nothing half-loaded is returned. ``build_only`` builds the
    (quantized) model without reading weights; ``iteration`` loads another iteration than ``latest`` names.
    """
    path = name
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory; sat_quant loads local SAT checkpoint directories "
                              f"only (it never downloads). For a SAT model name, download and unzip the checkpoint "
                              f"and pass its folder (SAT keeps them in $SAT_HOME/NAME, default ~/.sat_models).")
    saved = read_saved_state(path, iteration)
    model_config, iteration, manifest, block, block_file = (saved.model_config, saved.iteration, saved.manifest,
                                                            saved.block, saved.block_file)
    user_config = config_from_args(args) if args is not None else None
    if block:
        _check_contradiction(user_config, block, path, args)
    if manifest is not None:  # before anything is built: a hand-edited size must not build a huge model first
        check_sizes_against_table(model_config, manifest["tensors"], block_file)
    asked_backend = getattr(args, "quant_backend", None) if args is not None else None

    base_args = copy.copy(args) if args is not None else None
    cls = model_class_for(model_cls, model_config, path)
    if base_args is None:
        base_args = cls.get_args()
    new_args = _update_args_with_config(base_args, model_config, path)
    new_args = overwrite_args_by_dict(new_args, overwrite_args=dict(overwrite_args or {}))
    new_args.skip_init = True  # every weight comes from the checkpoint
    fill_script_defaults(new_args)

    new_args.quantization = block or None  # the manifest's block is authoritative for this iteration
    if block and asked_backend and asked_backend != "auto" and not getattr(args, "quantization", None):
        new_args.quant_backend = asked_backend  # kernels are a load-time choice: honoured for a quantized checkpoint
    config = validate_quant_args(new_args)
    if config is None:
        model = sat_get_model(new_args, cls, **kwargs)
        if manifest is not None and not build_only:  # sat_quant's safetensors, full precision
            _fill_from(model, path, iteration, saved_model_parallel_size(model_config, block_file), verify)
        elif not build_only:
            sat_load_checkpoint(model, new_args, load_path=path, specific_iteration=iteration)
        return model, new_args

    saved_mp = saved_model_parallel_size(model_config, block_file)
    _check_model_parallel_sizes(path, saved_mp, new_args)  # before SAT builds (it asserts on odd head counts)
    with oom_guidance(f"loading {path}", device=target_device(new_args), quant_bits=config.bits,
                      model_parallel_size=saved_mp):
        # building on meta is cheap; it also initialises SAT's model-parallel groups, which say what to read
        model = build_quantized(new_args, cls, config, **kwargs)
        attach_lora_from_args(model, new_args)  # a QLoRA checkpoint: its adapters (quant_lora in the config)
        if not build_only:  # the model is ours until returned: verification may overlap the filling
            _fill_from(model, path, iteration, saved_mp, verify, verify_while_filling=True)
    new_args.model_parallel_size = model_parallel_rank()[1]
    return model, new_args


def _fill_from(model: nn.Module, path: str, iteration: int, saved_mp: int, verify: bool,
               may_be_new: Optional[Callable[[str], bool]] = None, *, verify_while_filling: bool = False) -> None:
    """Check that the checkpoint holds exactly what ``model`` needs (on every rank alike), then copy it in.

    ``verify_while_filling`` hashes the files while the model is filled (one pass over the data instead of two):
    only for a model the caller drops when this raises.
    """
    def open_and_check():
        source = open_checkpoint_source(path, iteration, saved_mp, model, verify=verify,
                                        background=verify_while_filling)
        if may_be_new is not None:  # fine-tuning: base weights saved without the adapters now wrapped around them
            source = with_adapter_base_names(model, source)
        check_fits(model, source, may_be_new=may_be_new)
        return source

    source = agree_across_ranks(open_and_check, f"loading {path}")  # no rank goes on alone into collectives
    fill(model, source)
    agree_across_ranks(source.finish, f"verifying {path}")
    model.quant_load_times = source.times  # per-phase MB/s: benchmarks/full_size.py reports them
    print_rank0(f"sat_quant: loaded {path}: {source.times.describe()}")


class SavedState(NamedTuple):
    """What a checkpoint folder says about one iteration, read and checked before anything is built."""
    model_config: Dict[str, Any]
    iteration: int
    manifest: Optional[Dict[str, Any]]
    block: Optional[Dict[str, Any]]
    block_file: str


def read_saved_state(path: str, iteration: Optional[int] = None) -> SavedState:
    """model_config.json, the iteration (``latest`` unless given), this rank's manifest and the quantization block.

    The manifest's own copy of the config wins: model_config.json may already describe a newer save that was
    killed before it could update 'latest'.
    """
    model_config = read_model_config(path)
    if iteration is None:
        iteration = read_latest(path)
    rank, _ = model_parallel_rank()
    manifest = read_manifest(path, iteration, rank)
    block_file = os.path.join(path, "model_config.json")
    if manifest is not None and manifest.get("quantization"):
        block_file = state_file(path, iteration, rank, ".manifest.json")
    block = (manifest or {}).get("quantization") or model_config.get("quantization")
    if manifest is not None and isinstance(manifest.get("model_config"), dict):
        model_config = dict(manifest["model_config"], quantization=block)
    if block:
        config_from_block(block, where=block_file)  # an unreadable block is named by its file, first
    return SavedState(model_config, iteration, manifest, block, block_file)


def load_into_built_model(model: nn.Module, path: str, args: Optional[argparse.Namespace] = None, *,
                          prefix: str = "", iteration: Optional[int] = None, verify: bool = True) -> int:
    """Fill an already built SAT model from a sat_quant checkpoint: SAT's ``load_checkpoint`` contract, used for
    ``--load`` in ``training_main`` and by SAT's own loaders once sat_quant is imported.

    A model built in full precision is quantized in place first, to exactly the checkpoint's layer formats, and a
    QLoRA checkpoint's adapters are added (the model object stays the same, as ``training_main`` holds it). When
    fine-tuning, tensors SAT lets a checkpoint lack (mixins, cross attention) and sat_quant's LoRA adapters keep
    their initialisation. Returns the iteration, 0 when fine-tuning, as SAT. If it raises, the model must not be
    used (it may already be quantized): SAT's callers stop there.
    """
    if prefix:
        raise CheckpointError(f"{path} is a sat_quant checkpoint; loading one part of it (prefix={prefix!r}) is not "
                              f"supported. Load the whole checkpoint and take the submodule from the model.")
    module = model.module if hasattr(model, "module") else model
    saved = read_saved_state(path, iteration)
    if saved.manifest is not None:
        check_sizes_against_table(saved.model_config, saved.manifest["tensors"], saved.block_file)
    saved_mp = saved_model_parallel_size(saved.model_config, saved.block_file)
    if saved.block and not any(isinstance(m, QuantLinear) for m in module.modules()):
        with oom_guidance(f"quantizing the model to load {path}"):
            quantize_(module, config_from_block(saved.block, where=saved.block_file), init_std=None)
    if isinstance(module, BaseModel) and "lora" not in module.mixins:  # a QLoRA checkpoint: its adapters too
        attach_lora_from_args(module, argparse.Namespace(**saved.model_config))
    mode = getattr(args, "mode", "inference") if args is not None else "inference"
    fresh = None  # SAT: inference and pretraining need every tensor; fine-tuning may add mixins, --force_train anything
    if mode == "finetune":
        fresh = (lambda name: True) if getattr(args, "force_train", False) else finetune_may_be_new
    with oom_guidance(f"loading {path}", model_parallel_size=saved_mp):
        _fill_from(module, path, saved.iteration, saved_mp, verify, may_be_new=fresh)
    if mode == "inference":
        module.eval()
    return 0 if mode == "finetune" else saved.iteration


def finetune_may_be_new(name: str) -> bool:
    """SAT's rule for what fine-tuning may add to a checkpoint's model (mixins, cross attention), plus sat_quant's
    LoRA adapters, which live inside the quantized layers. They keep their fresh initialisation."""
    return "mixins" in name or "cross_attention" in name or name.endswith((".lora_A", ".lora_B"))


__all__ = ["from_pretrained", "model_class_for", "args_from_checkpoint", "load_into_built_model", "read_saved_state",
           "finetune_may_be_new", "SavedState"]
