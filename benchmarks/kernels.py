"""Kernel benchmark: one linear layer's x @ W^T, each format × backend vs fp32 and bf16, side by side.

Cycles through enough distinct weights that their bytes exceed the last-level cache several
times over, so the figures measure memory traffic and kernels, not a weight sitting in L3.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from sat_quant.engine.backends import BACKENDS
from sat_quant.engine.formats import FORMATS

CACHE_BYTES = 32 * 2**20          # L3 of the reference CPU; we read >= 4x this per sweep
SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in): a square projection and an MLP up-projection
BATCHES = [1, 16]


def _n_weights(bytes_per_weight: int) -> int:
    return max(3, math.ceil(4 * CACHE_BYTES / bytes_per_weight))


def _time(fn, n_weights: int, min_seconds: float = 0.4, max_calls: int = 400) -> float:
    fn(0)
    calls, start = 0, time.perf_counter()
    while (time.perf_counter() - start < min_seconds or calls < n_weights) and calls < max_calls:
        fn(calls % n_weights)
        calls += 1
    return (time.perf_counter() - start) / calls


def bench_shape(out_f: int, in_f: int, batch: int, include_reference: bool) -> List[Dict[str, object]]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(batch, in_f, generator=gen)
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        nbytes = out_f * in_f * torch.empty((), dtype=dtype).element_size()
        ws = [torch.randn(out_f, in_f, generator=gen).to(dtype) for _ in range(_n_weights(nbytes))]
        x = x32.to(dtype)
        sec = _time(lambda i, x=x, ws=ws: F.linear(x, ws[i]), len(ws))
        rows.append(dict(kind=label, backend="torch dense", seconds=sec, bytes=nbytes))
        del ws
    for name, fmt in FORMATS.items():
        spec = fmt.spec(out_f, in_f)
        nbytes = fmt.nbytes(spec)
        base = fmt.quantize(torch.randn(out_f, in_f, generator=gen) * 0.02, spec)
        for backend_name, backend in BACKENDS.items():
            if backend.unsupported_reason(fmt, spec, torch.device("cpu")):
                continue
            if backend_name == "reference" and not include_reference:
                continue
            n = _n_weights(nbytes) if backend_name != "reference" else 3
            # distinct copies so each call streams a weight that is not in cache
            kernels = [backend.prepare(fmt, spec, {k: v.clone() for k, v in base.items()}) for _ in range(n)]
            for x in (x32, x32.to(torch.bfloat16)):
                sec = _time(lambda i, x=x, b=backend, f=fmt, s=spec, k=kernels: b.linear(x, f, s, k[i]), n,
                            min_seconds=0.4 if backend_name != "reference" else 0.2,
                            max_calls=400 if backend_name != "reference" else 6)
                rows.append(dict(kind=f"{name} ({'fp32' if x.dtype == torch.float32 else 'bf16'} act)",
                                 backend=backend_name, seconds=sec, bytes=nbytes))
            del kernels
    return rows


def _summary(rows: List[Dict[str, object]], batch: int) -> str:
    """One line per table: the nf4/fp4 kernel against bitsandbytes (what ran before it) and the dense baselines."""
    sec = {(r["kind"], r["backend"]): r["seconds"] for r in rows}
    fp32, bf16 = sec[("fp32", "torch dense")], sec[("bf16", "torch dense")]
    parts = []
    for fmt in ("nf4", "fp4"):
        for act in ("fp32", "bf16"):
            lut, bnb = sec.get((f"{fmt} ({act} act)", "lut")), sec.get((f"{fmt} ({act} act)", "bitsandbytes"))
            if lut and bnb:
                parts.append(f"{fmt} {act} act: lut {fp32 / lut:.1f}x fp32, {bf16 / lut:.2f}x bf16 dense "
                             f"(bitsandbytes {fp32 / bnb:.2f}x fp32)")
    return ("nf4/fp4 kernel vs baselines (batch %d): " % batch) + "; ".join(parts) + "." if parts else ""


def run(include_reference: bool = True) -> str:
    from .machine import load_average
    torch.manual_seed(0)
    lines = ["## Kernels: one linear layer, CPU", "",
             "Each row: mean time of `x @ W^T` cycling through enough distinct weights to exceed the "
             "last-level cache 4x; speed-up is fp32 time / row time on the same shape and batch, measured "
             "in this run; GB/s is weight bytes streamed per second (packed weights + scales). Backend `lut` is "
             "sat_quant's nf4/fp4 kernel (`sat_quant/csrc/lut4_cpu.cpp`), `bitsandbytes` what ran nf4/fp4 before "
             f"it. Load average when the section started: {load_average()}.", ""]
    for out_f, in_f in SHAPES:
        for batch in BATCHES:
            rows = bench_shape(out_f, in_f, batch, include_reference)
            fp32 = next(r["seconds"] for r in rows if r["kind"] == "fp32")
            lines += [f"### W {out_f}x{in_f}, batch {batch}", "",
                      "| weights | backend | ms | speed-up vs fp32 | GB/s |", "|---|---|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r['kind']} | {r['backend']} | {1000 * r['seconds']:.3f} | "
                             f"{fp32 / r['seconds']:.2f}x | {r['bytes'] / r['seconds'] / 1e9:.1f} |")
            lines += ["", _summary(rows, batch), ""]
            print(f"done {out_f}x{in_f} batch {batch}", flush=True)
    return "\n".join(lines)
