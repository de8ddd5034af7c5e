"""What SAT / CogVLM scripts call after applying ``patches/``: one function per job the scripts do by hand.

CogVLM's demos build the full model on CPU, call SAT's ``quantize`` and then move it to the GPU. The patched scripts
call :func:`load_for_inference` instead, which builds quantized (no full-precision copy), loads a
pre-quantized checkpoint directly, runs on CPU when there is no GPU, and turns an out-of-memory failure into
advice (:mod:`sat_quant.oom`). :func:`generation_guard` does the same around ``chat()``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..engine.kernels.build import cache_root
from ..errors import CheckpointError
from ..io.layout import read_model_config
from ..oom import oom_guidance
from ..sat.args import config_from_args, fill_script_defaults, validate_quant_args
from ..sat.build import build_on_meta
from ..sat.compat import apply_cpu_compat, install_xformers_cpu_fallback
from ..sat.loading import from_pretrained, model_class_for
from .estimate import estimate_runtime, estimate_weights
from .script_guard import check_model_parallel_fits, resolve_checkpoint

__all__ = ["check_model_parallel_fits", "default_device", "generation_guard", "is_quantized_checkpoint",
           "load_for_inference", "load_model", "merge_command", "model_dtype", "note_deepspeed_cpu_build",
           "resolve_checkpoint", "script_namespace"]


def default_device() -> str:
    """CUDA when there is one, else CPU (the unpatched scripts insist on CUDA)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_quantized_checkpoint(path: str) -> bool:
    """True for a checkpoint sat_quant saved (its model_config.json carries a ``quantization`` block)."""
    try:
        return bool(read_model_config(path).get("quantization"))
    except CheckpointError:
        return False


def script_namespace(args: argparse.Namespace, *, rank: int, world_size: int, device: str) -> argparse.Namespace:
    """The namespace CogVLM's demos hand to ``from_pretrained`` (their inline ``argparse.Namespace(...)``)."""
    values: Dict[str, Any] = dict(deepspeed=None, local_rank=rank, rank=rank, world_size=world_size,
                                  model_parallel_size=world_size, mode="inference", skip_init=True,
                                  use_gpu_initialization=False, device=device)
    values.update({k: v for k, v in vars(args).items() if k not in values})
    return argparse.Namespace(**values)


def _weight_estimate(path: str, ns: argparse.Namespace):
    """Bytes the weights will take (priced on meta), computed only when an OOM needs the figure."""
    def price() -> Optional[int]:
        model_config = read_model_config(path)
        cls = model_class_for(None, model_config, path)
        meta_args = fill_script_defaults(argparse.Namespace(**{**vars(ns), **model_config}))
        config = config_from_args(meta_args)
        dtype = (torch.bfloat16 if getattr(ns, "bf16", False) else
                 torch.float16 if getattr(ns, "fp16", False) else torch.float32)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # where load_for_inference puts the model
        est = estimate_weights(build_on_meta(cls, meta_args, dtype), config, device)
        return (est.weight_bytes + est.kernel_caches) // max(1, int(getattr(ns, "model_parallel_size", 1) or 1))
    return price


