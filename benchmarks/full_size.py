"""Full size: the real ``CogVLMModel`` and ``CogAgentModel`` at their public shapes (configs/*.json), seeded random
weights, ``--bf16``, each 4/8-bit format that fits this machine's memory: build, save, checkpoint size, load in a
fresh process, one image+text prompt, greedy decode. Every step runs in its own process, so each peak RSS is its
own; decode is compared with this machine's memory bandwidth measured in the same run (a STREAM-like copy).

    python -m benchmarks --only full_size          # writes the "Full size" section of RESULTS.md (up to ~45 min)
    python -m benchmarks.full_size --tiny          # the same steps on the tiny real models (seconds; CI runs it)
    python -m benchmarks.full_size probe STEP ...  # one step, prints one JSON line (used by the above)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"cogvlm": os.path.join(ROOT, "configs", "cogvlm-chat-17b.json"),
           "cogagent": os.path.join(ROOT, "configs", "cogagent-chat-18b.json")}
FORMATS = {"int4": 4, "int4cs": 4, "nf4": 4, "int8": 8}
TEXT_TOKENS = 13  # the text part of the prompt: a short question after the image tokens
GIB = 2 ** 30


# -- inside a probe process ---------------------------------------------------------------------------------------
def _peak_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024 / GIB


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current resident set


def _model_class_and_args(model: str, tiny: bool, fmt: Optional[str]):
    """The model class and SAT args: the public shape from configs/ (or the tests' tiny real model), on CPU."""
    from sat.arguments import update_args_with_file

    from sat_quant.sat.args import fill_script_defaults
    from tests.cogvlm_fixture import cogvlm_model_class
    overrides: Dict[str, Any] = dict(device="cpu", bf16=True, fp16=False, mode="inference", skip_init=False)
    if fmt:
        overrides.update(quant=FORMATS[fmt], quant_format=fmt)
    if tiny:
        if model == "cogvlm":
            from tests.cogvlm_fixture import tiny_cogvlm_args
            return cogvlm_model_class(), tiny_cogvlm_args(**overrides)
        from tests.cogagent_fixture import TinyCogAgentModel, tiny_cogagent_args
        return TinyCogAgentModel, tiny_cogagent_args(**overrides)
    cogvlm_model_class()  # imports utils.models from the CogVLM checkout: registers both classes with SAT
    from sat.model.registry import model_registry
    with open(CONFIGS[model]) as f:
        cls = model_registry.get(json.load(f)["model_class"])
    args = fill_script_defaults(update_args_with_file(cls.get_args(), CONFIGS[model]))
    for key, value in overrides.items():
        setattr(args, key, value)
    return cls, args


def _prompt(model: str, args: argparse.Namespace) -> Dict[str, Any]:
    """One image + a short question, laid out as CogVLM's chat lays it out (CogAgent: plus its cross image)."""
    import torch

    from sat_quant.testing.cogvlm_assets import tiny_cross_inputs
    from tests.cogvlm_fixture import tiny_cogvlm_inputs
    size = args.eva_args["image_size"][0]
    inputs = tiny_cogvlm_inputs(seq_len=args.image_length + 3 + TEXT_TOKENS, image_length=args.image_length,
                                image_size=size, vocab_size=args.vocab_size, dtype=torch.bfloat16)
    if model == "cogagent":
        inputs.update(tiny_cross_inputs(dtype=torch.bfloat16, cross_image_pix=args.cross_image_pix))
    return inputs


def _generate(model_obj, inputs: Dict[str, Any], new_tokens: int) -> Dict[str, float]:
    """SAT's filling_sequence with sat_quant's in-place KV cache (``KVCacheMixin``), greedy; the strategy notes when
    each token's logits arrive, so the prompt (prefill) and the per-token decode are timed apart in one call."""
    import torch
    from sat.generation.autoregressive_sampling import filling_sequence
    from sat.generation.sampling_strategies import BaseStrategy

    from sat_quant import KVCacheMixin, cache_cross_image

    class TimedGreedy(BaseStrategy):
        def __init__(self) -> None:
            super().__init__(temperature=1.0, top_k=1, end_tokens=[-5])  # -5: never ends early
            self.times: List[float] = []

        def forward(self, *a, **kw):
            self.times.append(time.perf_counter())
            counter.counting = len(self.times) == 2  # the model call between the 2nd and 3rd token: one decode step
            return super().forward(*a, **kw)

    inputs = dict(inputs)
    context, positions = inputs.pop("input_ids")[0], inputs.pop("position_ids")[0]
    inputs.pop("attention_mask")
    total = len(context) + new_tokens
    seq = torch.cat([context, torch.full((new_tokens,), -1, dtype=torch.long)])
    all_positions = torch.cat([positions, positions[-1] + 1 + torch.arange(new_tokens)]).unsqueeze(0)
    strategy = TimedGreedy()
    counter = WeightBytesRead()
    cache = KVCacheMixin()
    model_obj.add_mixin("auto-regressive", cache)
    cache_cross_image(model_obj)  # CogAgent: its cross image encoded once, not once per token as upstream does
    rss_before = _rss_gib()
    _reset_peak()
    start = time.perf_counter()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(counter)
    try:
        with torch.no_grad():
            filling_sequence(model_obj, seq, batch_size=1, strategy=strategy, **inputs,
                             get_masks_and_position_ids=lambda s: (s.unsqueeze(0), torch.ones(1, 1, total, total).tril(),
                                                                   all_positions))
    finally:
        hook.remove()
    times = strategy.times
    return {"prompt_tokens": len(context), "prefill_s": times[0] - start,
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
            "decode_bytes_per_token": counter.total, "rss_before_generate_gib": rss_before,
            "generate_peak_gib": _peak_gib(), "kv_cache_gib": cache.cache_bytes() / GIB}


class WeightBytesRead:
    """A global forward pre-hook: while ``counting``, adds the weight bytes of every module that runs on a non-empty
    input (a quantized layer's packed bytes; other modules' own parameters; an embedding reads only its rows, so
    none). CogVLM's visual expert is skipped for text tokens, so this is what one decode step really streams."""

    def __init__(self) -> None:
        self.counting, self.total, self.seen = False, 0, set()

    def __call__(self, module, args) -> None:
        import torch
        if not self.counting or id(module) in self.seen:
            return
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.numel() == 0 or isinstance(module, torch.nn.Embedding):
            return
        memo = module.__dict__.get("forward")  # cache_cross_image: CogAgent's cross keys/values, projected once
        if hasattr(memo, "would_reuse") and memo.would_reuse(args, {}):
            return
        self.seen.add(id(module))
        if hasattr(module, "quantized_nbytes"):
            self.total += module.quantized_nbytes()
        self.total += sum(p.numel() * p.element_size() for p in module._parameters.values() if p is not None)


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024 / GIB


def probe_build_save(model: str, fmt: str, out: str, tiny: bool) -> Dict[str, Any]:
    import torch

    import sat_quant
    cls, args = _model_class_and_args(model, tiny, fmt)
    torch.manual_seed(0)
    imports = _rss_gib()  # torch, SAT, deepspeed, CogVLM's code: held before any weight exists
    _reset_peak()
    start = time.perf_counter()
    built = sat_quant.get_model(args, cls).eval()
    result = {"build_s": time.perf_counter() - start, "build_peak_gib": _peak_gib(), "imports_rss_gib": imports,
              "weights_gib": (sum(p.numel() * p.element_size() for p in built.parameters())
                              + sum(m.quantized_nbytes() for m in built.modules()
                                    if isinstance(m, sat_quant.QuantLinear))) / GIB}
    _reset_peak()
    result["rss_before_save_gib"] = _peak_gib()
    start = time.perf_counter()
    sat_quant.save_checkpoint(built, out, args=args)
    result.update(save_s=time.perf_counter() - start, save_peak_gib=_peak_gib(),
                  checkpoint_gib=sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) / GIB)
    return result


