"""``sat-quant demo``: a small SAT GPT-2-style model built in-process (no downloads), quantized at
build time with every format, compared with fp32 on the same inputs.

What a person reads is the table: SAT's, deepspeed's and xformers' log lines and warnings during the run go to a
buffer (shown only if the run fails), each row names the kernel that ran its layers, and the time is the median
of several forwards, with its range: on a shared CPU a single timing can be off by several times.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Tuple

import torch

from ..engine.config import QuantConfig
from ..engine.formats import FORMATS
from ..engine.layers import QuantLinear
from ..sat.build import build_quantized
from .cli import quiet_output

#: what each backend runs, by (backend, device type, format); the backend's name otherwise
KERNELS = {("torch", "cpu", "int8"): "torch _weight_int8pack_mm", ("torch", "cuda", "int8"): "torch _weight_int8pack_mm",
           ("torch", "cpu", "int4"): "torch _weight_int4pack_mm_for_cpu",
           ("torch", "cpu", "int4c"): "torch _weight_int4pack_mm_for_cpu",
           ("torch", "cpu", "int4cs"): "x * t, then torch _weight_int4pack_mm_for_cpu",
           ("torch", "cuda", "int4"): "torch _weight_int4pack_mm", ("torch", "cuda", "int4c"): "torch _weight_int4pack_mm",
           ("torch", "cuda", "int4cs"): "x * t, then torch _weight_int4pack_mm",
           ("lut", "cpu", "nf4"): "sat_quant AVX-512 LUT", ("lut", "cpu", "fp4"): "sat_quant AVX-512 LUT",
           ("lut", "cpu", "int4"): "sat_quant AVX-512 LUT",
           ("bitsandbytes", "cpu", "nf4"): "bitsandbytes matmul_4bit", ("bitsandbytes", "cpu", "fp4"): "bitsandbytes matmul_4bit",
           ("reference", "cpu", ""): "dequantize + F.linear"}

DEMO_ARCH = dict(num_layers=4, hidden_size=1024, num_attention_heads=16, vocab_size=8192,
                 max_sequence_length=256)


def _demo_args(**overrides) -> argparse.Namespace:
    from sat.model.official.gpt2_model import GPT2Model
    kw = dict(DEMO_ARCH, device="cpu", fp16=False, bf16=False, skip_init=False, mode="inference")
    kw.update(overrides)
    return GPT2Model.get_args(**kw)


def _time_forward(model, inputs, repeats: int) -> Tuple[float, float, float]:
    """(median, min, max) milliseconds of ``repeats`` timed forwards, after one warm-up."""
    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up: kernels cast their scales once
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            model(**inputs)
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times), min(times), max(times)


def kernel_of(model: torch.nn.Module) -> str:
    """The kernel(s) behind a model's quantized layers ("torch F.linear" when it has none)."""
    names = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            backend, device = module.backend.name, "cpu"  # the demo runs on CPU (_demo_args)
            names.add(KERNELS.get((backend, device, module.fmt.name),
                                  KERNELS.get((backend, device, "")) or backend))
    return " + ".join(sorted(names)) or "torch F.linear"


def run_demo(seq_len: int = 32, repeats: int = 5, seed: int = 0) -> List[Dict[str, object]]:
    """Build fp32 and every format; return one row per model and print the table (SAT's and the other libraries'
    output during the run is held back; it is printed only if the run fails)."""
    with quiet_output():
        rows, ref = _measure(seq_len, repeats, seed)
    print(format_table(rows, ref, repeats))
    return rows


def _measure(seq_len: int, repeats: int, seed: int):
    from sat.model.base_model import get_model as sat_get_model
    from sat.model.official.gpt2_model import GPT2Model
    torch.manual_seed(seed)
    fp_model = sat_get_model(_demo_args(), GPT2Model).eval()
    state = fp_model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(input_ids=torch.randint(0, DEMO_ARCH["vocab_size"], (1, seq_len), generator=gen),
                  position_ids=torch.arange(seq_len)[None],
                  attention_mask=torch.ones(1, 1, seq_len, seq_len).tril())
    with torch.no_grad():
        ref = fp_model(**inputs)[0]
    rows = [dict(format="fp32", kernel=kernel_of(fp_model), bits=32.0, weight_bytes=0, max_err=0.0, mean_err=0.0,
                 ms=_time_forward(fp_model, inputs, repeats))]
    for name, fmt in FORMATS.items():
        config = QuantConfig(bits=fmt.bits, format=name)
        model = build_quantized(_demo_args(skip_init=True), GPT2Model, config).eval()
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            out = model(**inputs)[0]
        err = (out - ref).abs()
        row = model.quant_report.rows[name]
        rows[0]["weight_bytes"] = row.params * 4  # the same layers in fp32
        rows.append(dict(format=name, kernel=kernel_of(model), bits=8.0 * row.bytes_after / row.params,
                         weight_bytes=row.bytes_after, max_err=err.max().item(), mean_err=err.mean().item(),
                         ms=_time_forward(model, inputs, repeats)))
        del model
    return rows, ref


def format_table(rows: List[Dict[str, object]], ref: torch.Tensor, repeats: int = 1) -> str:
    width = max(len(str(r["kernel"])) for r in rows) + 2
    lines = [f"demo model: SAT GPT2Model, {DEMO_ARCH['num_layers']} layers, hidden {DEMO_ARCH['hidden_size']}, "
             f"vocab {DEMO_ARCH['vocab_size']} (logits max |y| = {ref.abs().max().item():.3f})",
             f"{'format':<8}{'kernel':<{width}}{'bits/param':>11}{'quantized-layer bytes':>23}{'max err':>10}"
             f"{'mean err':>10}{'ms/forward':>12}{'(min-max)':>16}"]
    for r in rows:
        median, low, high = r["ms"]
        lines.append(f"{r['format']:<8}{r['kernel']:<{width}}{r['bits']:>11.2f}{r['weight_bytes']:>23,}"
                     f"{r['max_err']:>10.4f}{r['mean_err']:>10.5f}{median:>12.2f}{f'({low:.1f}-{high:.1f})':>16}")
    lines.append(f"ms/forward: median of {max(1, repeats)} forward(s) per format (--repeats), range in brackets.\n"
                 f"A shared CPU is noisy: other processes can make one run several times slower; compare rows of "
                 f"one run, and rerun with more --repeats on a quiet machine before drawing conclusions.")
    return "\n".join(lines)
