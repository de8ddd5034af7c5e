"""``sat-quant demo``: a small SAT GPT-2-style model built in-process (no downloads), quantized at
build time with every format, compared with fp32 on the same inputs."""
from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch

from ..engine.config import QuantConfig
from ..engine.formats import FORMATS
from ..sat.build import build_quantized

DEMO_ARCH = dict(num_layers=4, hidden_size=1024, num_attention_heads=16, vocab_size=8192,
                 max_sequence_length=256)


def _demo_args(**overrides) -> argparse.Namespace:
    from sat.model.official.gpt2_model import GPT2Model
    kw = dict(DEMO_ARCH, device="cpu", fp16=False, bf16=False, skip_init=False, mode="inference")
    kw.update(overrides)
    return GPT2Model.get_args(**kw)


def _time_forward(model, inputs, repeats: int) -> float:
    with torch.no_grad():
        model(**inputs)  # warm-up: kernels cast their scales once
        start = time.perf_counter()
        for _ in range(repeats):
            model(**inputs)
    return 1000.0 * (time.perf_counter() - start) / repeats


def run_demo(seq_len: int = 32, repeats: int = 5, seed: int = 0) -> List[Dict[str, object]]:
    """Build fp32 and every format; return one row per model (and print the table)."""
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
    rows = [dict(format="fp32", bits=32.0, weight_bytes=0, max_err=0.0, mean_err=0.0,
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
        rows.append(dict(format=name, bits=8.0 * row.bytes_after / row.params, weight_bytes=row.bytes_after,
                         max_err=err.max().item(), mean_err=err.mean().item(), ms=_time_forward(model, inputs, repeats)))
        del model
    print(format_table(rows, ref))
    return rows


def format_table(rows: List[Dict[str, object]], ref: torch.Tensor) -> str:
    lines = [f"demo model: SAT GPT2Model, {DEMO_ARCH['num_layers']} layers, hidden {DEMO_ARCH['hidden_size']}, "
             f"vocab {DEMO_ARCH['vocab_size']} (logits max |y| = {ref.abs().max().item():.3f})",
             f"{'format':<8}{'bits/param':>11}{'quantized-layer bytes':>23}{'max err':>10}{'mean err':>10}"
             f"{'ms/forward':>12}"]
    for r in rows:
        lines.append(f"{r['format']:<8}{r['bits']:>11.2f}{r['weight_bytes']:>23,}{r['max_err']:>10.4f}"
                     f"{r['mean_err']:>10.5f}{r['ms']:>12.2f}")
    return "\n".join(lines)
