"""Load benchmark: a ready 4-bit model (a) from an fp16 checkpoint + quantize, (b) from the quantized checkpoint.

Both in fresh subprocesses on the same ~310M-parameter SAT GPT-2 model, fp16 for what stays full precision;
time and peak RSS growth over the post-import baseline (one-time imports done before timing). The
checkpoints are written once, before timing; the page cache is warm for both.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ARCH = dict(num_layers=24, hidden_size=1024, num_attention_heads=16, vocab_size=8192, max_sequence_length=512)


def _write_checkpoints(root: str):
    import torch
    from sat.model.base_model import get_model
    from sat.model.official.gpt2_model import GPT2Model
    from sat.training.model_io import save_checkpoint

    from sat_quant import QuantConfig
    from sat_quant.tools.convert import convert
    torch.manual_seed(0)
    args = GPT2Model.get_args(**ARCH, device="cpu", fp16=True)
    model = get_model(args, GPT2Model)
    fp_dir, q_dir = os.path.join(root, "fp16"), os.path.join(root, "q4")
    args.save, args.mode = fp_dir, "inference"
    save_checkpoint(1, model, None, None, args)
    params = sum(p.numel() for p in model.parameters())
    del model
    convert(fp_dir, q_dir, QuantConfig(bits=4), progress=False)
    return fp_dir, q_dir, params


def _probe(mode: str, path: str) -> dict:
    probe = os.path.join(os.path.dirname(__file__), "load_probe.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, probe, mode, path], capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_bytes(path: str, suffix: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if f.endswith(suffix))


def run(repeats: int = 2) -> str:
    with tempfile.TemporaryDirectory() as root:
        fp_dir, q_dir, params = _write_checkpoints(root)
        results = {}
        for mode, path in (("fp16+quantize", fp_dir), ("quantized checkpoint", q_dir)):
            runs = [_probe(mode, path) for _ in range(repeats)]
            results[mode] = min(runs, key=lambda r: r["seconds"])
        fp_bytes, q_bytes = _dir_bytes(fp_dir, ".pt"), _dir_bytes(q_dir, ".safetensors")
    a, b = results["fp16+quantize"], results["quantized checkpoint"]
    lines = ["## Load: a ready 4-bit model", "",
             f"SAT GPT2Model, {params / 1e6:.0f}M parameters, int4 group 128 (LM head and embeddings full "
             f"precision). Checkpoint files: fp16 `.pt` {fp_bytes / 2**20:.0f} MiB, quantized `.safetensors` "
             f"{q_bytes / 2**20:.0f} MiB. Best of {repeats} fresh processes each; peak RSS is growth over the "
             "post-import baseline.", "",
             "| path | seconds | peak RSS growth (MiB) |", "|---|---:|---:|",
             f"| (a) fp16 checkpoint + quantize while loading | {a['seconds']:.2f} | {a['peak_growth'] / 2**20:.0f} |",
             f"| (b) quantized checkpoint | {b['seconds']:.2f} | {b['peak_growth'] / 2**20:.0f} |", "",
             f"(b) is **{a['seconds'] / b['seconds']:.1f}x faster** than (a) (target ≥ 3x: "
             f"{'met' if a['seconds'] >= 3 * b['seconds'] else 'missed'}). Its peak RSS growth is "
             f"{b['peak_growth'] / 2**20:.0f} MiB against a budget of 1.2 x file + 64 MiB = "
             f"{(1.2 * q_bytes + 64 * 2**20) / 2**20:.0f} MiB "
             f"({'met' if b['peak_growth'] <= 1.2 * q_bytes + 64 * 2**20 else 'missed'}).", ""]
    print("\n".join(lines))
    return "\n".join(lines)
