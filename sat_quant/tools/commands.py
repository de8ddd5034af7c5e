"""What each ``sat-quant`` subcommand does, given its parsed flags (``sat_quant.tools.cli`` parses and dispatches).

Kept apart from the parser so that ``sat-quant --help`` and a mistyped flag never import torch or SAT.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict

from sat.arguments import update_args_with_file

from ..engine.config import QuantConfig
from ..errors import QuantConfigError
from ..io.commit import check_destination, check_writable, overlap, write_failed, write_text_atomic
from ..io.layout import base_model_class
from ..sat.args import fill_script_defaults, validate_quant_args
from ..sat.loading import model_class_for
from .convert import Calibration, convert
from .demo import run_demo
from .dequantize import dequantize
from .estimate import estimate_table
from .inspect_checkpoint import inspect_checkpoint
from .merge_lora import merge_lora_checkpoint
from .plan import plan_checkpoint
from .reshard import reshard
from .sources import import_modules


def demo_command(ns: argparse.Namespace) -> int:
    run_demo(seq_len=ns.seq_len, repeats=ns.repeats)
    return 0


def convert_command(ns: argparse.Namespace) -> int:
    check_destination(ns.dst, ns.overwrite, src=ns.src, verb="convert")  # before a budget's (long) planning
    budget, ns.quant_budget = getattr(ns, "quant_budget", None), None  # consumed here: plan, then convert
    if budget and ns.quant is None and ns.quant_format is None:
        ns.quant = 4  # a budget plans 4-bit formats (and int8 where it pays): it implies --quant 4
    config = validate_quant_args(ns)
    if config is None:
        raise QuantConfigError("convert needs --quant 4|8 (or --quant-format, or --quant-budget).")
    if budget and not ns.calibrate:  # with --calibrate, the plan is measured on the samples (below)
        plan = plan_checkpoint(ns.src, budget, config=config, imports=ns.imports)
        print(plan.summary())
        config = plan.to_config()
    calibration = None
    if ns.calibrate:
        if ns.calibrate_samples is not None and ns.calibrate_samples <= 0:
            raise QuantConfigError(f"--calibrate-samples {ns.calibrate_samples} must be positive (e.g. 128).")
        calibration = Calibration(ns.calibrate, samples=ns.calibrate_samples, tokenizer=ns.tokenizer,
                                  dry_run=ns.dry_run, budget=budget)
    elif ns.dry_run:
        raise QuantConfigError("--dry-run estimates a calibration: pass it with --calibrate FILE.")
    convert(ns.src, ns.dst, config, imports=ns.imports, overwrite=ns.overwrite, progress=not ns.quiet,
            calibration=calibration)
    print("dry run: nothing written" if ns.dry_run else f"wrote {ns.dst}")
    return 0


def _check_plan_output(out: str, src: str) -> None:
    """Where ``plan -o`` will write, checked before the (long) planning starts."""
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise QuantConfigError(f"-o {out} is a folder; name the plan file to write, e.g. -o {os.path.join(out, 'plan.json')}.")
    if not os.path.isdir(parent):
        raise QuantConfigError(f"-o {out}: the folder {parent} does not exist; create it first or write elsewhere.")
    if overlap(src, out):
        raise QuantConfigError(f"-o {out} lies inside the source checkpoint {src}; write the plan outside it.")
    check_writable(out, replace=True, verb=f"plan -o {out}")  # a read-only folder or plan file: exit 1


def plan_command(ns: argparse.Namespace) -> int:
    _check_plan_output(ns.out, ns.src)
    config = QuantConfig(bits=4, skip=tuple(ns.quant_skip or ()), quantize_lm_head=ns.quant_lm_head)
    plan = plan_checkpoint(ns.src, ns.quant_budget, candidates=ns.candidates, config=config, imports=ns.imports)
    try:
        write_text_atomic(ns.out, plan.to_json() + "\n")
    except OSError as exc:  # a full disk, a file-size limit: the old plan file (if any) is kept
        raise write_failed(exc, ns.out, "plan") from exc
    print(plan.summary())
    print(f"wrote {ns.out}: pass it as --quant-plan {ns.out} (sat-quant convert, from_pretrained, any SAT script)")
    return 0


def inspect_command(ns: argparse.Namespace) -> int:
    print(inspect_checkpoint(ns.path))
    return 0


def dequantize_command(ns: argparse.Namespace) -> int:
    dequantize(ns.src, ns.dst, imports=ns.imports, overwrite=ns.overwrite)
    print(f"wrote {ns.dst}")
    return 0


def reshard_command(ns: argparse.Namespace) -> int:
    reshard(ns.src, ns.dst, ns.mp, imports=ns.imports, overwrite=ns.overwrite)
    print(f"wrote {ns.dst} with model-parallel size {ns.mp}")
    return 0


def merge_lora_command(ns: argparse.Namespace) -> int:
    merge_lora_checkpoint(ns.src, ns.dst, full_precision=ns.full_precision, imports=ns.imports, overwrite=ns.overwrite)
    print(f"wrote {ns.dst} ({'full precision' if ns.full_precision else 'adapters folded in, re-quantized'})")
    return 0


def estimate_command(ns: argparse.Namespace) -> int:

    import_modules(ns.imports)
    try:
        with open(ns.config) as f:
            model_config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantConfigError(f"--config {ns.config}: cannot read it as JSON ({exc}).") from None
    cls = model_class_for(None, model_config, ns.config)
    args = fill_script_defaults(update_args_with_file(cls.get_args(), ns.config))
    args.skip_init, args.device, args.fp16, args.bf16 = True, "cpu", False, False
    columns = OrderedDict([("fp16", None), ("bf16", None), ("int8", QuantConfig(bits=8)), ("int4", QuantConfig(bits=4))])
    asked = validate_quant_args(ns)
    if asked is not None:
        columns["asked"] = asked
    table, _ = estimate_table(cls, args, columns, batch=ns.batch, seq=ns.seq, device=ns.run_device)
    print(f"{base_model_class(str(model_config.get('model_class')))}: batch {ns.batch}, sequence {ns.seq}, "
          f"running on {ns.run_device}")
    print(table)
    return 0
