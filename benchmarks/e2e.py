"""End-to-end benchmark: greedy generation tokens/s, weight bytes and peak RSS per format, on CPU.

Two real SAT models: a LLaMA-style ``LLaMAModel`` (~120M parameters) and the tiny real ``CogVLMModel``
(``tests/cogvlm_fixture.py``: EVA2-CLIP tower + visual expert, one 224x224 image in the prompt). Each variant (fp32,
bf16, and int8 / int4 / nf4 / fp4 built with ``sat_quant.get_model``, fp32 activations, plus nf4 with ``--bf16``)
runs in its own fresh process, so its peak RSS is its own: build, then SAT's
``filling_sequence`` with ``CachedAutoregressiveMixin`` (KV cache) and a greedy strategy (top-k 1, no end
token), same prompt and number of new tokens for all. Tokens/s counts new tokens over the whole call (prefill
of the prompt included), best of ``REPEATS`` after a warm-up call.

    python -m benchmarks --only e2e        # writes the "End to end" section of RESULTS.md
    python -m benchmarks.e2e probe llama nf4-fp32   # one variant, prints JSON
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: LLaMA-style: 8 layers, hidden 1024, SwiGLU 2816, 16 heads; a 8192-token vocabulary keeps the LM head (kept in
#: full precision, as sat_quant does by default) at ~5% of the weights, as in LLaMA-7B (2%), not 30% as a
#: 32000-token vocabulary would at this width
LLAMA_ARCH = dict(num_layers=8, hidden_size=1024, num_attention_heads=16, inner_hidden_size=2816, vocab_size=8192,
                  max_sequence_length=512, layernorm_order="pre")
PROMPT_TOKENS, NEW_TOKENS, REPEATS = 32, 16, 4
BITS = {"int8": 8, "int4": 4, "nf4": 4, "fp4": 4}
#: variant -> (format or None, activation dtype)
VARIANTS: Dict[str, Tuple[Optional[str], str]] = {
    "fp32": (None, "fp32"), "bf16": (None, "bf16"),
    "int8-fp32": ("int8", "fp32"), "int4-fp32": ("int4", "fp32"), "nf4-fp32": ("nf4", "fp32"),
    "fp4-fp32": ("fp4", "fp32"),
    "nf4-bf16": ("nf4", "bf16"),
}
COGVLM_VARIANTS = ("fp32", "bf16", "int8-fp32", "int4-fp32", "nf4-fp32", "fp4-fp32")


# -- subprocess side ------------------------------------------------------------------------------------------
def _weight_bytes(model) -> int:
    """Bytes of what the model holds as weights: quantized tensors of QuantLinear + every float parameter."""
    import sat_quant
    quantized = sum(m.quantized_nbytes() for m in model.modules() if isinstance(m, sat_quant.QuantLinear))
    return quantized + sum(p.numel() * p.element_size() for p in model.parameters())


def _build_llama(fmt: Optional[str], act: str):
    import torch
    from sat.model.official.llama_model import LLaMAModel

    import sat_quant
    kw = dict(LLAMA_ARCH, device="cpu", fp16=False, bf16=act == "bf16", skip_init=False, mode="inference")
    if fmt:
        kw.update(quant=BITS[fmt], quant_format=fmt)
    model = sat_quant.get_model(LLaMAModel.get_args(**kw), LLaMAModel).eval()
    sat_quant.apply_cpu_compat(model)
    prompt = torch.randint(3, LLAMA_ARCH["vocab_size"], (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))
    return model, prompt, {}, None


def _build_cogvlm(fmt: Optional[str], act: str):
    import torch

    import sat_quant
    from tests.cogvlm_fixture import build_tiny_cogvlm, cogvlm_model_class, tiny_cogvlm_args, tiny_cogvlm_inputs
    dtype = torch.bfloat16 if act == "bf16" else torch.float32
    if fmt is None:
        model, _ = build_tiny_cogvlm(dtype)
    else:
        args = tiny_cogvlm_args(quant=BITS[fmt], quant_format=fmt, bf16=act == "bf16")
        model = sat_quant.get_model(args, cogvlm_model_class()).eval()  # CPU fallbacks switched on by the build
    inputs = tiny_cogvlm_inputs(seq_len=256 + 3 + PROMPT_TOKENS, dtype=dtype)
    prompt = inputs.pop("input_ids")[0]
    prompt_pos = inputs.pop("position_ids")[0]
    inputs.pop("attention_mask")

    def masks_and_positions(seq):  # causal mask; positions continue after the prompt's (image tokens share one)
        n = len(seq)
        extra = prompt_pos[-1] + 1 + torch.arange(n - len(prompt_pos))
        return seq.unsqueeze(0), torch.ones(1, 1, n, n).tril(), torch.cat([prompt_pos, extra]).unsqueeze(0)
    return model, prompt, inputs, masks_and_positions


def _init_sat() -> None:
    from sat import mpu
    from sat.arguments import _simple_init
    if not mpu.model_parallel_is_initialized():
        _simple_init(model_parallel_size=1, seed=1234)


def _timed_greedy():
    """SAT's BaseStrategy with top-k 1 (greedy), noting when the prompt's forward has produced the first logits."""
    from sat.generation.sampling_strategies import BaseStrategy

    class TimedGreedy(BaseStrategy):
        first = None

        def forward(self, *args, **kwargs):
            if self.first is None:
                self.first = time.perf_counter()
            return super().forward(*args, **kwargs)
    return TimedGreedy(top_k=1, end_tokens=[])


class Runner:
    """One built variant with SAT's KV cache; ``generate(n)`` runs a greedy ``filling_sequence`` of n new tokens."""

    def __init__(self, model_name: str, variant: str) -> None:
        from sat.model.mixins import CachedAutoregressiveMixin

        import sat_quant
        fmt, act = VARIANTS[variant]
        start = time.perf_counter()
        self.model, self.prompt, inputs, masks = (_build_llama if model_name == "llama" else _build_cogvlm)(fmt, act)
        self.build_s = time.perf_counter() - start
        self.model.add_mixin("auto-regressive", CachedAutoregressiveMixin())
        layers = [m for m in self.model.modules() if isinstance(m, sat_quant.QuantLinear)]
        self.backends = sorted({m.backend.name for m in layers})
        self.params = sum(p.numel() for p in self.model.parameters()) + sum(m.in_features * m.out_features
                                                                            for m in layers)
        self.kw = dict(inputs, get_masks_and_position_ids=masks) if masks else dict(inputs)

    def generate(self, new: int) -> Tuple[float, List[int], float]:
        """(seconds of the whole call, the new tokens, seconds of the prompt's forward = time to first token)."""
        import torch
        from sat.generation.autoregressive_sampling import filling_sequence
        seq = torch.cat([self.prompt, torch.full((new,), -1, dtype=self.prompt.dtype)])
        strategy = _timed_greedy()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = filling_sequence(self.model, seq, batch_size=1, strategy=strategy, **self.kw)[0]
        end = time.perf_counter()
        tokens = out[0, len(self.prompt):].tolist()
        assert len(tokens) == new, tokens
        return end - t0, tokens, strategy.first - t0


