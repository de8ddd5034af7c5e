"""Subprocess body of the load benchmark: time and peak RSS of one way to get a ready 4-bit model."""
import json
import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")


def main(mode: str, path: str) -> None:
    import torch
    from sat.arguments import _simple_init
    from sat.model.official.gpt2_model import GPT2Model

    import sat_quant
    import sat_quant.sat.compat  # noqa: F401  one-time imports (xformers, triton rotary) both paths would pay
    _simple_init(model_parallel_size=1, seed=1234)
    import xformers.ops  # noqa: F401
    from sat.model.position_embedding import triton_rotary_embeddings  # noqa: F401
    with open("/proc/self/statm") as f:
        baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: measure the load, not the imports
    start = time.perf_counter()
    if mode == "fp16+quantize":
        args = GPT2Model.get_args(device="cpu", quant=4, fp16=True)
        model, _ = sat_quant.from_pretrained(GPT2Model, path, args=args)
    else:  # same dtype as (a): fp16 for everything that stays full precision
        model, _ = sat_quant.from_pretrained(GPT2Model, path, args=GPT2Model.get_args(device="cpu", fp16=True))
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    with torch.no_grad():  # the model is ready: it runs
        model.eval()(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], torch.ones(1, 1, 4, 4))
    print(json.dumps({"seconds": seconds, "peak_growth": peak - baseline}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