def probe_estimate(model: str, fmt: str, tiny: bool) -> Dict[str, Any]:
    """Weight bytes of the quantized model, priced on meta (no memory): whether it fits is decided before building."""
    from collections import OrderedDict

    from sat_quant.engine.config import QuantConfig
    from sat_quant.tools.estimate import estimate_table
    cls, args = _model_class_and_args(model, tiny, None)
    _, columns = estimate_table(cls, args, OrderedDict([(fmt, QuantConfig(bits=FORMATS[fmt], format=fmt))]))
    return {"weights_gib": columns[fmt].weight_bytes / GIB}


def probe_load_run(model: str, path: str, new_tokens: int, tiny: bool) -> Dict[str, Any]:
    import sat_quant
    from sat_quant.sat.compat import apply_cpu_compat, install_xformers_cpu_fallback
    cls, args = _model_class_and_args(model, tiny, None)
    imports = _rss_gib()
    _reset_peak()
    start = time.perf_counter()
    loaded, loaded_args = sat_quant.from_pretrained(cls, path, args)
    result = {"load_s": time.perf_counter() - start, "load_peak_gib": _peak_gib(), "load_imports_rss_gib": imports,
              "load_mb_s": loaded.quant_load_times.mb_per_s()}
    apply_cpu_compat(loaded)
    install_xformers_cpu_fallback()
    prompt = _prompt(model, loaded_args)
    result.update(_generate(loaded.eval(), prompt, new_tokens))
    from sat_quant.tools.estimate import estimate_runtime
    kv, activations = estimate_runtime(loaded_args, 1, result["prompt_tokens"] + new_tokens, act_bytes=2)
    result.update(estimate_kv_gib=kv / GIB, estimate_activations_gib=activations / GIB)
    return result