def load_for_inference(name: str, args: argparse.Namespace, *, model_cls=None,
                       rank: Optional[int] = None, world_size: Optional[int] = None,
                       ) -> Tuple[nn.Module, argparse.Namespace]:
    """Load a SAT checkpoint for a chat/eval script: quantized per ``--quant*`` or as saved, in eval mode.

    - a sat_quant checkpoint loads as saved (``--quant`` may be omitted; a contradicting one is refused);
    - a full-precision checkpoint with ``--quant`` is quantized as it is read, never whole in memory;
    - without either, SAT's own ``from_pretrained`` runs, as in the unpatched script.
    ``model_parallel_size`` follows ``WORLD_SIZE`` (torchrun), as CogVLM's demos do; shards are split or
    merged without dequantizing when the saved size differs. On CPU the torch fallbacks for SAT's triton
    rotary and xformers are switched on. Returns ``(model, model_args)`` like ``AutoModel.from_pretrained``.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    device = default_device()
    ns = script_namespace(args, rank=rank, world_size=world_size, device=device)
    config = validate_quant_args(ns)  # --quant 3, fp16+bf16, ... refused before anything is read
    path = resolve_checkpoint(name)
    check_model_parallel_fits(read_model_config(path), world_size, where=os.path.join(path, "model_config.json"))
    overwrite = {"model_parallel_size": world_size} if world_size != 1 else {}
    with oom_guidance(f"loading {path}", device=torch.device(device), need_bytes=_weight_estimate(path, ns),
                      quant_bits=config.bits if config else None, model_parallel_size=world_size):
        if config is not None or is_quantized_checkpoint(path):
            model, model_args = from_pretrained(model_cls, path, args=ns, overwrite_args=overwrite)
        else:
            if device == "cuda":
                ns.use_gpu_initialization = True
            if model_cls is None:
                from sat.model import AutoModel
                model, model_args = AutoModel.from_pretrained(path, args=ns, overwrite_args=overwrite)
            else:
                model, model_args = model_cls.from_pretrained(path, ns, overwrite_args=overwrite)
            if device == "cpu":  # sat_quant's build switches these on itself; SAT's does not
                apply_cpu_compat(model)
                install_xformers_cpu_fallback()
    return model.eval(), model_args


def load_model(model_cls, name: str, args: argparse.Namespace, *,
               overwrite_args: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, argparse.Namespace]:
    """``model_cls.from_pretrained(name, args, overwrite_args=...)`` for training/evaluation scripts that build
    their own full SAT namespace: sat_quant's loader when ``--quant`` is given or the checkpoint is sat_quant's
    (full precision + --quant is quantized as it is read; a quantized one loads as saved, model-parallel shards
    split or merged without dequantizing), SAT's own otherwise, exactly as the unpatched script."""
    path = resolve_checkpoint(name)
    overwrite = dict(overwrite_args or {})
    if validate_quant_args(args) is not None or is_quantized_checkpoint(path):
        return from_pretrained(model_cls, path, args=args, overwrite_args=overwrite)
    return model_cls.from_pretrained(path, args, overwrite_args=overwrite)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations should have: that of the model's floating-point parameters (quantized layers keep
    their packed tensors outside ``parameters()``), fp32 when there are none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def generation_guard(model: nn.Module, model_args: argparse.Namespace, max_length: int, batch: int = 1):
    """``oom_guidance`` for generating up to ``max_length`` tokens: the estimate is the KV cache plus one
    forward's activations (:func:`sat_quant.memory.estimate_runtime`)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    act_bytes = torch.empty((), dtype=model_dtype(model)).element_size()

    def price() -> int:
        kv, activations = estimate_runtime(model_args, batch, max_length, act_bytes)
        mp = int(getattr(model_args, "model_parallel_size", 1) or 1)
        return (kv + activations) // mp
    return oom_guidance(f"generating up to {max_length} tokens", device=device, need_bytes=price,
                        quant_bits=getattr(model_args, "quant", None),
                        model_parallel_size=int(getattr(model_args, "model_parallel_size", 1) or 1),
                        generating=True)


#: the op deepspeed compiles with g++ the first time it starts on CPU (deepspeed.comm.torch.build_shm_op)
DEEPSPEED_CPU_OP = "deepspeed_shm_comm"


def deepspeed_cpu_op_path() -> str:
    """Where torch's extension loader keeps deepspeed's CPU op once built (``torch.utils.cpp_extension``'s layout:
    ``$TORCH_EXTENSIONS_DIR/NAME``, else ``~/.cache/torch_extensions/py311_cu130/NAME``)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = os.environ["TORCH_EXTENSIONS_DIR"]
    else:
        accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                 f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(os.path.realpath(str(cache_root())), f"{py}_{accel}")
    return os.path.join(root, DEEPSPEED_CPU_OP, f"{DEEPSPEED_CPU_OP}.so")


def note_deepspeed_cpu_build() -> bool:
    """On CPU, deepspeed compiles its shared-memory communication op the first time it starts: minutes with no
    output. Say so first (rank 0). Returns whether the note was printed."""
    if torch.cuda.is_available() or os.path.isfile(deepspeed_cpu_op_path()):
        return False
    if int(os.environ.get("RANK", 0) or 0) == 0:
        print(f"Note: deepspeed compiles its CPU communication op ({DEEPSPEED_CPU_OP}) now, once: about 3 minutes "
              f"with no output on a small CPU. Later runs reuse {os.path.dirname(deepspeed_cpu_op_path())}.",
              flush=True)
    return True


def merge_command(checkpoint: str, cogvlm_root: str) -> str:
    """The ``sat-quant merge-lora`` command for a QLoRA checkpoint, runnable from any folder (absolute paths; the
    CogVLM checkout on PYTHONPATH so ``--import utils.models`` finds the model classes)."""
    src = os.path.abspath(checkpoint)
    return (f"PYTHONPATH={shlex.quote(os.path.abspath(cogvlm_root))} sat-quant merge-lora {shlex.quote(src)} "
            f"{shlex.quote(src + '-merged')} --import utils.models")
