"""``sat-quant`` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .errors import QuantConfigError, QuantError


def _demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(seq_len=ns.seq_len, repeats=ns.repeats)
    return 0


def _convert(ns: argparse.Namespace) -> int:
    from .args import validate_quant_args
    from .convert import convert
    config = validate_quant_args(ns)
    if config is None:
        raise QuantConfigError("convert needs --quant 4|8 (or --quant-format).")
    convert(ns.src, ns.dst, config, imports=ns.imports, overwrite=ns.overwrite, progress=not ns.quiet)
    print(f"wrote {ns.dst}")
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    from .convert import inspect_checkpoint
    print(inspect_checkpoint(ns.path))
    return 0


def _dequantize(ns: argparse.Namespace) -> int:
    from .convert import dequantize
    dequantize(ns.src, ns.dst, imports=ns.imports, overwrite=ns.overwrite)
    print(f"wrote {ns.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sat-quant", description="Quantization for SwissArmyTransformer models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a small SAT model with every format and compare with fp32")
    demo.add_argument("--seq-len", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(func=_demo)

    from .args import add_quant_args
    conv = sub.add_parser("convert", help="quantize a full-precision SAT checkpoint into a sat_quant one")
    conv.add_argument("src")
    conv.add_argument("dst")
    add_quant_args(conv)
    conv.add_argument("--import", dest="imports", action="append", default=[],
                      help="module defining the model class (e.g. utils.models for CogVLM); repeatable")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=_convert, fp16=False, bf16=False, device="cpu")

    insp = sub.add_parser("inspect", help="per-layer table of a checkpoint: format, bits, group, bytes")
    insp.add_argument("path")
    insp.set_defaults(func=_inspect)

    deq = sub.add_parser("dequantize", help="write a full-precision SAT checkpoint from a quantized one")
    deq.add_argument("src")
    deq.add_argument("dst")
    deq.add_argument("--import", dest="imports", action="append", default=[])
    deq.add_argument("--overwrite", action="store_true")
    deq.set_defaults(func=_dequantize)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except QuantError as exc:
        print(f"sat-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