def probe(model_name: str, variant: str, new_tokens: int = 4) -> dict:
    """Memory of one variant, in this (fresh) process: build, generate ``new_tokens``, report weight bytes and the
    peak RSS growth over the post-import baseline (tokens/s are measured side by side in one process instead)."""
    import sat_quant.sat.compat  # noqa: F401  one-time imports every variant pays, before the baseline
    from tests.workers.rss_probe import peak_bytes, reset_peak, rss_bytes
    _init_sat()
    baseline = rss_bytes()
    reset_peak()  # VmHWM from here on: the model and its generation, not the imports
    runner = Runner(model_name, variant)
    seconds, tokens, _ = runner.generate(new_tokens)
    return {"model": model_name, "variant": variant, "tokens": tokens, "seconds": seconds, "build_s": runner.build_s,
            "weight_bytes": _weight_bytes(runner.model), "peak_growth": peak_bytes() - baseline,
            "baseline": baseline, "backends": runner.backends, "params": runner.params}


def time_side_by_side(model_name: str, variants, rounds: int = REPEATS) -> Dict[str, Dict[str, float]]:
    """Per variant: decode tokens/s (tokens after the first, over their time), prompt (prefill) seconds and overall
    tokens/s, all variants built in this process and timed round-robin (best of ``rounds``), so that a busy spell
    on a shared machine hits every variant alike instead of one."""
    _init_sat()
    runners = {v: Runner(model_name, v) for v in variants}
    for r in runners.values():
        r.generate(2)  # warm-up: first-call allocations, lazy imports
    best: Dict[str, Dict[str, float]] = {v: {"decode": 0.0, "prefill_s": float("inf"), "overall": 0.0}
                                         for v in variants}
    for _ in range(rounds):
        for v, r in runners.items():
            total, _, first = r.generate(NEW_TOKENS)
            b = best[v]
            b["decode"] = max(b["decode"], (NEW_TOKENS - 1) / (total - first))
            b["prefill_s"] = min(b["prefill_s"], first)
            b["overall"] = max(b["overall"], NEW_TOKENS / total)
    return best


# -- driver ---------------------------------------------------------------------------------------------------
def _run_probe(model_name: str, variant: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "probe", model_name, variant], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"e2e probe {model_name} {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(variant: str) -> Tuple[str, str]:
    fmt, act = VARIANTS[variant]
    return (fmt or act), act


