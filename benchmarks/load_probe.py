"""Subprocess body of the load benchmark: time and peak RSS of one way to get a ready 4-bit model."""
import json
import os
import sys
import time

os.environ.setdefault("WANDB_MODE", "disabled")


def main(mode: str, path: str) -> None:
    import torch
    from sat.model.official.gpt2_model import GPT2Model

    import sat_quant
    from sat.arguments import _simple_init
    _simple_init(model_parallel_size=1, seed=1234)
    with open("/proc/self/statm") as f:
        baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: measure the load, not the imports
    start = time.perf_counter()
    if mode == "fp16+quantize":
        args = GPT2Model.get_args(device="cpu", quant=4, fp16=True)
        model, _ = sat_quant.from_pretrained(GPT2Model, path, args=args)
    else:
        model, _ = sat_quant.from_pretrained(GPT2Model, path)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model.eval()(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], torch.ones(1, 1, 4, 4))
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_growth": peak - baseline}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
