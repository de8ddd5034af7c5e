"""``sat-quant`` command line: the parser (torch-free, so ``--help`` is instant) and one-line errors.

Each subcommand's work is in :mod:`sat_quant.tools.commands`, imported after the flags parse.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

from ..errors import CheckpointWriteError, QuantError
from ..oom import QuantOutOfMemoryError, is_out_of_memory
from ..sat.flags import add_quant_args


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
    demo.add_argument("--repeats", type=int, default=5, help="timed forwards per format (the median is shown)")
    demo.set_defaults(handler="demo_command", quiet_import=True)

    conv = sub.add_parser("convert", help="quantize a full-precision SAT checkpoint into a sat_quant one")
    _add_src_dst(conv)
    add_quant_args(conv)
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.add_argument("--calibrate", metavar="FILE",
                      help="GPTQ for the 4-bit layers of the transformer blocks, one block at a time, on FILE: text "
                           "lines (language models) or JSONL of {\"image\": path, \"text\": prompt} (CogVLM, "
                           "CogAgent; run from the checkout with --import utils.models)")
    conv.add_argument("--calibrate-samples", type=int, default=128, metavar="N",
                      help="use the first N samples of --calibrate FILE (default 128)")
    conv.add_argument("--tokenizer", default="lmsys/vicuna-7b-v1.5", metavar="PATH",
                      help="tokenizer for --calibrate: a folder, or a name in the local Hugging Face cache "
                           "(default: CogVLM's scripts' --local_tokenizer)")
    conv.add_argument("--dry-run", action="store_true",
                      help="with --calibrate: print the time estimate and stop (nothing is written)")
    conv.set_defaults(handler="convert_command", fp16=False, bf16=False, device="cpu")

    pln = sub.add_parser("plan", help="choose each layer's format to fit --quant-budget (writes a --quant-plan file)")
    pln.add_argument("src", help="a full-precision SAT checkpoint folder")
    pln.add_argument("--quant-budget", required=True,
                     help="'5.0bpp' (bits/param of the quantized linears) or a model size: '500MB', '10GB', '9.5GiB'")
    pln.add_argument("--out", "-o", required=True, help="the plan JSON to write")
    pln.add_argument("--candidates", nargs="+", default=["int4:128", "int4cs:64", "int4cs:32", "int8"],
                     help="formats the planner may pick per layer, 'fmt[:group]' or 'fp'")
    pln.add_argument("--quant-skip", type=str, nargs="*", default=[], help="globs kept full precision, not planned")
    pln.add_argument("--quant-lm-head", action="store_true", help="plan the LM head too")
    _add_imports(pln)
    pln.set_defaults(handler="plan_command")

    insp = sub.add_parser("inspect", help="per-layer table of a checkpoint: format, bits, group, bytes")
    insp.add_argument("path")
    insp.set_defaults(handler="inspect_command")

    deq = sub.add_parser("dequantize", help="write a full-precision SAT checkpoint from a quantized one")
    _add_src_dst(deq)
    deq.set_defaults(handler="dequantize_command")

    rsh = sub.add_parser("reshard", help="rewrite a checkpoint for another model-parallel size (no dequantizing)")
    _add_src_dst(rsh)
    rsh.add_argument("--mp", type=int, required=True, help="target model-parallel size (a power of two)")
    rsh.set_defaults(handler="reshard_command")

    mrg = sub.add_parser("merge-lora", help="fold a QLoRA checkpoint's adapters into its base (re-quantized)")
    _add_src_dst(mrg)
    mrg.add_argument("--full-precision", action="store_true",
                     help="write every layer in full precision (a plain SAT checkpoint) instead of re-quantizing")
    mrg.set_defaults(handler="merge_lora_command")

    est = sub.add_parser("estimate", help="memory by component for fp16/bf16/int8/int4 (and --quant ...), built on meta")
    est.add_argument("--config", required=True, help="a SAT model_config.json (e.g. configs/cogvlm-chat-17b.json)")
    _add_imports(est)
    est.add_argument("--batch", type=int, default=1)
    est.add_argument("--seq", type=int, default=2048)
    est.add_argument("--run-device", choices=["cuda", "cpu"], default="cuda",
                     help="where the model will run: its kernels' caches differ (default: cuda)")
    add_quant_args(est)
    est.set_defaults(handler="estimate_command", fp16=False, bf16=False, device="cpu")
    return parser


@contextmanager
def quiet_output(keep_lines: int = 30) -> Iterator[None]:
    """Hold back what libraries print (SAT's and deepspeed's loggers, xformers' and torch's warnings): stdout and
    stderr go to a temporary file at the file-descriptor level (their handlers keep the original streams). On
    success it is dropped; on failure its last ``keep_lines`` lines are printed to stderr, then the error
    propagates (so our own one-line error stays visible)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        failed = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                log.seek(0)
                tail = log.read().decode(errors="replace").splitlines()[-keep_lines:]
                if tail:
                    print("\n".join(["(log before the failure:)"] + tail), file=sys.stderr)


#: what a failure says, and the exit status: 2 for bad input (a flag, a file, a folder), 1 for the environment
BAD_INPUT, ENVIRONMENT = 2, 1


def describe_failure(exc: BaseException) -> Tuple[int, str]:
    """(exit status, one line for a person) for any exception a subcommand raised."""
    if isinstance(exc, QuantError):
        status = ENVIRONMENT if isinstance(exc, (QuantOutOfMemoryError, CheckpointWriteError)) else BAD_INPUT
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
        # imported only now, after parsing: it brings torch, SAT and deepspeed (~4-18 s); --help needs none of them
        if getattr(ns, "quiet_import", False):  # the demo's reader wants its table, not the libraries' banners
            with quiet_output():
                commands = importlib.import_module("sat_quant.tools.commands")
        else:
            commands = importlib.import_module("sat_quant.tools.commands")
        return getattr(commands, ns.handler)(ns)
    except Exception as exc:  # every failure becomes one line; the debug switch gives the traceback
        if os.environ.get("SAT_QUANT_DEBUG") == "1":
            raise
        status, message = describe_failure(exc)
        print(f"sat-quant {ns.command}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