def _table(results: List[dict]) -> List[str]:
    by = {r["variant"]: r for r in results}
    fp32, bf16 = by["fp32"]["tokens_per_s"], by["bf16"]["tokens_per_s"]
    lines = ["| weights | activations | backend | decode tokens/s | vs fp32 | vs bf16 | prompt (ms) | overall tokens/s "
             "| weights (MiB) | peak RSS growth (MiB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        w, act = _label(r["variant"])
        backend = ", ".join(r["backends"]) or "torch dense"
        lines.append(f"| {w} | {act} | {backend} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / fp32:.2f}x | "
                     f"{r['tokens_per_s'] / bf16:.2f}x | {1000 * r['prefill_s']:.0f} | {r['overall']:.1f} | "
                     f"{r['weight_bytes'] / 2**20:.0f} | "
                     f"{r['peak_growth'] / 2**20:.0f} |")
    return lines


def run(models: Tuple[str, ...] = ("llama", "cogvlm")) -> str:
    from .machine import load_average
    start, load = time.perf_counter(), load_average()
    lines = ["## End to end: greedy generation on CPU", "",
             f"SAT's `filling_sequence` + `CachedAutoregressiveMixin`, greedy (top-k 1), prompt {PROMPT_TOKENS} "
             f"text tokens, {NEW_TOKENS} new tokens, same for every variant. Decode tokens/s: the tokens after the "
             "first over their time (the KV-cached steps); prompt: time to the first token (the prompt's forward); "
             "overall: new tokens over the whole call. All variants of a model are built in one process and timed "
             f"round-robin, best of {REPEATS} rounds after a warm-up, so load from other processes hits them alike. "
             "Memory comes from a fresh process per variant (`python -m benchmarks.e2e probe MODEL VARIANT`: build, "
             "generate 4 tokens): weights = quantized tensors + float parameters; peak RSS growth = VmHWM over the "
             "post-import baseline. Quantized variants: `sat_quant.get_model` with `--quant N --quant-format F` "
             "(`--bf16` for bf16 activations), backend `auto`; embeddings and the LM head stay full precision.", ""]
    for model_name in models:
        variants = VARIANTS if model_name == "llama" else COGVLM_VARIANTS
        results = [_run_probe(model_name, v) for v in variants]
        for r, (_v, t) in zip(results, time_side_by_side(model_name, variants).items()):
            r.update(tokens_per_s=t["decode"], prefill_s=t["prefill_s"], overall=t["overall"])
        params = results[0]["params"]
        if model_name == "llama":
            arch = ", ".join(f"{k} {v}" for k, v in LLAMA_ARCH.items() if k != "max_sequence_length")
            lines += [f"### LLaMA-style `LLaMAModel`, {params / 1e6:.0f}M parameters ({arch})", ""]
        else:
            lines += [f"### Tiny real `CogVLMModel` ({params / 1e6:.0f}M parameters: EVA2-CLIP 2 layers hidden 1792, "
                      "language model 2 layers hidden 256, one 224x224 image = 256 prompt tokens + "
                      f"{PROMPT_TOKENS} text tokens)", ""]
        lines += _table(results) + [""]
        lines += _verdict(model_name, results) + [""]
        print(f"done e2e {model_name}", flush=True)
    lines.append(f"Whole section: {time.perf_counter() - start:.0f} s; load average at its start {load}, at its end "
                 f"{load_average()} (a shared machine: every row of a table ran within the same few minutes).")
    text = "\n".join(lines)
    print(text)
    return text


def _verdict(model_name: str, results: List[dict]) -> List[str]:
    by = {r["variant"]: r for r in results}
    fp32 = by["fp32"]["tokens_per_s"]
    four = {v: r["tokens_per_s"] / fp32 for v, r in by.items() if VARIANTS[v][0] in ("int4", "nf4", "fp4")}
    if not four:
        return []
    best = max(four, key=four.get)
    worst = min(four, key=four.get)
    if model_name == "llama":
        met = [v for v, x in four.items() if x >= 3.0]
        text = (f"Target (4-bit ≥ 3x fp32 decode tokens/s): {len(met)} of {len(four)} 4-bit variants meet it; best "
                f"{best} {four[best]:.2f}x, worst {worst} {four[worst]:.2f}x")
        if len(met) < len(four):
            text += (f" ({3.0 / four[worst]:.2f}x short). Per token, fp32 streams "
                     f"{by['fp32']['weight_bytes'] / 2**20:.0f} MiB of weights and a 4-bit model about "
                     f"{by[worst]['weight_bytes'] / 2**20:.0f} MiB (the full-precision embedding is stored but "
                     "not streamed); what does not shrink — attention, norms, rotary, the fp32 LM head and SAT's "
                     "per-layer Python hooks — caps the gain")
        return [text + "."]
    return [f"4-bit vs fp32 decode here: {worst} {four[worst]:.2f}x .. {best} {four[best]:.2f}x. This model's "
            "language model is tiny (hidden 256): a decoding step moves ~1 MiB of weights, so its time is SAT's "
            "per-layer Python, the KV-cache concatenation and the attention over the ~290-token cache, not weight "
            "bytes; the prompt (EVA2-CLIP over 257 patches, > 64 rows per matmul) runs the dequantize-then-GEMM "
            "path for nf4/fp4. The memory columns are what quantization buys at this size."]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        print(json.dumps(probe(sys.argv[2], sys.argv[3])))
    else:
        run(tuple(sys.argv[1:]) or ("llama", "cogvlm"))