def probe_reference_llama(new_tokens: int, tiny: bool) -> Dict[str, Any]:
    """Decode of the e2e benchmark's 120M LLaMA-style model at int4 (bf16), the same way: tokens/s and the bytes
    one decode step reads, for the issue's second decode ratio (tiny: the tests' 2-layer LLaMA)."""
    import torch
    from sat.model.official.llama_model import LLaMAModel

    import sat_quant
    from benchmarks.e2e import LLAMA_ARCH, PROMPT_TOKENS
    arch = dict(LLAMA_ARCH, num_layers=2, hidden_size=256, num_attention_heads=4, inner_hidden_size=512,
                vocab_size=1000) if tiny else LLAMA_ARCH
    torch.manual_seed(0)
    model = sat_quant.get_model(LLaMAModel.get_args(**arch, device="cpu", fp16=False, bf16=True, skip_init=False,
                                                    mode="inference", quant=4, quant_format="int4"), LLaMAModel)
    prompt = torch.randint(3, arch["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=prompt, position_ids=torch.arange(PROMPT_TOKENS).unsqueeze(0), attention_mask=None)
    return _generate(model.eval(), inputs, new_tokens)


# -- the orchestrating process ------------------------------------------------------------------------------------
def int4_gemv_gbs(backend: str = "auto", out_features: int = 11008, in_features: int = 4096,
                  repeats: int = 20) -> Tuple[float, str]:
    """An int4 kernel alone at one row (a decode step's matmul, bf16 activations, this process's threads): packed
    weight bytes per second, best of ``repeats``, and the backend that ran. Decode cannot stream weights faster
    than its kernel reads them."""
    import torch

    import sat_quant
    layer = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16))
    sat_quant.quantize_(layer, sat_quant.QuantConfig(bits=4, format="int4", backend=backend))
    x = torch.randn(1, in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        best = min(_timed(lambda: layer(x)) for _ in range(repeats))
    return layer[0].quantized_nbytes() / best / 1e9, layer[0].backend.name


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """STREAM 'copy': bytes read + bytes written per second, best of ``repeats``, one large tensor copy."""
    import torch
    a = torch.ones(int(gib * GIB) // 4)
    b = torch.empty_like(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _probe(*argv: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.full_size", "probe", *argv], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        result = {"error": tail[0][:200]}
    else:
        result = json.loads(lines[-1])
    print(f"full_size {' '.join(argv)}: {json.dumps(result)}", file=sys.stderr, flush=True)  # a long run's progress
    return result


def run(tiny: bool = False, models=("cogvlm", "cogagent"), formats=("int4", "nf4", "int8"),
        new_tokens: int = 16, work: Optional[str] = None) -> str:
    """Every (model, format) pair that fits: build+save in one process, load+prompt+decode in a fresh one."""
    bandwidth = memory_bandwidth_gbs(0.25 if tiny else 1.0)
    kernel = int4_gemv_gbs(), int4_gemv_gbs("torch")
    reference = _probe("reference-llama", str(new_tokens), *(["--tiny"] if tiny else []))
    work = work or tempfile.mkdtemp(prefix="sat_quant_full_size_")
    rows = []
    memory = _mem_total_gib()
    for model in models:
        for fmt in formats:
            folder = os.path.join(work, f"{model}-{fmt}")
            tiny_flag = ["--tiny"] if tiny else []
            if os.path.lexists(folder):  # never overwrite what this run did not write
                rows.append((model, fmt, {"error": f"{folder} already exists; pass another --work"}, {}))
                continue
            need = {"weights_gib": 0.0} if tiny else _probe("estimate", model, fmt)  # tiny always fits
            if "error" in need or need["weights_gib"] * 1.25 + 2 > memory:
                why = need.get("error") or (f"skipped: needs about {need['weights_gib'] * 1.25 + 2:.0f} GiB, this "
                                            f"machine has {memory:.0f} GiB")
                rows.append((model, fmt, {"error": why}, {}))
                continue
            try:
                built = _probe("build-save", model, fmt, folder, *tiny_flag)
                ran = _probe("load-run", model, folder, str(new_tokens), *tiny_flag) if "error" not in built else {}
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # the checkpoint this run wrote (it did not exist before)
            rows.append((model, fmt, built, ran))
    return _section(rows, bandwidth, tiny, new_tokens, kernel, reference)


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemTotal")) * 1024 / GIB


def _cpu_description() -> str:
    """The CPU's model name, core count and the vector extensions the kernels care about."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = "AVX-512 with BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else \
        "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {vector}"


def _section(rows, bandwidth: float, tiny: bool, new_tokens: int, kernel, reference: Dict[str, Any]) -> str:
    shape = "the tests' tiny real models (smoke run)" if tiny else "public shapes (configs/cogvlm-chat-17b.json, " \
                                                                  "configs/cogagent-chat-18b.json)"
    lines = [f"## Full size: CogVLM and CogAgent, {shape}", "",
             f"Random weights (seed 0), `--bf16`, CPU ({_cpu_description()}). Memory bandwidth (STREAM-like copy, same run): "
             f"{bandwidth:.1f} GB/s. Decode ratio = tokens/s x weight bytes read per token / bandwidth "
             f"(target >= 0.6 at 4 bits); bytes read per token are counted, not assumed: the weights of every module "
             f"that ran in one decode step (CogVLM's visual expert and vision tower do not run for a text token). "
             f"{new_tokens} new tokens per prompt, generated by SAT's `filling_sequence` with sat_quant's in-place "
             f"`KVCacheMixin`. The int4 kernel `auto` picks here ({kernel[0][1]}) alone at one row (4096 -> 11008, "
             f"bf16, same run) reads {kernel[0][0]:.1f} GB/s of packed weights (torch's `_weight_int4pack_mm_for_cpu`: "
             f"{kernel[1][0]:.1f} GB/s): {kernel[0][0] / bandwidth:.2f} of the bandwidth, the most an int4 "
             f"decode step can reach here.", "",
             "| model | format | weights GiB | build s | build peak GiB | save s | save peak GiB | checkpoint GiB "
             "| load s | load peak GiB | prompt tokens | prefill s | decode tok/s | MiB read/token | decode ratio "
             "| generate peak GiB |",
             "|---|---|" + "---:|" * 14]
    steps = ["", "Each step's peak against what the process held before it (the imports of torch, SAT, deepspeed and "
             "CogVLM's code are resident before any weight exists): build and load over the imports, save over "
             "the built model:", "",
             "| model | format | imports GiB | build peak - imports GiB | build / weights | save peak - before GiB "
             "| load imports GiB | load peak - imports GiB | load / weights |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    phases = ["", "Load phases in the fresh process (they overlap: sha256 runs in a thread while tensors are read): "
              "reading tensors out of the file, verifying it, repacking the neutral layout into the kernels' own:", "",
              "| model | format | load s | read MB/s | verify MB/s | repack MB/s |", "|---|---|---:|---:|---:|---:|"]
    memory = ["", "Memory while generating: RSS when generation starts (weights and the loaded model), its peak, and "
              "the growth against `sat-quant estimate`'s KV cache and peak activations for the same tokens:", "",
              "| model | format | RSS at start GiB | peak GiB | growth MiB | KV cache held MiB | estimate KV MiB "
              "| estimate activations MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, fmt, b, r in rows:
        if "error" in b or "error" in r:
            lines.append(f"| {model} | {fmt} | {(b.get('error') or r.get('error'))} |" + " |" * 13)
            continue
        per_token = r["decode_bytes_per_token"]
        ratio = r["decode_tok_s"] * per_token / (bandwidth * 1e9)
        lines.append(f"| {model} | {fmt} | {b['weights_gib']:.2f} | {b['build_s']:.0f} | {b['build_peak_gib']:.2f} | "
                     f"{b['save_s']:.1f} | {b['save_peak_gib']:.2f} | {b['checkpoint_gib']:.2f} | {r['load_s']:.1f} | "
                     f"{r['load_peak_gib']:.2f} | {r['prompt_tokens']} | {r['prefill_s']:.2f} | "
                     f"{r['decode_tok_s']:.2f} | {per_token / 2**20:.1f} | {ratio:.2f} | {r['generate_peak_gib']:.2f} |")
        build_net, load_net = b["build_peak_gib"] - b["imports_rss_gib"], r["load_peak_gib"] - r["load_imports_rss_gib"]
        steps.append(f"| {model} | {fmt} | {b['imports_rss_gib']:.2f} | {build_net:.2f} | "
                     f"{build_net / b['weights_gib']:.2f} | {b['save_peak_gib'] - b['rss_before_save_gib']:.2f} | "
                     f"{r['load_imports_rss_gib']:.2f} | {load_net:.2f} | {load_net / b['weights_gib']:.2f} |")
        rates = r.get("load_mb_s", {})
        phases.append(f"| {model} | {fmt} | {r['load_s']:.1f} | "
                      + " | ".join(f"{rates[p]:.0f}" if rates.get(p) else "-" for p in ("read", "verify", "repack"))
                      + " |")
        memory.append(f"| {model} | {fmt} | {r['rss_before_generate_gib']:.2f} | {r['generate_peak_gib']:.2f} | "
                      f"{(r['generate_peak_gib'] - r['rss_before_generate_gib']) * 1024:.1f} | "
                      f"{r['kv_cache_gib'] * 1024:.1f} | {r['estimate_kv_gib'] * 1024:.1f} | "
                      f"{r['estimate_activations_gib'] * 1024:.1f} |")
    memory.append("")
    memory.append("KV cache held: the in-place cache's allocated capacity (float32 on a CPU without native bf16, "
                  "where attention over it is faster, else bf16; the estimate prices bf16).")
    name = "2-layer LLaMA (tiny)" if tiny else "120M LLaMA-style model"
    if "error" in reference:
        llama = ["", f"{name} (benchmarks/e2e.py), int4: {reference['error']}"]
    else:
        ratio = reference["decode_tok_s"] * reference["decode_bytes_per_token"] / (bandwidth * 1e9)
        llama = ["", f"{name} (benchmarks/e2e.py's, int4, bf16, same decode path): "
                     f"{reference['decode_tok_s']:.1f} tokens/s x {reference['decode_bytes_per_token'] / 2**20:.1f} "
                     f"MiB read per token = {ratio:.2f} of the bandwidth."]
    return "\n".join(lines + steps + phases + memory + llama) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["probe"]:
        step, rest = argv[1], [a for a in argv[2:] if a != "--tiny"]
        tiny = "--tiny" in argv
        if step == "estimate":
            result = probe_estimate(rest[0], rest[1], tiny)
        elif step == "reference-llama":
            result = probe_reference_llama(int(rest[0]), tiny)
        elif step == "build-save":
            result = probe_build_save(rest[0], rest[1], rest[2], tiny)
        else:
            result = probe_load_run(rest[0], rest[1], int(rest[2]), tiny)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny real models (a smoke run)")
    parser.add_argument("--models", default="cogvlm,cogagent")
    parser.add_argument("--formats", default="int4,nf4,int8")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--work", help="folder for the checkpoints (default: a new temporary folder)")
    ns = parser.parse_args(argv)
    print(run(ns.tiny, ns.models.split(","), ns.formats.split(","), ns.new_tokens, ns.work))


if __name__ == "__main__":
    main()
