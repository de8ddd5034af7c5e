"""Command-line flags (``--quant`` and friends) and their validation against ``--fp16/--bf16`` and the device.

``add_quant_args`` works on any argparse parser: SAT's ``get_args(parser=...)``, a model's
``add_model_specific_args`` (so SAT writes the flags into model_config.json) and CogVLM's own
parsers, which already define ``--quant`` (existing options are left alone).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from ..algorithms.planner import parse_budget
from ..engine.backends import get_backend
from ..engine.config import FULL_PRECISION, QuantConfig, load_plan_file, parse_plan_value
from ..engine.formats import get_format
from ..errors import QuantConfigError
from ..io.manifest import config_from_block
from .flags import add_quant_args
from .training import TRAINING_MODES, cpu_training_argv, finish_cpu_training_args, requested_mode


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    """The float dtype SAT builds with: fp16 for --fp16, bf16 for --bf16, else fp32 (as SAT's get_model)."""
    if getattr(args, "fp16", False):
        return torch.float16
    if getattr(args, "bf16", False):
        return torch.bfloat16
    return torch.float32


def fill_script_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what SAT scripts put in their namespace and some models (CogVLM's EVA tower) read while building."""
    for key, value in dict(world_size=1, rank=0, local_rank=0, deepspeed=None, use_gpu_initialization=False,
                           seed=1234, mode="inference", fp16=False, bf16=False, device="cpu").items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def check_world_size(argv: Sequence[str], world_size: Optional[int] = None) -> None:
    """Refuse a launch whose world size is not a multiple of ``--model-parallel-size``, before SAT starts
    torch.distributed (SAT only asserts deep inside). Every rank computes the same answer from its own
    environment, so every rank raises the same error and none waits for the others."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--model-parallel-size", type=int, default=1)
    mp = early.parse_known_args(list(argv))[0].model_parallel_size
    world = world_size if world_size is not None else int(os.getenv("WORLD_SIZE", "1"))
    if mp < 1:
        raise QuantConfigError(f"--model-parallel-size {mp} must be at least 1.")
    if world % mp:
        raise QuantConfigError(f"world size {world} (torchrun --nproc_per_node x nodes) is not a multiple of "
                               f"--model-parallel-size {mp}; launch a multiple of {mp} processes "
                               f"(e.g. torchrun --nproc_per_node {mp}), or pass --model-parallel-size dividing {world}.")


def target_device(args: argparse.Namespace) -> torch.device:
    """Where the model will run, from SAT's ``args.device`` (an int CUDA index, 'cpu', 'cuda', or -1 = auto)."""
    device = getattr(args, "device", None)
    if device is None or device == -1:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def config_from_args(args: argparse.Namespace) -> Optional[QuantConfig]:
    """The QuantConfig the flags describe, or None when no quantization was asked for."""
    block = getattr(args, "quantization", None)
    if isinstance(block, dict) and block:  # restored from a quantized checkpoint's model_config.json
        config = config_from_block(block)
        backend = getattr(args, "quant_backend", None)
        if backend and backend != "auto":  # kernels are chosen at load; the layers are the block's
            config.backend = backend
        return config
    bits = getattr(args, "quant", None)
    fmt = getattr(args, "quant_format", None)
    if bits is None and fmt is None:
        return None
    if bits is None:  # --quant-format alone implies its bit width
        bits = get_format(fmt).bits
    try:
        bits = int(bits)
    except (TypeError, ValueError):
        raise QuantConfigError(f"--quant {bits!r} is not a number; use --quant 4 or --quant 8.") from None
    plan_path = getattr(args, "quant_plan", None)
    return QuantConfig(bits=bits,
                       format=fmt, group_size=getattr(args, "quant_group_size", None),
                       skip=tuple(getattr(args, "quant_skip", None) or ()),
                       plan=load_plan_file(plan_path) if plan_path else {},
                       backend=getattr(args, "quant_backend", None) or "auto",
                       quantize_lm_head=bool(getattr(args, "quant_lm_head", False)))


def validate_quant_args(args: argparse.Namespace) -> Optional[QuantConfig]:
    """Check --quant* against --fp16/--bf16 and the device before anything is built.

    Returns the QuantConfig (None without --quant). Every refusal names the flag to change.
    """
    if getattr(args, "fp16", False) and getattr(args, "bf16", False):
        raise QuantConfigError("--fp16 and --bf16 were both given; pass only one of them (or neither for fp32).")
    if getattr(args, "quant_budget", None):
        parse_budget(args.quant_budget)  # an unreadable budget is refused here, naming the accepted forms
        # planning needs the fp weights; a build with --quant has none (it quantizes as they stream in), so
        # only the commands that plan first (sat-quant plan / convert) take the flag, and they consume it
        raise QuantConfigError(f"--quant-budget {args.quant_budget} needs the full-precision weights to plan: run "
                               f"`sat-quant plan SRC --quant-budget {args.quant_budget} -o plan.json` and pass "
                               f"--quant-plan plan.json, or `sat-quant convert SRC DST --quant-budget "
                               f"{args.quant_budget}`, or call sat_quant.quantize_to_budget_(model, "
                               f"'{args.quant_budget}') on a loaded full-precision model.")
    device = _check_device_available(getattr(args, "device", None))
    config = config_from_args(args)
    if config is None:
        return None
    config.validate()
    _check_backend_on_device(config, device)
    return config


def _check_device_available(device_flag) -> torch.device:
    """The device ``--device`` names, refused (naming the flag) when it asks for CUDA on a machine without it."""
    device = target_device(argparse.Namespace(device=device_flag))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantConfigError(f"--device {device_flag} asks for CUDA but no CUDA device is available; "
                               f"run without --device (CPU is used) or on a machine with a GPU.")
    return device


def _check_backend_on_device(config: QuantConfig, device: torch.device) -> None:
    """An explicitly requested backend must be able to run the chosen formats on this device."""
    if config.backend == "auto":
        return
    backend = get_backend(config.backend)
    # plan values may carry a group size ("int4:128"); the probe shape suits every kernel: only format/device matter
    formats = {config.format} | {parse_plan_value(v, None)[0] for v in config.plan.values() if v != FULL_PRECISION}
    for name in sorted(formats):
        fmt = get_format(name)
        probe = fmt.spec(256, 1024, None)
        reason = backend.unsupported_reason(fmt, probe, device)
        if reason:
            raise QuantConfigError(f"--quant-backend {config.backend} cannot run --quant-format {name} on "
                                   f"{device.type}: {reason}. Use --quant-backend auto.")


def get_args(args_list=None, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """SAT's ``get_args`` with the sat_quant flags added and validated.

    Bad combinations are refused with a QuantConfigError that names the flag, before SAT's own
    checks (which would only raise a bare AssertionError for --fp16 with --bf16).
    """
    from sat.arguments import get_args as sat_get_args
    parser = add_quant_args(parser if parser is not None else argparse.ArgumentParser(description="sat"))
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--fp16", action="store_true")
    early.add_argument("--bf16", action="store_true")
    early.add_argument("--device", default=None)
    known, _ = early.parse_known_args(sys.argv[1:] if args_list is None else args_list)
    if known.fp16 and known.bf16:
        raise QuantConfigError("--fp16 and --bf16 were both given; pass only one of them (or neither for fp32).")
    if known.device is not None:  # SAT would call into CUDA and fail with a raw "Found no NVIDIA driver"
        _check_device_available(int(known.device) if known.device.lstrip("-").isdigit() else known.device)
    argv = list(sys.argv[1:] if args_list is None else args_list)
    check_world_size(argv)  # SAT would only assert deep inside initialize_distributed
    if not torch.cuda.is_available() and not any(a.startswith("--distributed-backend") for a in argv):
        argv += ["--distributed-backend", "gloo"]  # SAT defaults to nccl, which cannot start without a GPU
    mode = requested_mode(argv)
    cpu_training = not torch.cuda.is_available() and mode in TRAINING_MODES  # SAT refuses it; deepspeed can
    args = sat_get_args(cpu_training_argv(argv) if cpu_training else argv, parser=parser)
    if cpu_training:
        finish_cpu_training_args(args, mode)
    validate_quant_args(args)
    return args
