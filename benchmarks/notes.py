"""Static reading notes appended to RESULTS.md: what the figures mean and where targets are missed."""


def run() -> str:
    return """## Notes: reading these figures

- **CPU kernels take bf16 activations.** torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`
  are fast only with bf16 input (with fp32 input they were ~10x slower than dense fp32 here), so sat_quant
  casts activations to bf16 for them and returns the caller's dtype; the "fp32 act" rows include that cast.
- **Batch 1 targets (issue: int8 ≥ 4.5x, every 4-bit format ≥ 8x vs fp32):** int8 and int4 meet them
  (≈5.8x and ≈12x, at 34-39 GB/s, i.e. memory bandwidth). **nf4/fp4 miss them by far** (0.13-0.26x: *slower*
  than fp32): bitsandbytes 0.50 on CPU has no fast 4-bit GEMV here (its optional `kernels` package fetches
  code from a hub, which this project does not allow). Next step (issue "Performance and quality"): a
  lookup-table nf4/fp4 path or a repack onto the int4 kernel.
- **Batch 16**: weight-only kernels lose their edge as the batch grows (int8 ≈2.7x, int4 ≈4.2x vs fp32;
  dense bf16 is ≈4x); prefill-heavy work at large batch is better served by dequantize-once paths (not done).
- **Accuracy**: int4 uses an integer zero-point with 0 on the grid (the GPTQ/AWQ convention): group 128 scores
  0.960 mean cosine on MiniLM at 4.19 bits (a float group-minimum offset gave 0.947 at 4.25 bits). The issue's
  4-bit target (≥ 0.985 at ≤ 4.3 bits) is not reached yet: round-to-nearest tops out near nf4 block 32 (0.977).
- **Load**: one-time imports (torch, SAT, xformers) are done before timing in both paths; with them included
  a fresh process adds ~0.8 s to each.
"""
