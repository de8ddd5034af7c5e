"""``sat-quant`` command line: one subcommand per job."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(seq_len=ns.seq_len, repeats=ns.repeats)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sat-quant", description="Quantization for SwissArmyTransformer models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a small SAT model with every format and compare with fp32")
    demo.add_argument("--seq-len", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    ns = build_parser().parse_args(argv)
    from .errors import QuantError
    try:
        return ns.func(ns)
    except QuantError as exc:
        print(f"sat-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
