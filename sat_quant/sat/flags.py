"""The ``--quant*`` flags, defined without importing torch or SAT (so ``sat-quant --help`` starts at once).

``add_quant_args`` works on any argparse parser: SAT's ``get_args(parser=...)``, a model's
``add_model_specific_args`` (so SAT writes the flags into model_config.json) and CogVLM's own
parsers, which already define ``--quant`` (existing options are left alone). Validation is
:func:`sat_quant.sat.args.validate_quant_args`.
"""
from __future__ import annotations

import argparse
import json


def add_quant_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the sat_quant flags; options the parser already has (e.g. CogVLM's --quant) are kept as they are."""
    existing = set(parser._option_string_actions)  # argparse has no public query for "is this option defined"

    def add(flag, **kw):
        if flag not in existing:
            parser.add_argument(flag, **kw)

    add("--quant", type=int, choices=[4, 8], default=None,
        help="quantize linear layers to 4 or 8 bits while the model is built (sat_quant)")
    # no argparse choices for formats and backends: listing them would import torch (slow --help); an unknown
    # name is refused by QuantConfig.validate with the list of known ones
    add("--quant-format", type=str, default=None,
        help="weight format (int8, int4, int4c, int4cs, nf4, fp4, ...); default int8 for --quant 8, int4 (grouped) for --quant 4")
    add("--quant-group-size", type=int, default=None, help="input columns per scale group (4-bit formats)")
    add("--quant-skip", type=str, nargs="*", default=[],
        help="glob patterns of module names kept in full precision, e.g. '*.vit_model.*'")
    add("--quant-plan", type=str, default=None, help="JSON file mapping module-name globs to a format or 'fp'")
    add("--quant-backend", type=str, default="auto",
        help="kernel backend; auto picks the fastest that runs on the device")
    add("--quant-lm-head", action="store_true", default=False, help="also quantize the LM head")
    add("--quant-budget", type=str, default=None,
        help="mixed precision by size: '5.0bpp' (bits/param of the quantized linears) or a model size such as "
             "'10GB' / '9.5GiB'; used by `sat-quant plan` and `sat-quant convert` (see sat_quant.planner)")
    # Not typed by users: SAT's save_checkpoint dumps it into model_config.json as the "quantization" block.
    add("--quantization", type=json.loads, default=None, help=argparse.SUPPRESS)
    return parser


__all__ = ["add_quant_args"]
