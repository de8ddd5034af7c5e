"""Prefill benchmark: one linear layer at prompt sizes (64, 256 and 1225 rows: CogVLM's image + text prompt), each
format's auto backend on its kernel path, on the prefill path (dequantized tiles + dense GEMM) and as ``linear``
picks, against bf16 and fp32 dense on the same inputs in the same run.

Also finds, per format, the row count from which the prefill path wins on this machine (a ladder of row counts), to
set against the ``prefill_rows`` the backends declare.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from sat_quant.engine.backends import select_backend
from sat_quant.engine.backends.prefill import gemm_dtype, tiled_linear
from sat_quant.engine.formats import FORMATS

SHAPES = [(4096, 4096), (11008, 4096)]
ROWS = [64, 256, 1225]
LADDER = [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024]


def _time(fn, *args, min_seconds: float = 0.3, max_calls: int = 20) -> float:
    fn(*args)
    calls, start = 0, time.perf_counter()
    while (time.perf_counter() - start < min_seconds or calls < 2) and calls < max_calls:
        fn(*args)
        calls += 1
    return (time.perf_counter() - start) / calls


def _paths(fmt_name: str, out_f: int, in_f: int, gen: torch.Generator):
    fmt = FORMATS[fmt_name]
    spec = fmt.spec(out_f, in_f)
    backend = select_backend("auto", fmt, spec, "cpu")
    kernel = backend.prepare(fmt, spec, fmt.quantize(torch.randn(out_f, in_f, generator=gen) * 0.02, spec))

    def kernel_path(x):
        return backend.kernel_linear(x, fmt, spec, kernel)

    def prefill_path(x):
        dtype = gemm_dtype(x)
        return tiled_linear(x, out_f, backend.weight_tiles(fmt, spec, kernel, dtype), dtype)

    def auto(x):
        return backend.linear(x, fmt, spec, kernel)

    threshold = backend.prefill_rows.get((fmt.kernel_layout, "cpu"))
    return backend.name, threshold, kernel_path, prefill_path, auto


def bench_rows(out_f: int, in_f: int, rows: Sequence[int], formats: Sequence[str]) -> List[Dict[str, object]]:
    """One row per (format, row count): ms of each path and auto's speed against bf16 dense."""
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(out_f, in_f, generator=gen) * 0.02
    w16 = w32.to(torch.bfloat16)
    results = []
    for m in rows:
        x32 = torch.randn(m, in_f, generator=gen)
        x16 = x32.to(torch.bfloat16)
        bf16 = _time(F.linear, x16, w16)
        fp32 = _time(F.linear, x32, w32)
        for name in formats:
            backend, threshold, kernel_path, prefill_path, auto = _paths(name, out_f, in_f, gen)
            k = _time(kernel_path, x16)
            p = _time(prefill_path, x16)
            a = p if threshold is not None and m >= threshold else k
            results.append(dict(format=name, backend=backend, rows=m, bf16=bf16, fp32=fp32, kernel=k, prefill=p,
                                auto=a, picks="prefill" if a is p else "kernel"))
    return results


def crossover(out_f: int, in_f: int, formats: Sequence[str], ladder: Sequence[int] = LADDER) -> Dict[str, Tuple]:
    """Per format: (backend, first ladder row count where the prefill path is faster, the backend's threshold)."""
    gen = torch.Generator().manual_seed(1)
    found = {}
    for name in formats:
        backend, threshold, kernel_path, prefill_path, _ = _paths(name, out_f, in_f, gen)
        first = None
        for m in ladder:
            x = torch.randn(m, in_f, generator=gen).to(torch.bfloat16)
            if _time(prefill_path, x) < _time(kernel_path, x):
                first = m
                break
        found[name] = (backend, first, threshold)
    return found


def run(shapes=SHAPES, rows=ROWS, ladder=LADDER, formats: Sequence[str] = tuple(FORMATS)) -> str:
    from .machine import load_average
    torch.manual_seed(0)
    lines = ["## Prefill: one linear layer at prompt sizes, CPU", "",
             "bf16 activations. `kernel`: the auto backend's weight-only kernel; `prefill`: dequantized tiles + "
             f"dense GEMM in {gemm_dtype(torch.ones(1, dtype=torch.bfloat16))} (engine/backends/prefill.py); "
             "`auto`: what `linear` runs at that row count; `vs bf16` is bf16 dense time / auto time (target "
             f">= 0.9). Load average when the section started: {load_average()}.", ""]
    worst = None
    for out_f, in_f in shapes:
        lines += [f"### W {out_f}x{in_f}", "", "| format | backend | rows | bf16 dense ms | fp32 dense ms | kernel ms | "
                  "prefill ms | auto picks | auto vs bf16 |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
        for r in bench_rows(out_f, in_f, rows, formats):
            ratio = r["bf16"] / r["auto"]
            if worst is None or ratio < worst[0]:
                worst = (ratio, f"{r['format']} at {r['rows']} rows, W {out_f}x{in_f}")
            lines.append(f"| {r['format']} | {r['backend']} | {r['rows']} | {1000 * r['bf16']:.1f} | "
                         f"{1000 * r['fp32']:.1f} | {1000 * r['kernel']:.1f} | {1000 * r['prefill']:.1f} | {r['picks']} | "
                         f"{r['bf16'] / r['auto']:.2f}x |")
        lines.append("")
        print(f"prefill: done {out_f}x{in_f}", flush=True)
    if worst:
        lines += [f"Lowest auto vs bf16 dense in this run: {worst[0]:.2f}x ({worst[1]}); target >= 0.9x: "
                  f"{'met' if worst[0] >= 0.9 else 'missed'}.", ""]
    out_f, in_f = shapes[-1]
    lines += [f"Where the prefill path starts to win (W {out_f}x{in_f}, bf16 activations, ladder {list(ladder)}):", ""]
    for name, (backend, first, threshold) in crossover(out_f, in_f, formats, ladder).items():
        lines.append(f"- {name} ({backend}): measured from {first if first else f'> {ladder[-1]}'} rows; "
                     f"the backend switches at {threshold if threshold else 'never'}")
    return "\n".join(lines) + "\n"


__all__ = ["run", "bench_rows", "crossover"]
