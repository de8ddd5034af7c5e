"""``sat-quant`` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from typing import List, Optional, Tuple

from sat.arguments import update_args_with_file

from ..engine.config import QuantConfig
from ..errors import QuantConfigError, QuantError
from ..io.commit import overlap, write_text_atomic
from ..oom import QuantOutOfMemoryError, is_out_of_memory
from ..sat.args import add_quant_args, fill_script_defaults, validate_quant_args
from ..sat.loading import model_class_for
from .convert import convert
from .demo import run_demo
from .dequantize import dequantize
from .estimate import estimate_table
from .inspect_checkpoint import inspect_checkpoint
from .merge_lora import merge_lora_checkpoint
from .plan import plan_checkpoint
from .reshard import reshard
from .sources import import_modules


def _demo(ns: argparse.Namespace) -> int:
    run_demo(seq_len=ns.seq_len, repeats=ns.repeats)
    return 0


def _convert(ns: argparse.Namespace) -> int:
    budget, ns.quant_budget = getattr(ns, "quant_budget", None), None  # consumed here: plan, then convert
    if budget and ns.quant is None and ns.quant_format is None:
        ns.quant = 4  # a budget plans 4-bit formats (and int8 where it pays): it implies --quant 4
    config = validate_quant_args(ns)
    if config is None:
        raise QuantConfigError("convert needs --quant 4|8 (or --quant-format, or --quant-budget).")
    if budget:
        plan = plan_checkpoint(ns.src, budget, config=config, imports=ns.imports)
        print(plan.summary())
        config = plan.to_config()
    convert(ns.src, ns.dst, config, imports=ns.imports, overwrite=ns.overwrite, progress=not ns.quiet)
    print(f"wrote {ns.dst}")
    return 0


def _check_plan_output(out: str, src: str) -> None:
    """Where ``plan -o`` will write, checked before the (long) planning starts."""
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise QuantConfigError(f"-o {out} is a folder; name the plan file to write, e.g. -o {os.path.join(out, 'plan.json')}.")
    if not os.path.isdir(parent):
        raise QuantConfigError(f"-o {out}: the folder {parent} does not exist; create it first or write elsewhere.")
    if not os.access(parent, os.W_OK):
        raise QuantConfigError(f"-o {out}: the folder {parent} is not writable; choose a folder you can write to.")
    if overlap(src, out):
        raise QuantConfigError(f"-o {out} lies inside the source checkpoint {src}; write the plan outside it.")


def _plan(ns: argparse.Namespace) -> int:
    _check_plan_output(ns.out, ns.src)
    config = QuantConfig(bits=4, skip=tuple(ns.quant_skip or ()), quantize_lm_head=ns.quant_lm_head)
    plan = plan_checkpoint(ns.src, ns.quant_budget, candidates=ns.candidates, config=config, imports=ns.imports)
    write_text_atomic(ns.out, plan.to_json() + "\n")
    print(plan.summary())
    print(f"wrote {ns.out}: pass it as --quant-plan {ns.out} (sat-quant convert, from_pretrained, any SAT script)")
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    print(inspect_checkpoint(ns.path))
    return 0


def _dequantize(ns: argparse.Namespace) -> int:
    dequantize(ns.src, ns.dst, imports=ns.imports, overwrite=ns.overwrite)
    print(f"wrote {ns.dst}")
    return 0


def _reshard(ns: argparse.Namespace) -> int:
    reshard(ns.src, ns.dst, ns.mp, imports=ns.imports, overwrite=ns.overwrite)
    print(f"wrote {ns.dst} with model-parallel size {ns.mp}")
    return 0


def _merge_lora(ns: argparse.Namespace) -> int:
    merge_lora_checkpoint(ns.src, ns.dst, full_precision=ns.full_precision, imports=ns.imports, overwrite=ns.overwrite)
    print(f"wrote {ns.dst} ({'full precision' if ns.full_precision else 'adapters folded in, re-quantized'})")
    return 0


def _estimate(ns: argparse.Namespace) -> int:

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
    table, _ = estimate_table(cls, args, columns, batch=ns.batch, seq=ns.seq)
    print(f"{model_config.get('model_class')}: batch {ns.batch}, sequence {ns.seq}")
    print(table)
    return 0


def _add_imports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        help="module defining the model class (e.g. utils.models for CogVLM); repeatable")


def _add_src_dst(parser: argparse.ArgumentParser) -> None:
    """SRC and DST checkpoint folders, --import and --overwrite: what every checkpoint-rewriting command takes."""
    parser.add_argument("src")
    parser.add_argument("dst")
    _add_imports(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sat-quant", description="Quantization for SwissArmyTransformer models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a small SAT model with every format and compare with fp32")
    demo.add_argument("--seq-len", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(func=_demo)

    conv = sub.add_parser("convert", help="quantize a full-precision SAT checkpoint into a sat_quant one")
    _add_src_dst(conv)
    add_quant_args(conv)
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=_convert, fp16=False, bf16=False, device="cpu")

    pln = sub.add_parser("plan", help="choose each layer's format to fit --quant-budget (writes a --quant-plan file)")
    pln.add_argument("src", help="a full-precision SAT checkpoint folder")
    pln.add_argument("--quant-budget", required=True,
                     help="'5.0bpp' (bits/param of the quantized linears) or a model size: '500MB', '10GB', '9.5GiB'")
    pln.add_argument("--out", "-o", required=True, help="the plan JSON to write")
    pln.add_argument("--candidates", nargs="+", default=["int4:128", "int4c:64", "int8"],
                     help="formats the planner may pick per layer, 'fmt[:group]' or 'fp'")
    pln.add_argument("--quant-skip", type=str, nargs="*", default=[], help="globs kept full precision, not planned")
    pln.add_argument("--quant-lm-head", action="store_true", help="plan the LM head too")
    _add_imports(pln)
    pln.set_defaults(func=_plan)

    insp = sub.add_parser("inspect", help="per-layer table of a checkpoint: format, bits, group, bytes")
    insp.add_argument("path")
    insp.set_defaults(func=_inspect)

    deq = sub.add_parser("dequantize", help="write a full-precision SAT checkpoint from a quantized one")
    _add_src_dst(deq)
    deq.set_defaults(func=_dequantize)

    rsh = sub.add_parser("reshard", help="rewrite a checkpoint for another model-parallel size (no dequantizing)")
    _add_src_dst(rsh)
    rsh.add_argument("--mp", type=int, required=True, help="target model-parallel size (a power of two)")
    rsh.set_defaults(func=_reshard)

    mrg = sub.add_parser("merge-lora", help="fold a QLoRA checkpoint's adapters into its base (re-quantized)")
    _add_src_dst(mrg)
    mrg.add_argument("--full-precision", action="store_true",
                     help="write every layer in full precision (a plain SAT checkpoint) instead of re-quantizing")
    mrg.set_defaults(func=_merge_lora)

    est = sub.add_parser("estimate", help="memory by component for fp16/bf16/int8/int4 (and --quant ...), built on meta")
    est.add_argument("--config", required=True, help="a SAT model_config.json (e.g. configs/cogvlm-chat-17b.json)")
    _add_imports(est)
    est.add_argument("--batch", type=int, default=1)
    est.add_argument("--seq", type=int, default=2048)
    add_quant_args(est)
    est.set_defaults(func=_estimate, fp16=False, bf16=False, device="cpu")
    return parser


#: what a failure says, and the exit status: 2 for bad input (a flag, a file, a folder), 1 for the environment
BAD_INPUT, ENVIRONMENT = 2, 1


def describe_failure(exc: BaseException) -> Tuple[int, str]:
    """(exit status, one line for a person) for any exception a subcommand raised."""
    if isinstance(exc, QuantError):
        status = ENVIRONMENT if isinstance(exc, QuantOutOfMemoryError) else BAD_INPUT
        return status, " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if is_out_of_memory(exc):
        return ENVIRONMENT, ("ran out of memory; free memory, use a machine with more, or quantize more layers "
                             "(`sat-quant estimate` prices each choice)")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        why = exc.strerror or str(exc)
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return BAD_INPUT, f"{where}{why}; check the path"
        return ENVIRONMENT, f"{where}{why}; fix the cause (permissions, free space) and run it again"
    return ENVIRONMENT, (f"unexpected {type(exc).__name__}: {exc} (rerun with SAT_QUANT_DEBUG=1 for the traceback, "
                         f"and please report it)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; a failure is one line on stderr (``SAT_QUANT_DEBUG=1`` re-raises it with its traceback)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except Exception as exc:  # every failure becomes one line; the debug switch gives the traceback
        if os.environ.get("SAT_QUANT_DEBUG") == "1":
            raise
        status, message = describe_failure(exc)
        print(f"sat-quant {ns.command}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
